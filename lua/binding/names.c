/*
** names.c: C functions and library tables by name, both ways (see names.h).
**
** A C function or a library table cannot be sent as bytes; it goes by the
** name the sender knows it by ("string.format", "math"), and the receiver
** looks the name up among its own modules and globals, raw, calling no
** metamethod.
*/
#include "names.h"

#include <string.h>

#include <lauxlib.h>

#define REG_NAMES "lpar.names" /* C function / library -> name */

/* ---- the sender: an index of names ---- */

/* index[v] = name, unless v has a name already that is no longer, or `weak`. */
static void names_add(lua_State *L, int index, int v, int name, int weak) {
  lua_pushvalue(L, v);
  int t = lua_rawget(L, index);
  if (t == LUA_TSTRING && (weak || lua_rawlen(L, -1) <= lua_rawlen(L, name))) {
    lua_pop(L, 1);
    return;
  }
  lua_pop(L, 1);
  lua_pushvalue(L, v);
  lua_pushvalue(L, name);
  lua_rawset(L, index);
}

/* Index the C functions of table t (string keys only) as prefix.key. */
static void names_add_fields(lua_State *L, int index, int t, int prefix, int weak) {
  lua_pushnil(L);
  while (lua_next(L, t)) {
    if (lua_type(L, -2) == LUA_TSTRING && lua_iscfunction(L, -1)) {
      lua_pushvalue(L, prefix);
      lua_pushliteral(L, ".");
      lua_pushvalue(L, -4);
      lua_concat(L, 3);
      names_add(L, index, lua_gettop(L) - 1, lua_gettop(L), weak);
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
}

/* Index the module v (named by the string at k) and its C functions. */
static void names_add_module(lua_State *L, int index, int k, int v, int weak) {
  if (lua_type(L, v) == LUA_TTABLE) {
    names_add(L, index, v, k, weak);
    names_add_fields(L, index, v, k, weak);
  } else if (lua_iscfunction(L, v)) {
    names_add(L, index, v, k, weak);
  }
}

/*
** Index package.loaded into index: the standard libraries first, then the
** other modules without overriding; index[1] becomes a copy of it and the
** result is its size.
*/
static lua_Integer names_add_loaded(lua_State *L, int index, int globals) {
  static const char *const stdlibs[] = {
    "string", "table", "math", "io", "os", "coroutine", "utf8", "debug", "package", NULL};
  lua_Integer n = 0;
  lua_createtable(L, 0, 32);
  lua_rawseti(L, index, 1);
  if (lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE) != LUA_TTABLE) {
    lua_pop(L, 1);
    return 0;
  }
  int loaded = lua_gettop(L), copy = loaded + 1;
  lua_rawgeti(L, index, 1);
  for (int i = 0; stdlibs[i]; i++) {
    lua_pushstring(L, stdlibs[i]);
    lua_pushvalue(L, -1);
    lua_rawget(L, loaded);
    names_add_module(L, index, copy + 1, copy + 2, 0);
    lua_settop(L, copy);
  }
  lua_pushnil(L);
  while (lua_next(L, loaded)) {
    int k = lua_gettop(L) - 1, v = k + 1;
    n++;
    lua_pushvalue(L, k);
    lua_pushvalue(L, v);
    lua_rawset(L, copy);
    if (lua_type(L, k) == LUA_TSTRING && !lua_rawequal(L, v, globals))
      names_add_module(L, index, k, v, 1);
    lua_pop(L, 1);
  }
  lua_settop(L, loaded - 1);
  return n;
}

/*
** Build the index object -> name of the tables of package.loaded, their C
** functions ("string.format") and the C functions of the globals ("print");
** push it and cache it in the registry. A thing with several names gets the
** standard library's name, else a module's, else a global's: the names the
** receiver most likely has too. index[1] keeps a copy of package.loaded
** and index[2] its size, to notice modules loaded or replaced since.
*/
static void names_build(lua_State *L, int globals) {
  lua_createtable(L, 0, 256);
  int index = lua_gettop(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k"); /* weak keys: an unloaded module may go */
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, index);
  lua_pushinteger(L, names_add_loaded(L, index, globals));
  lua_rawseti(L, index, 2);
  lua_pushnil(L);
  while (lua_next(L, globals)) {
    if (lua_type(L, -2) == LUA_TSTRING && lua_iscfunction(L, -1))
      names_add(L, index, lua_gettop(L), lua_gettop(L) - 1, 1);
    lua_pop(L, 1);
  }
  lua_pushvalue(L, index);
  lua_setfield(L, LUA_REGISTRYINDEX, REG_NAMES);
}

/* Is package.loaded as the index at top saw it? Same size, same values. */
static int names_fresh(lua_State *L) {
  int index = lua_gettop(L);
  lua_rawgeti(L, index, 1);
  lua_rawgeti(L, index, 2);
  lua_Integer had = lua_tointeger(L, -1), n = 0;
  int fresh = lua_type(L, index + 1) == LUA_TTABLE &&
              lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE) == LUA_TTABLE;
  if (fresh) {
    lua_pushnil(L);
    while (fresh && lua_next(L, index + 3)) {
      lua_pushvalue(L, -2);
      lua_rawget(L, index + 1);
      fresh = lua_rawequal(L, -1, -2) && ++n <= had;
      lua_pop(L, 2);
    }
  }
  lua_settop(L, index);
  return fresh && n == had;
}

