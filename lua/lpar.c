/*
** lpar.c: the `lpar` command, a Lua 5.4 host with lpar's modules on the path.
**
**   lpar FILE.lua [args...]   run a script (arg[0] = FILE, arg[1..] = args)
**   lpar -e CODE              run a chunk
**
** The state is closed on the way out, so every Cluster's finalizer runs and
** no engine outlives the command.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "paths.h"

static int traceback(lua_State *L) {
  const char *msg = luaL_tolstring(L, 1, NULL); /* error objects have __tostring */
  luaL_traceback(L, L, msg, 1);
  return 1;
}

static int run_chunk(lua_State *L, int status, int nargs) {
  if (status == LUA_OK) {
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    status = lua_pcall(L, nargs, 0, base);
    lua_remove(L, base);
  }
  if (status != LUA_OK) {
    fprintf(stderr, "lpar: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  return status;
}

static void usage(void) {
  fprintf(stderr,
          "usage: lpar FILE.lua [args...]   run a Lua 5.4 script with lpar available\n"
          "       lpar -e CODE              run a chunk\n");
}

int main(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
    usage();
    return argc < 2 ? 2 : 0;
  }
  lua_State *L = luaL_newstate();
  if (L == NULL) return 1;
  luaL_openlibs(L);
  lparP_set_paths(L);
  int status;
  int script = strcmp(argv[1], "-e") != 0;
  if (!script && argc < 3) {
    usage();
    lua_close(L);
    return 2;
  }
  /* arg: the script at 0, its arguments from 1, as lua5.4 does. */
  int first = script ? 1 : 2;
  lua_createtable(L, argc, 1);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - first);
  }
  lua_setglobal(L, "arg");
  if (script) {
    status = luaL_loadfile(L, argv[1]);
    int nargs = 0;
    for (int i = 2; status == LUA_OK && i < argc; i++, nargs++) lua_pushstring(L, argv[i]);
    status = run_chunk(L, status, nargs);
  } else {
    status = run_chunk(L, luaL_loadbuffer(L, argv[2], strlen(argv[2]), "=(command line)"), 0);
  }
  lua_close(L);
  return status == LUA_OK ? 0 : 1;
}
