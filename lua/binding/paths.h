/*
** paths.h: where a Lua state of lpar's (the `lpar` command, an engine) finds
** lpar's Lua modules and its binding (internal, prefix lparP_).
*/
#ifndef LPAR_PATHS_H
#define LPAR_PATHS_H

#include <lua.h>

/*
** Prepend the Lua module directory ($LPAR_LUA_DIR or the source tree's lua/)
** to package.path and the build's lib/ ($LPAR_BUILD_DIR or the build tree)
** to package.cpath.
*/
void lparP_set_paths(lua_State *L);

/* The `lpar` command, which starts standalone controllers ($LPAR_COMMAND overrides it). */
const char *lparP_command_path(void);

#endif
