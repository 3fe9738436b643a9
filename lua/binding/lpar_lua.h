/*
** lpar_lua.h: lpar for hosts that embed Lua 5.4 (public; link liblpar-lua.a
** and liblpar.a: `pkg-config --cflags --libs lpar-lua`).
**
**   lua_State *L = luaL_newstate();
**   luaL_openlibs(L);
**   luaL_requiref(L, "lpar", luaopen_lpar, 1);   // the global `lpar`
**
** lpar's Lua modules (PREFIX/share/lua/5.4/lpar/) must be on package.path,
** as for any Lua module; its C parts (lpar.core, lpar.matrix) are linked
** into the host and registered in package.preload, so nothing is looked up
** as a .so. The engine is found beside those Lua modules
** (PREFIX/libexec/lpar/lpar-engine), or at $LPAR_ENGINE.
*/
#ifndef LPAR_LUA_H
#define LPAR_LUA_H

#include <lua.h>

/* Open lpar (require "lpar") with its C modules preloaded; returns 1: the module. */
int luaopen_lpar(lua_State *L);

#endif
