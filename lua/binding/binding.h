/*
** binding.h: what the parts of the lpar.core binding share (internal,
** prefix lparC_).
*/
#ifndef LPAR_BINDING_H
#define LPAR_BINDING_H

#include <stdint.h>

#include <lua.h>

#include "lpar.h"

/* nil, "what: message", code: the luv way of failing. */
int lparC_push_failure(lua_State *L, int code, const char *what);
/* Message handler adding a traceback. */
int lparC_traceback(lua_State *L);
/*
** Push a Lua handler's arguments for one engine event ("ready", "result",
** "stdout", ...); returns their count, or -1 to skip. A reply that does not
** decode becomes "undecodable" and is counted in *undecodable.
*/
int lparC_push_event(uint64_t *undecodable, lua_State *L, const lpar_event *ev);
/* A signal given by number or name ("INT", "SIGKILL"). */
int lparC_check_signal(lua_State *L, int arg);
/* Adds keygen, listen and connect (link.c) to the module table on top. */
void lparC_open_link(lua_State *L);

#endif
