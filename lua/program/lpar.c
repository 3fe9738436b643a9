/*
** lpar.c: the `lpar` command, a Lua 5.4 host with lpar's modules on the path.
**
**   lpar [-n N] [-e CODE] [-l MOD] [-i] [FILE.lua|- [args...]]   as lua5.4
**   lpar --profile P          the prompt, connected to standalone cluster P
**   lpar cluster ...          start, stop, list, clean standalone clusters
**   lpar engine --profile P   an engine that joins a running cluster
**
** The command line is parsed in Lua, by lpar.cli (argparse); see lpar(1).
** The state is closed on the way out, so every Cluster's finalizer runs and
** no engine outlives the command.
*/
#include <stdio.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "paths.h"
#include "readline_module.h"

static int traceback(lua_State *L) {
  const char *msg = luaL_tolstring(L, 1, NULL); /* error objects have __tostring */
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* lpar.cli.main(argv) -> exit status: the command line is parsed in Lua (argparse). */
static int run_cli(lua_State *L, int argc, char **argv) {
  lua_pushcfunction(L, traceback);
  int base = lua_gettop(L);
  lua_getglobal(L, "require");
  lua_pushstring(L, "lpar.cli");
  int status = lua_pcall(L, 1, 1, base);
  if (status == LUA_OK) {
    lua_getfield(L, -1, "main");
    lua_createtable(L, argc - 1, 0);
    for (int i = 1; i < argc; i++) {
      lua_pushstring(L, argv[i]);
      lua_rawseti(L, -2, i);
    }
    status = lua_pcall(L, 1, 1, base);
  }
  if (status != LUA_OK) {
    fprintf(stderr, "lpar: %s\n", lua_tostring(L, -1));
    return 1;
  }
  int code = (int)lua_tointeger(L, -1);
  lua_settop(L, base - 1);
  return code;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  if (L == NULL) {
    fprintf(stderr, "lpar: cannot create a Lua state: not enough memory\n");
    return 1;
  }
  luaL_openlibs(L);
  lparP_set_paths(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, lparI_open);
  lua_setfield(L, -2, "lpar.readline");
  lua_pop(L, 1);
  int status = run_cli(L, argc, argv);
  lua_close(L);
  return status;
}