void lparN_index(lua_State *L, int globals, int rebuild) {
  if (!rebuild) {
    if (lua_getfield(L, LUA_REGISTRYINDEX, REG_NAMES) == LUA_TTABLE && names_fresh(L)) return;
    lua_pop(L, 1);
  }
  names_build(L, globals);
}

/* ---- the receiver: what a name names ---- */

static int resolve_loaded(lua_State *L, const char *s, size_t n, int want);

/* rawget of t[s[0..n)], pushing the result; returns its type. */
static int rawget_l(lua_State *L, int t, const char *s, size_t n) {
  lua_pushlstring(L, s, n);
  return lua_rawget(L, t);
}

/* Push globals.a.b.c for s = "a.b.c" (raw gets); returns the type pushed. */
static int walk(lua_State *L, int globals, const char *s, size_t n) {
  const char *e = s + n;
  lua_pushvalue(L, globals);
  for (;;) {
    const char *q = memchr(s, '.', (size_t)(e - s));
    if (q == NULL) q = e;
    if (lua_type(L, -1) != LUA_TTABLE) return LUA_TNIL;
    rawget_l(L, lua_gettop(L), s, (size_t)(q - s));
    lua_remove(L, -2);
    if (q == e) return lua_type(L, -1);
    s = q + 1;
  }
}

/*
** Push what s[0..n) names here, if it has type `want`: package.loaded[s]
** (returns 1), else the global s, package.loaded[module][field], or dotted
** fields walked from the globals (returns 2). Returns 0 pushing nothing.
*/
static int find_name(lua_State *L, int loaded, int globals, const char *s, size_t n,
                     int want) {
  int top = lua_gettop(L);
  if (loaded && rawget_l(L, loaded, s, n) == want) return 1;
  lua_settop(L, top);
  if (rawget_l(L, globals, s, n) == want) return 2;
  lua_settop(L, top);
  const char *dot = NULL;
  for (size_t i = 0; i < n; i++)
    if (s[i] == '.') dot = s + i;
  if (dot && loaded) {
    size_t k = (size_t)(dot - s);
    if (rawget_l(L, loaded, s, k) == LUA_TTABLE &&
        rawget_l(L, top + 1, dot + 1, n - k - 1) == want) {
      lua_replace(L, top + 1);
      return 2;
    }
    lua_settop(L, top);
  }
  if (walk(L, globals, s, n) == want) return 2;
  lua_settop(L, top);
  return 0;
}

/* Is the value at top one of the values of package.loaded (at loaded)? */
static int is_loaded_value(lua_State *L, int loaded) {
  int v = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, loaded)) {
    if (lua_rawequal(L, -1, v)) {
      lua_pop(L, 2);
      return 1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

/*
** Push the receiver's thing named s[0..n). A library table found other than
** as package.loaded[s] must still be a loaded module (or the globals), so
** that it would be sent back by name too. Returns 1, or 0 pushing nothing.
*/
/* lpar's own modules, which a name may load when it is not loaded yet. */
static const char *const own_modules[] = {"lpar.matrix", "lpar.plot", NULL};

static int require_module(lua_State *L) {
  lua_getglobal(L, "require");
  lua_pushvalue(L, 1);
  lua_call(L, 1, 0);
  return 0;
}

/*
** Load the module of lpar's own that s[0..n) names or is a field of
** ("lpar.matrix", "lpar.matrix.dot"), if it is not loaded: a peer may send
** a module this side never required. Only this fixed list: a name from the
** wire never makes this side run another module's code. Returns 1 when a
** module was loaded.
*/
static int load_own_module(lua_State *L, const char *s, size_t n) {
  for (int i = 0; own_modules[i]; i++) {
    size_t k = strlen(own_modules[i]);
    if (n < k || memcmp(s, own_modules[i], k) != 0 || (n > k && s[k] != '.')) continue;
    int top = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    int loaded = lua_type(L, -1) == LUA_TTABLE && lua_getfield(L, -1, own_modules[i]) != LUA_TNIL;
    lua_settop(L, top);
    if (loaded) return 0;
    lua_pushcfunction(L, require_module);
    lua_pushstring(L, own_modules[i]);
    int ok = lua_pcall(L, 1, 0, 0) == LUA_OK; /* a failure leaves the name unknown */
    lua_settop(L, top);
    return ok;
  }
  return 0;
}

int lparN_resolve(lua_State *L, const char *s, size_t n, int want) {
  int found = resolve_loaded(L, s, n, want);
  if (!found && load_own_module(L, s, n)) found = resolve_loaded(L, s, n, want);
  return found;
}

/* lparN_resolve among what is loaded now. */
static int resolve_loaded(lua_State *L, const char *s, size_t n, int want) {
  int base = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  int loaded = lua_type(L, base + 1) == LUA_TTABLE ? base + 1 : 0;
  int how = find_name(L, loaded, base + 2, s, n, want);
  if (how == 2 && want == LUA_TTABLE && !lua_rawequal(L, -1, base + 2) &&
      !(loaded && is_loaded_value(L, loaded)))
    how = 0;
  if (how) lua_replace(L, base + 1);
  lua_settop(L, base + (how != 0));
  return how != 0;
}

