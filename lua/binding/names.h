/*
** names.h: C functions and library tables by name, both ways (internal,
** prefix lparN_); the value encoding's CFUNC and LIB (serialize.c).
*/
#ifndef LPAR_NAMES_H
#define LPAR_NAMES_H

#include <stddef.h>

#include <lua.h>

/*
** Push the index object -> dotted name of the C functions and library
** tables here: the tables of package.loaded, their C functions
** ("string.format") and the C functions among the globals ("print"). It is
** cached in the registry and built again when package.loaded has changed,
** or always with `rebuild`. `globals` is the stack slot of the global table.
*/
void lparN_index(lua_State *L, int globals, int rebuild);

/*
** Push the thing named s[0..n) here, if it has Lua type `want`: 1, or 0
** pushing nothing. A library table must be a loaded module (or the
** globals), so it would be sent back by the same name.
*/
int lparN_resolve(lua_State *L, const char *s, size_t n, int want);

#endif
