/*
** embed_lua.c: a host with its own lua_State opens lpar with luaopen_lpar
** (its C modules linked in statically, nothing loaded as a .so) and runs a
** chunk on a 2-engine cluster:
**   cc embed_lua.c $(pkg-config --cflags --libs lpar-lua) -o embed_lua
** lpar's Lua modules must be on package.path (LUA_PATH_5_4), as usual.
*/
#include <stdio.h>

#include <lauxlib.h>
#include <lualib.h>

#include <lpar_lua.h>

static const char chunk[] =
  "local rc <close> = lpar.Cluster { n = 2 }:start_and_connect()\n"
  "local m = rc[1]:apply_sync(function() return require('lpar.matrix').eye(3):sum() end)\n"
  "print('engines', #rc, 'sum', m, 'preloaded', package.preload['lpar.core'] ~= nil)\n";

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "lpar", luaopen_lpar, 1);
  lua_pop(L, 1);
  int status = luaL_dostring(L, chunk);
  if (status != LUA_OK) fprintf(stderr, "embed_lua: %s\n", lua_tostring(L, -1));
  lua_close(L);
  return status == LUA_OK ? 0 : 1;
}
