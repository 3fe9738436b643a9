/*
** paths.h: where a Lua state of lpar's (the `lpar` command, an engine) finds
** lpar's Lua modules and its binding (internal, prefix lparP_).
*/
#ifndef LPAR_PATHS_H
#define LPAR_PATHS_H

#include <lua.h>

/*
** Prepend lpar's Lua module directory ($LPAR_LUA_DIR, the source tree's lua/
** or PREFIX/share/lua/5.4) to package.path and its C module directory
** ($LPAR_CMOD_DIR, the build's lib/ or PREFIX/lib/lua/5.4) to package.cpath.
*/
void lparP_set_paths(lua_State *L);

#include <stddef.h>

/* The `lpar` command, which starts standalone controllers ($LPAR_COMMAND overrides it). */
const char *lparP_command_path(char *buf, size_t n);

#endif
