/*
** paths.c: module search paths for lpar's own Lua states, from where this
** copy of lpar lives (core/place.h): the build tree, or an install prefix.
*/
#include "paths.h"

#include <lauxlib.h>

#include "place.h"

void lparP_set_paths(lua_State *L) {
  char dir[4096];
  lua_getglobal(L, "package");
  if (lparL_path("lua", dir, sizeof dir)) {
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 1);
  }
  if (lparL_path("cmod", dir, sizeof dir)) {
    lua_getfield(L, -1, "cpath");
    lua_pushfstring(L, "%s/?.so;%s", dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "cpath");
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

const char *lparP_command_path(char *buf, size_t n) {
  return lparL_path("command", buf, n) ? buf : "lpar";
}
