/*
** readline_module.h: the prompt's line editing, built into the lpar command.
*/
#ifndef LPAR_READLINE_MODULE_H
#define LPAR_READLINE_MODULE_H

#include <lua.h>

/* lua_CFunction: the lpar.readline module table. */
int lparI_open(lua_State *L);

#endif
