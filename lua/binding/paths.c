/*
** paths.c: module search paths for lpar's own Lua states.
*/
#include "paths.h"

#include <stdlib.h>

#include <lauxlib.h>

static const char *env_or(const char *name, const char *fallback) {
  const char *s = getenv(name);
  return s && *s ? s : fallback;
}

void lparP_set_paths(lua_State *L) {
  const char *lua_dir = env_or("LPAR_LUA_DIR", LPAR_LUA_DIR);
  const char *build_dir = env_or("LPAR_BUILD_DIR", LPAR_BUILD_DIR);
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "path");
  lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", lua_dir, lua_dir, lua_tostring(L, -1));
  lua_setfield(L, -3, "path");
  lua_pop(L, 1);
  lua_getfield(L, -1, "cpath");
  lua_pushfstring(L, "%s/lib/?.so;%s", build_dir, lua_tostring(L, -1));
  lua_setfield(L, -3, "cpath");
  lua_pop(L, 2);
}

const char *lparP_command_path(void) { return env_or("LPAR_COMMAND", LPAR_BUILD_DIR "/lpar"); }
