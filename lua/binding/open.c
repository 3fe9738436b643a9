/*
** open.c: luaopen_lpar, lpar for a host's own lua_State (lpar_lua.h).
*/
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>

#include "lpar_lua.h"

int luaopen_lpar_core(lua_State *L);
int luaopen_lpar_matrix(lua_State *L);

/*
** An engine installed with the Lua modules found on package.path: for
** PREFIX/<lmod dir>/lpar/init.lua, PREFIX/<engine dir>/lpar-engine. Pushes
** the path, or nothing.
*/
static int push_engine_beside_modules(lua_State *L) {
  static const char suffix[] = "/" LPAR_REL_LMODDIR "/lpar/init.lua";
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "searchpath");
  lua_pushliteral(L, "lpar");
  lua_getfield(L, -3, "path");
  lua_call(L, 2, 1);
  const char *init = lua_tostring(L, -1);
  size_t n = init ? strlen(init) : 0, k = sizeof suffix - 1;
  if (init && LPAR_REL_LMODDIR[0] != '/' && n > k && strcmp(init + n - k, suffix) == 0) {
    lua_pushlstring(L, init, n - k); /* the prefix */
    lua_pushfstring(L, "%s/%s/lpar-engine", lua_tostring(L, -1), LPAR_REL_ENGINEDIR);
    if (access(lua_tostring(L, -1), X_OK) == 0) {
      lua_replace(L, -4); /* over package */
      lua_pop(L, 2);      /* the search result and the prefix */
      return 1;
    }
    lua_pop(L, 2);
  }
  lua_pop(L, 2); /* package and the search result */
  return 0;
}

int luaopen_lpar(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_lpar_core);
  lua_setfield(L, -2, "lpar.core");
  lua_pushcfunction(L, luaopen_lpar_matrix);
  lua_setfield(L, -2, "lpar.matrix");
  lua_pop(L, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "lpar.core");
  lua_call(L, 1, 1);
  /* The core places the engine from where its code is: here, the host's
     executable, which says nothing of lpar's prefix; the modules do. */
  lua_getfield(L, -1, "engine_path");
  int usable = access(lua_tostring(L, -1), X_OK) == 0;
  lua_pop(L, 1);
  if (!usable && push_engine_beside_modules(L)) lua_setfield(L, -2, "engine_path");
  lua_pop(L, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "lpar");
  lua_call(L, 1, 1);
  return 1;
}
