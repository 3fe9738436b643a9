/*
** lpar.c: the `lpar` command, a Lua 5.4 host with lpar's modules on the path.
**
**   lpar FILE.lua [args...]   run a script (arg[0] = FILE, arg[1..] = args)
**   lpar -e CODE              run a chunk
**   lpar [-n N]               the interactive prompt, first starting N engines
**   lpar --profile P          the prompt, connected to standalone cluster P
**   lpar cluster ...          start, stop, list, clean standalone clusters
**   lpar engine --profile P   an engine that joins a running cluster
**   lpar kernel ...           the Jupyter kernel, and its kernelspec
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
#include "readline_module.h"

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
          "       lpar -e CODE              run a chunk\n"
          "       lpar [-n N]               the interactive prompt, with N local engines\n"
          "       lpar --profile P          the prompt, connected to standalone cluster P\n"
          "       lpar cluster start [-n N] [--profile P] [--daemonize] [--ip ADDR] [--port PORT]\n"
          "       lpar cluster stop [--profile P | --all] | list | clean\n"
          "       lpar engine [--profile P | --file CONNECTION_FILE]\n"
          "       lpar kernel install [--user | --prefix DIR | --sys-prefix] [--name NAME] | uninstall\n"
          "       lpar kernel -f CONNECTION_FILE   the Jupyter kernel\n");
}

/* The prompt: lpar.prompt.main{n = engines, profile = name}, in Lua. */
static int run_prompt(lua_State *L, int engines, const char *profile) {
  lua_getglobal(L, "require");
  lua_pushstring(L, "lpar.prompt");
  int status = lua_pcall(L, 1, 1, 0);
  if (status == LUA_OK) {
    lua_getfield(L, -1, "main");
    lua_remove(L, -2);
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, engines);
    lua_setfield(L, -2, "n");
    if (profile) {
      lua_pushstring(L, profile);
      lua_setfield(L, -2, "profile");
    }
    return run_chunk(L, LUA_OK, 1);
  }
  return run_chunk(L, status, 0);
}

/* `lpar cluster ...` and `lpar engine ...`: lpar.commands.main(args) -> exit status. */
static int run_command(lua_State *L, int argc, char **argv) {
  lua_pushcfunction(L, traceback);
  int base = lua_gettop(L);
  lua_getglobal(L, "require");
  lua_pushstring(L, "lpar.commands");
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
  if (argc >= 2 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
    usage();
    return 0;
  }
  int engines = -1; /* the prompt: without -n, no engines */
  if (argc == 1) engines = 0;
  const char *profile = NULL;
  int command = argc >= 2 && (strcmp(argv[1], "cluster") == 0 || strcmp(argv[1], "engine") == 0 ||
                             strcmp(argv[1], "kernel") == 0);
  if (argc >= 2 && strcmp(argv[1], "--profile") == 0) {
    if (argc != 3) {
      usage();
      return 2;
    }
    profile = argv[2];
    engines = 0;
  }
  if (argc == 3 && strcmp(argv[1], "-n") == 0) {
    char *end;
    long n = strtol(argv[2], &end, 10);
    if (*end || n < 1 || n > 4096) {
      fprintf(stderr, "lpar: -n needs a number of engines from 1 to 4096\n");
      return 2;
    }
    engines = (int)n;
  }
  lua_State *L = luaL_newstate();
  if (L == NULL) return 1;
  luaL_openlibs(L);
  lparP_set_paths(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, lparR_open);
  lua_setfield(L, -2, "lpar.readline");
  lua_pop(L, 1);
  int status;
  if (command) {
    status = run_command(L, argc, argv);
    lua_close(L);
    return status;
  }
  if (engines >= 0) {
    status = run_prompt(L, engines, profile);
    lua_close(L);
    return status == LUA_OK ? 0 : 1;
  }
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
