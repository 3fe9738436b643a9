/*
** test_serialize.c: tests of the value encoding (lua/binding/serialize.c).
**
** Values are built and encoded in one lua_State and decoded and checked in
** a second one, as between two processes.
**
**   test_serialize                 run the tests
**   test_serialize --bench         rough encode/decode speeds
**   test_serialize --corpus DIR    write the fuzz seed corpus into DIR
*/
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "check.h"
#include "lpar.h"
#include "funcache.h"
#include "serialize.h"

#define ERRLEN 256

static lua_State *new_state(void) {
  lua_State *L = luaL_newstate();
  if (L == NULL) abort();
  luaL_openlibs(L);
  lua_pushcfunction(L, lparS_register_metatable);
  lua_setglobal(L, "register_metatable");
  return L;
}

/* Run src in L and leave its results: returns their number, or -1. */
static int run(lua_State *L, const char *src) {
  int top = lua_gettop(L);
  if (luaL_loadbuffer(L, src, strlen(src), "=sender") != LUA_OK ||
      lua_pcall(L, 0, LUA_MULTRET, 0) != LUA_OK) {
    CHECKF(0, "Lua error: %s", lua_tostring(L, -1));
    lua_settop(L, top);
    return -1;
  }
  return lua_gettop(L) - top;
}

/* Append the encoding of what src returns in A to b; LPAR code (99: src failed). */
static int encode_src(lua_State *A, const char *src, lparB_buffer *b, char *err) {
  int top = lua_gettop(A);
  int n = run(A, src);
  if (n < 0) return 99;
  int rc = lparS_encode(A, top + 1, n, "args", b, err, ERRLEN);
  CHECKF(lua_gettop(A) == top + n, "encode changed the stack: %s", src);
  lua_settop(A, top);
  return rc;
}

/* Call chunk `check` in B with the n values at the top as `...`; it must return true. */
static void verify(lua_State *B, int n, const char *check, const char *name) {
  int top = lua_gettop(B) - n;
  if (luaL_loadbuffer(B, check, strlen(check), "=check") != LUA_OK) {
    CHECKF(0, "%s: check does not compile: %s", name, lua_tostring(B, -1));
    lua_settop(B, top);
    return;
  }
  lua_insert(B, top + 1);
  if (lua_pcall(B, n, 1, 0) != LUA_OK)
    CHECKF(0, "%s: %s", name, lua_tostring(B, -1));
  else
    CHECKF(lua_toboolean(B, -1), "%s: check returned false", name);
  lua_settop(B, top);
}

typedef struct rt_case {
  const char *name;
  const char *setup_b; /* run in the receiver first, or NULL */
  const char *src;     /* run in the sender: returns the values */
  const char *check;   /* run in the receiver with the values: returns true */
  unsigned flags;
} rt_case;

static void roundtrip(const rt_case *c) {
  lua_State *A = new_state(), *B = new_state();
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  if (c->setup_b && run(B, c->setup_b) >= 0) lua_settop(B, 0);
  int rc = encode_src(A, c->src, &b, err);
  if (CHECKF(rc == 0, "%s: encode failed (%d): %s", c->name, rc, err)) {
    int n = -1;
    rc = lparS_decode(B, b.data, b.len, c->flags, &n, err, sizeof err);
    if (CHECKF(rc == 0, "%s: decode failed (%d): %s", c->name, rc, err)) {
      CHECKF(lua_gettop(B) == n, "%s: decode pushed %d, said %d", c->name, lua_gettop(B), n);
      verify(B, n, c->check, c->name);
    }
  }
  lparB_free(&b);
  lua_close(A);
  lua_close(B);
}

#define CODE LPARS_ALLOW_CODE

static const rt_case cases[] = {
  {"scalars", NULL,
   "return nil, false, true, 0, 127, 128, -1, -128, math.maxinteger, math.mininteger",
   "local a = table.pack(...)\n"
   "assert(a.n == 10 and a[1] == nil and a[2] == false and a[3] == true)\n"
   "local ints = {0, 127, 128, -1, -128, math.maxinteger, math.mininteger}\n"
   "for i = 1, 7 do assert(math.type(a[i + 3]) == 'integer' and a[i + 3] == ints[i], i) end\n"
   "return true", 0},
  {"floats", NULL, "return 3, 3.0, -0.0, 0/0, math.huge, -math.huge, 0.1, 2^63, -2^63, 5e-324",
   "local a, b, z, nan, inf, ninf, tenth, big, nbig, tiny = ...\n"
   "assert(math.type(a) == 'integer' and math.type(b) == 'float' and a == 3 and b == 3.0)\n"
   "assert(math.type(z) == 'float' and z == 0 and 1/z == -math.huge)\n"
   "assert(nan ~= nan and inf == math.huge and ninf == -math.huge and tenth == 0.1)\n"
   "assert(big == 2^63 and math.type(big) == 'float' and nbig == -2^63 and tiny == 5e-324)\n"
   "return true", 0},
  {"trailing nils", NULL, "return 1, nil, nil", "return select('#', ...) == 3", 0},
  {"empty tuple", NULL, "return", "return select('#', ...) == 0", 0},
  {"strings", NULL,
   "local t = {} for i = 0, 255 do t[#t + 1] = string.char(i) end\n"
   "return '', 'a\\0b', table.concat(t), string.rep('x', 31), string.rep('y', 32),\n"
   "  string.rep('ab\\0c', 3 * 2^18)",
   "local e, z, all, x31, y32, big = ...\n"
   "local t = {} for i = 0, 255 do t[#t + 1] = string.char(i) end\n"
   "assert(e == '' and z == 'a\\0b' and #z == 3 and all == table.concat(t))\n"
   "assert(x31 == string.rep('x', 31) and y32 == string.rep('y', 32))\n"
   "return #big == 3 * 2^20 and big == string.rep('ab\\0c', 3 * 2^18)", 0},
  {"table keys", NULL,
   "local k = {}\n"
   "return {'a', 'b', k, [k] = 'tk', [true] = 'T', [false] = 'F', [1.5] = 'f', [2^63] = 'big',\n"
   "  x = 1, ['a b'] = 2, [10] = 'ten', [-1] = 'neg', [0] = 'zero'}",
   "local t = ...\n"
   "assert(t[1] == 'a' and t[2] == 'b' and type(t[3]) == 'table' and t[t[3]] == 'tk')\n"
   "assert(t[true] == 'T' and t[false] == 'F' and t[1.5] == 'f' and t[2^63] == 'big')\n"
   "assert(t.x == 1 and t['a b'] == 2 and t[10] == 'ten' and t[-1] == 'neg' and t[0] == 'zero')\n"
   "local n = 0 for _ in pairs(t) do n = n + 1 end\n"
   "return n == 13", 0},
  {"holes", NULL, "return {1, nil, 3, nil, 5}",
   "local t = ...\n"
   "local n = 0 for _ in pairs(t) do n = n + 1 end\n"
   "return n == 3 and t[1] == 1 and t[2] == nil and t[3] == 3 and t[5] == 5", 0},
  {"nested", NULL, "return {a = {b = {c = {1, 2, {d = 'deep'}}}}}",
   "local t = ... return t.a.b.c[3].d == 'deep' and t.a.b.c[2] == 2", 0},
  {"big array", NULL, "local t = {} for i = 1, 1e6 do t[i] = i * 3 end return t",
   "local t = ... if #t ~= 1e6 then return false end\n"
   "for i = 1, 1e6 do if t[i] ~= i * 3 or math.type(t[i]) ~= 'integer' then return false end end\n"
   "return true", 0},
  {"float array", NULL, "local t = {} for i = 1, 1e5 do t[i] = i + 0.5 end return t",
   "local t = ... for i = 1, 1e5 do if t[i] ~= i + 0.5 then return false end end\n"
   "return #t == 1e5", 0},
  {"records", NULL,
   "local t = {} for i = 1, 1000 do t[i] = {id = i, name = 'n' .. i, tags = {'a', 'b'}} end\n"
   "return t",
   "local t = ... for i = 1, 1000 do local r = t[i]\n"
   "  if r.id ~= i or r.name ~= 'n' .. i or r.tags[2] ~= 'b' then return false end end\n"
   "return t[1] ~= t[2]", 0},
  {"self cycle", NULL, "local t = {} t.self = t return t",
   "local t = ... return t.self == t", 0},
  {"shared tables", NULL,
   "local a = {1} local t = {} t.self = t return {a, a, t}, t, a",
   "local u, t, a = ...\n"
   "return u[1] == u[2] and u[1] == a and u[3] == t and t.self == t and a[1] == 1", 0},
  {"mutual cycle", NULL, "local a, b = {}, {} a.b = b b.a = a return a, b",
   "local a, b = ... return a.b == b and b.a == a and a ~= b", 0},
  {"key cycle", NULL, "local t = {} t[t] = t return t",
   "local t = ... return next(t) == t and t[t] == t", 0},
  {"C functions", NULL,
   "return print, math.sin, string.format, io.write, table.insert, require",
   "local p, s, f, w, i, r = ...\n"
   "return p == print and s == math.sin and f == string.format and w == io.write\n"
   "  and i == table.insert and r == require", 0},
  {"library tables", NULL,
   "return string, math, _G, _ENV, {s = string, g = _G, io = io}, package.loaded.table",
   "local s, m, g, e, t, tb = ...\n"
   "return s == string and m == math and g == _G and e == _G and t.s == string\n"
   "  and t.g == _G and t.io == io and tb == table", 0},
  {"global C function alias", NULL, "myalias = string.len return string.len",
   "return (...) == string.len", 0},
  {"function", NULL, "return function(a, b) return a + b end",
   "local f = ... return f(2, 3) == 5", CODE},
  {"closure", NULL, "local base = 10 return function(x) return base + x end",
   "local f = ... return f(5) == 15", CODE},
  {"nil upvalue", NULL, "local x return function() return x end",
   "local f = ... return f() == nil", CODE},
  {"shared upvalues", NULL,
   "local n = 0\n"
   "local function inc() n = n + 1 end\n"
   "local function get() return n end\n"
   "return inc, get",
   "local inc, get = ... inc() inc() return get() == 2", CODE},
  {"shared upvalues in a table", NULL,
   "local n = 0\n"
   "local function inc() n = n + 1 end\n"
   "local function get() return n end\n"
   "return {inc, get}",
   "local t = ... t[1]() t[1]() return t[2]() == 2", CODE},
  {"upvalue shared with an argument", NULL,
   "local t = {n = 1} local function f() t.n = t.n + 1 return t.n end return f, t",
   "local f, t = ... f() return t.n == 2", CODE},
  {"recursion", NULL,
   "local function fact(n) if n <= 1 then return 1 end return n * fact(n - 1) end\n"
   "return fact",
   "local f = ... return f(10) == 3628800", CODE},
  {"mutual recursion", NULL,
   "local even, odd\n"
   "function even(n) if n == 0 then return true end return odd(n - 1) end\n"
   "function odd(n) if n == 0 then return false end return even(n - 1) end\n"
   "return even",
   "local even = ... return even(10) == true and even(7) == false", CODE},
  {"_ENV rebinds", "whoami = 'B'",
   "whoami = 'A' return function() return whoami end",
   "local f = ... return f() == 'B'", CODE},
  {"_G upvalue rebinds", "whoami = 'B'",
   "whoami = 'A' local G = _G return function() return G.whoami end",
   "local f = ... return f() == 'B'", CODE},
  {"_ENV proxy rebinds", "whoami = 'B'",
   "whoami = 'A' local env = setmetatable({}, {__index = _G})\n"
   "return load('return whoami', '=chunk', 't', env)",
   "local f = ... return f() == 'B'", CODE},
  {"plain _ENV table is copied", "whoami = 'B'",
   "return load('return whoami', '=chunk', 't', {whoami = 'env'})",
   "local f = ... return f() == 'env'", CODE},
  {"C function upvalue", NULL,
   "local fmt = string.format return function(x) return fmt('%d!', x) end",
   "local f = ... return f(3) == '3!'", CODE},
  {"nested closure", NULL,
   "local x = 1 return function() return function() x = x + 1 return x end end",
   "local f = ... local g = f() g() return g() == 3", CODE},
  {"line numbers", NULL, "return function()\n\n  error('boom')\nend",
   "local f = ... local ok, e = pcall(f) return not ok and e:find('sender:3: boom', 1, true)",
   CODE},
  {"registered metatable",
   "Point = {__index = {sum = function(p) return p.x + p.y end}}\n"
   "register_metatable('Point', Point)",
   "local mt = {} register_metatable('Point', mt)\n"
   "return setmetatable({x = 1, y = 2}, mt), {setmetatable({x = 3, y = 4}, mt)}",
   "local p, t = ...\n"
   "return getmetatable(p) == Point and p:sum() == 3 and t[1]:sum() == 7", 0},
  {"re-registered metatable", "register_metatable('B', {})",
   "local m1, m2 = {}, {} register_metatable('A', m1) register_metatable('A', m2)\n"
   "register_metatable('B', m2) return setmetatable({}, m2)",
   "return true", 0},
};

/* Encoding fails with code and exactly msg (or, if prefix, msg starts it). */
static void encode_error(const char *src, int code, const char *msg, int prefix) {
  lua_State *A = new_state();
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  lparB_append(&b, "xyz", 3);
  int rc = encode_src(A, src, &b, err);
  CHECKF(rc == code, "%s: code %d, want %d (%s)", src, rc, code, err);
  int same = prefix ? strncmp(err, msg, strlen(msg)) == 0 : strcmp(err, msg) == 0;
  CHECKF(same, "%s:\n  got  '%s'\n  want '%s'", src, err, msg);
  CHECKF(b.len == 3 && memcmp(b.data, "xyz", 3) == 0, "failed encode changed the buffer");
  lparB_free(&b);
  lua_close(A);
}

static void test_encode_errors(void) {
  encode_error("local fh = io.stdout; local function f() return fh end; return f",
               LPAR_EUNSENDABLE, "cannot send args[1].upvalue 'fh': userdata FILE*", 0);
  encode_error("return io.stdout", LPAR_EUNSENDABLE, "cannot send args[1]: userdata FILE*", 0);
  encode_error("return coroutine.create(print)", LPAR_EUNSENDABLE,
               "cannot send args[1]: coroutine", 0);
  encode_error("return 1, coroutine.wrap(function() end)", LPAR_EUNSENDABLE,
               "cannot send args[2]: C function with no known name", 0);
  encode_error("return setmetatable({}, {})", LPAR_EUNSENDABLE,
               "cannot send args[1]: table has a metatable that is not registered "
               "(lpar.register_metatable(name, mt))", 0);
  encode_error("local m1, m2 = {}, {} register_metatable('A', m1) register_metatable('A', m2)\n"
               "return setmetatable({}, m1)", LPAR_EUNSENDABLE,
               "cannot send args[1]: table has a metatable that is not registered", 1);
  encode_error("return {data = {1, 2, coroutine.create(print)}}", LPAR_EUNSENDABLE,
               "cannot send args[1].data[3]: coroutine", 0);
  encode_error("return 1, {['a b'] = io.stdout}", LPAR_EUNSENDABLE,
               "cannot send args[2][\"a b\"]: userdata FILE*", 0);
  encode_error("return {['end'] = io.stdout}", LPAR_EUNSENDABLE,
               "cannot send args[1][\"end\"]: userdata FILE*", 0);
  encode_error("return {[io.stdout] = 1}", LPAR_EUNSENDABLE,
               "cannot send args[1][key <userdata>]: userdata FILE*", 0);
  encode_error("return {[{coroutine.create(print)}] = 1}", LPAR_EUNSENDABLE,
               "cannot send args[1][key <table>][1]: coroutine", 0);
  encode_error("return {[true] = {[2.5] = io.stdout}}", LPAR_EUNSENDABLE,
               "cannot send args[1][true][2.5]: userdata FILE*", 0);
  encode_error("local co = coroutine.create(print) return {cb = function() return co end}",
               LPAR_EUNSENDABLE, "cannot send args[1].cb.upvalue 'co': coroutine", 0);
  /* The error happens after a lot was written: the buffer must still be cut back. */
  encode_error("return string.rep('x', 100000), {1, 2, 3, io.stdout}", LPAR_EUNSENDABLE,
               "cannot send args[2][4]: userdata FILE*", 0);

  lua_State *A = new_state();
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  lua_pushinteger(A, 1);
  lua_pushlightuserdata(A, &b);
  int rc = lparS_encode(A, 1, 2, "args", &b, err, sizeof err);
  CHECK(rc == LPAR_EUNSENDABLE && strcmp(err, "cannot send args[2]: light userdata") == 0);
  CHECK(lua_gettop(A) == 2 && b.len == 0);
  /* A relative first index, and another root name. */
  lua_pushnil(A);
  lua_pushstring(A, "x");
  rc = lparS_encode(A, -2, 2, "results", &b, err, sizeof err);
  CHECKF(rc == 0, "relative index: %s", err);
  CHECK(lua_gettop(A) == 4);
  rc = lparS_encode(A, 1, 3, "results", &b, err, sizeof err);
  CHECK(rc == LPAR_EUNSENDABLE && strcmp(err, "cannot send results[2]: light userdata") == 0);
  CHECK(lparS_encode(A, 4, 2, "x", &b, err, sizeof err) == LPAR_EINVAL);
  CHECK(lparS_encode(A, 1, -1, "x", &b, err, sizeof err) == LPAR_EINVAL);
  /* register_metatable checks its arguments. */
  CHECK(run(A, "assert(not pcall(register_metatable, 1))\n"
               "assert(not pcall(register_metatable, 'x', 5))\n"
               "assert(not pcall(register_metatable, '', {}))\n"
               "assert(select('#', register_metatable('ok', {})) == 0)") == 0);
  lparB_free(&b);
  lua_close(A);
}

/* Exact bytes for a few values: the format is a contract between versions. */
static void test_bytes(void) {
  lua_State *A = new_state();
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  int rc = encode_src(A, "return 1, 'a', true, nil, -1, 200, {7, k = false}, 0.5", &b, err);
  static const unsigned char want[] = {
    0x01, 0x08, 0x81, 0x41, 'a', 0x02, 0x00, 0x03, 0x01, 0x03, 0x90, 0x03,
    0x06, 0x01, 0x87, 0x41, 'k', 0x01, 0x0e,
    0x04, 0, 0, 0, 0, 0, 0, 0xe0, 0x3f};
  CHECK(rc == 0 && b.len == sizeof want && memcmp(b.data, want, sizeof want) == 0);
  lparB_free(&b);
  lua_close(A);
}

static void test_rebuild_names(void) {
  lua_State *A = new_state(), *B = new_state();
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  /* The index is built by the first encode; a global set later is found on a rebuild. */
  CHECK(encode_src(A, "return print", &b, err) == 0);
  b.len = 0;
  int rc = encode_src(A, "newfn = coroutine.wrap(function() end) return newfn", &b, err);
  CHECKF(rc == 0, "rebuild: %s", err);
  int n;
  rc = lparS_decode(B, b.data, b.len, 0, &n, err, sizeof err);
  CHECK(rc == LPAR_EBADMSG && strstr(err, "unknown C function 'newfn'") != NULL);
  CHECK(lua_gettop(B) == 0);
  /* A module loaded since the index was built goes by name. */
  b.len = 0;
  rc = encode_src(A, "package.loaded.mymod = {f = string.rep} return mymod or package.loaded.mymod,"
                     " package.loaded.mymod.f", &b, err);
  CHECKF(rc == 0, "new module: %s", err);
  CHECK(run(B, "package.loaded.mymod = {}") == 0);
  rc = lparS_decode(B, b.data, b.len, 0, &n, err, sizeof err);
  CHECKF(rc == 0 && n == 2, "new module decode: %s", err);
  if (rc == 0) verify(B, n, "local m, f = ... return m == package.loaded.mymod and f == string.rep",
                      "new module");
  lparB_free(&b);
  lua_close(A);
  lua_close(B);
}

static const char *nest_src(int n) {
  static char src[200];
  snprintf(src, sizeof src,
           "local t = {} local cur = t for i = 2, %d do local n = {} cur[1] = n cur = n end\n"
           "return t", n);
  return src;
}

static void test_depth(void) {
  lua_State *A = new_state(), *B = new_state();
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  int rc = encode_src(A, nest_src(LPAR_MAX_DEPTH), &b, err);
  CHECKF(rc == 0, "depth %d: %s", LPAR_MAX_DEPTH, err);
  int n;
  rc = lparS_decode(B, b.data, b.len, 0, &n, err, sizeof err);
  CHECKF(rc == 0 && n == 1, "decode depth %d: %s", LPAR_MAX_DEPTH, err);
  lua_settop(B, 0);
  b.len = 0;
  rc = encode_src(A, nest_src(LPAR_MAX_DEPTH + 1), &b, err);
  CHECKF(rc == LPAR_EDEPTH && strstr(err, "nesting deeper than 200") &&
         strncmp(err, "cannot send args[1][1][1]", 25) == 0 && strstr(err, "..."),
         "depth %d: %d %s", LPAR_MAX_DEPTH + 1, rc, err);
  CHECK(b.len == 0);
  /* Functions count as nesting too. */
  b.len = 0;
  rc = encode_src(A, "local f = function() return 1 end\n"
                     "for i = 1, 250 do local g = f f = function() return g end end return f",
                  &b, err);
  CHECKF(rc == LPAR_EDEPTH, "function depth: %d %s", rc, err);
  /* A hand-made input one level too deep, and one at the limit. */
  for (int depth = LPAR_MAX_DEPTH; depth <= LPAR_MAX_DEPTH + 1; depth++) {
    b.len = 0;
    lparB_append(&b, "\x01\x01", 2);
    for (int i = 1; i < depth; i++) lparB_append(&b, "\x06\x01", 2);
    lparB_append(&b, "\x06\x00", 2);
    for (int i = 0; i < depth; i++) lparB_append(&b, "\x0e", 1);
    rc = lparS_decode(B, b.data, b.len, 0, &n, err, sizeof err);
    if (depth == LPAR_MAX_DEPTH) {
      CHECKF(rc == 0 && n == 1, "decode at the limit: %s", err);
    } else {
      CHECKF(rc == LPAR_EBADMSG && strstr(err, "nesting deeper than 200"), "too deep: %s", err);
    }
    lua_settop(B, 0);
  }
  lparB_free(&b);
  lua_close(A);
  lua_close(B);
}

/* Decoding bytes fails with EBADMSG, a message containing msg, and no stack change. */
static void decode_error(const char *what, const void *p, size_t len, unsigned flags,
                         const char *msg) {
  lua_State *B = new_state();
  char err[ERRLEN];
  int n = -1;
  lua_pushliteral(B, "sentinel");
  int rc = lparS_decode(B, p, len, flags, &n, err, sizeof err);
  CHECKF(rc == LPAR_EBADMSG, "%s: code %d (%s)", what, rc, err);
  CHECKF(strstr(err, msg) != NULL, "%s: message '%s' lacks '%s'", what, err, msg);
  CHECKF(lua_gettop(B) == 1 && n == 0, "%s: stack changed", what);
  lua_close(B);
}

#define DECODE_ERROR(what, bytes, flags, msg) \
  decode_error(what, bytes, sizeof(bytes) - 1, flags, msg)

static void test_decode_errors(void) {
  decode_error("empty", "", 0, 0, "empty input");
  DECODE_ERROR("version", "\x02\x00", 0, "unsupported encoding version 2");
  DECODE_ERROR("huge count", "\x01\x80\x80\x80\x80\x80\x80\x01\x00\x00\x00", 0,
               "bad value count 4398046511104");
  DECODE_ERROR("huge string", "\x01\x01\x05\x80\x80\x80\x80\x80\x20", 0,
               "bad string length 1099511627776 at offset 2 (only 0 bytes left)");
  DECODE_ERROR("short string", "\x01\x01\x45" "abc", 0, "bad string length 5 at offset 2");
  DECODE_ERROR("huge array", "\x01\x01\x06\x80\x80\x80\x80\x80\x20\x00", 0,
               "bad array length 1099511627776");
  DECODE_ERROR("huge bytecode", "\x01\x01\x0a\x80\x80\x80\x80\x80\x20", CODE,
               "bad bytecode length");
  DECODE_ERROR("huge name", "\x01\x01\x0c\xff\xff\xff\xff\x0f", 0, "bad name length");
  DECODE_ERROR("varint", "\x01\x01\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", 0,
               "varint too long");
  DECODE_ERROR("varint 11 bytes", "\x01\x01\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
               0, "varint too long");
  DECODE_ERROR("unknown tag", "\x01\x01\x7f", 0, "unknown tag 0x7f at offset 2");
  DECODE_ERROR("unknown tag 0x12", "\x01\x02\x00\x12", 0, "unknown tag 0x12 at offset 3");
  DECODE_ERROR("matrix from memfd without descriptors", "\x01\x01\x0f\x02\x02\x01\x00\x00", 0,
               "but 0 descriptors came");
  DECODE_ERROR("matrix bigger than its bytes", "\x01\x01\x0f\x02\x02\x00\x00", 0,
               "2x2 at offset 2: only 1 bytes left");
  DECODE_ERROR("trailing", "\x01\x01\x00\x00", 0, "trailing bytes at offset 3 (1 bytes)");
  DECODE_ERROR("missing count", "\x01\x02\x00", 0, "bad value count 2 at offset 1");
  DECODE_ERROR("missing value", "\x01\x01\x06\x00\x81", 0, "truncated input at offset 5");
  DECODE_ERROR("truncated float", "\x01\x01\x04\x00\x00", 0, "truncated float");
  DECODE_ERROR("ref 0", "\x01\x01\x08\x00", 0, "bad reference 0");
  DECODE_ERROR("ref ahead", "\x01\x01\x06\x00\x08\x02\x00\x0e", 0, "bad reference 2");
  DECODE_ERROR("ref none", "\x01\x01\x08\x01", 0, "bad reference 1");
  DECODE_ERROR("join outside", "\x01\x01\x0b\x01\x01", 0, "upvalue join outside a function");
  DECODE_ERROR("end outside", "\x01\x01\x0e", 0, "table end outside a table");
  DECODE_ERROR("nil key", "\x01\x01\x06\x00\x00\x81\x0e", 0, "nil table key at offset 4");
  DECODE_ERROR("NaN key", "\x01\x01\x06\x00\x04\x00\x00\x00\x00\x00\x00\xf8\x7f\x81\x0e", 0,
               "NaN table key");
  DECODE_ERROR("unclosed table", "\x01\x01\x06\x01\x81", 0, "truncated table");
  DECODE_ERROR("bytecode refused", "\x01\x01\x0a\x03" "abc\x00", 0,
               "bytecode not allowed from this peer");
  DECODE_ERROR("bad bytecode", "\x01\x01\x0a\x03" "abc\x00", CODE, "bad bytecode at offset 2");
  DECODE_ERROR("text chunk", "\x01\x01\x0a\x08" "return 1\x00", CODE, "text chunk");
  DECODE_ERROR("unknown C function", "\x01\x01\x0c\x06" "nosuch", 0,
               "unknown C function 'nosuch' at offset 2");
  DECODE_ERROR("not a function", "\x01\x01\x0c\x06" "string", 0, "unknown C function 'string'");
  DECODE_ERROR("unknown library", "\x01\x01\x0d\x05" "nomod", 0, "unknown library table 'nomod'");
  DECODE_ERROR("not a module", "\x01\x01\x0d\x11" "package.searchers", 0,
               "unknown library table 'package.searchers'");
  DECODE_ERROR("unknown metatable", "\x01\x01\x07\x05" "Point\x00\x0e", 0,
               "unknown metatable 'Point' at offset 2");
  DECODE_ERROR("bad metatable name", "\x01\x01\x07\x09" "Po", 0, "bad metatable name length 9");
}

/* Functions made by hand from an encoding: joins and upvalue counts checked. */
static void test_decode_function_errors(void) {
  lua_State *A = new_state();
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  int rc = encode_src(A, "local x = 1 local t = {}\n"
                         "local function f() return x end local function g() return x end\n"
                         "return t, f, g", &b, err);
  /* ... g's only upvalue joins upvalue 1 of f, reference 2. */
  if (CHECKF(rc == 0 && b.len > 3 && memcmp(b.data + b.len - 3, "\x0b\x02\x01", 3) == 0,
             "join layout: %s", err)) {
    lua_State *B = new_state();
    int n;
    rc = lparS_decode(B, b.data, b.len, CODE, &n, err, sizeof err);
    CHECKF(rc == 0 && n == 3, "joined: %s", err);
    lua_close(B);
    b.data[b.len - 1] = 5;
    decode_error("join upvalue 5", b.data, b.len, CODE, "bad upvalue number 5");
    b.data[b.len - 1] = 0;
    decode_error("join upvalue 0", b.data, b.len, CODE, "bad upvalue number 0");
    b.data[b.len - 1] = 1;
    b.data[b.len - 2] = 1;
    decode_error("join a table", b.data, b.len, CODE, "upvalue join with a non-function");
    b.data[b.len - 2] = 9;
    decode_error("join nowhere", b.data, b.len, CODE, "bad reference 9");
  }
  b.len = 0;
  rc = encode_src(A, "return function() return 1 end", &b, err);
  if (CHECK(rc == 0 && b.data[b.len - 1] == 0)) {
    b.data[b.len - 1] = 1;
    lparB_append(&b, "\x00", 1);
    decode_error("upvalue count", b.data, b.len, CODE, "has 0 upvalues, not 1");
  }
  lparB_free(&b);
  lua_close(A);
}

/* Encode what src returns for `engine` with sender s, committed; the tag of its first value. */
static int encode_for(lua_State *A, lparF_sender *s, int engine, int ref, lparB_buffer *b) {
  char err[ERRLEN];
  b->len = 0;
  lua_rawgeti(A, LUA_REGISTRYINDEX, ref);
  int top = lua_gettop(A);
  int rc = lparS_encode_for(A, top, 1, "args", b, NULL, s, engine, err, sizeof err);
  lua_settop(A, top - 1);
  if (!CHECKF(rc == 0 && b->len > 2, "encode_for: %s", err)) return -1;
  lparF_commit(s, engine);
  return (unsigned char)b->data[2];
}

/* Decode b in B and call the function with 4: its result, or -1. */
static lua_Integer call_decoded(lua_State *B, const lparB_buffer *b, char *err) {
  int n = 0;
  if (lparS_decode(B, b->data, b->len, CODE, &n, err, ERRLEN) != 0 || n != 1) return -1;
  lua_pushinteger(B, 4);
  if (lua_pcall(B, 1, 1, 0) != LUA_OK) return -1;
  lua_Integer v = lua_tointeger(B, -1);
  lua_pop(B, 1);
  return v;
}

/* A function goes once per engine (FUNCSET), then by its slot (FUNCREF). */
static void test_function_slots(void) {
  lua_State *A = new_state(), *B = new_state(), *C = new_state();
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  lparF_sender s;
  lparF_init(&s);
  run(A, "local k = 3 return function(x) return x + k end");
  int ref = luaL_ref(A, LUA_REGISTRYINDEX);
  CHECKF(encode_for(A, &s, 0, ref, &b) == 0x10, "first send sets the slot");
  CHECKF(call_decoded(B, &b, err) == 7, "set: %s", err);
  CHECKF(encode_for(A, &s, 0, ref, &b) == 0x11, "second send names the slot");
  CHECKF(call_decoded(B, &b, err) == 7, "named: %s", err);
  CHECKF(lparF_received(B) == 1, "one body received, not %lld", (long long)lparF_received(B));
  /* Elsewhere the slot means nothing: a clear error, nothing pushed. */
  decode_error("slot not kept", b.data, b.len, CODE, "is not kept here");
  CHECKF(call_decoded(C, &b, err) == -1 && strstr(err, "send the function again"), "C: %s", err);
  CHECKF(encode_for(A, &s, 1, ref, &b) == 0x10, "another engine gets it set");
  lparF_forget_engine(&s, 0);
  CHECKF(encode_for(A, &s, 0, ref, &b) == 0x10, "a restarted engine gets it set again");
  /* A message that was not sent leaves the engine knowing nothing new. */
  lparF_forget_engine(&s, 2);
  lua_rawgeti(A, LUA_REGISTRYINDEX, ref);
  b.len = 0;
  lparS_encode_for(A, lua_gettop(A), 1, "args", &b, NULL, &s, 2, err, sizeof err);
  lua_pop(A, 1);
  lparF_discard(&s);
  CHECKF(encode_for(A, &s, 2, ref, &b) == 0x10, "an unsent slot is set again");
  DECODE_ERROR("slot refused", "\x01\x01\x11" "12345678\x00\x00", 0, "bytecode not allowed");
  DECODE_ERROR("slot truncated", "\x01\x01\x11" "1234", CODE, "truncated function slot");
  DECODE_ERROR("slot too big", "\x01\x01\x11" "12345678\x40\x00", CODE, "bad function slot 64");
  DECODE_ERROR("set without code", "\x01\x01\x10" "12345678\x00\x09", CODE, "bad bytecode length 9");
  lparF_free(&s);
  lparB_free(&b);
  lua_close(A);
  lua_close(B);
  lua_close(C);
}

/* A value of every kind, for the prefix and corruption tests. */
static const char *const rich_src =
  "local mt = {} register_metatable('P', mt)\n"
  "local t = {1, 2.5, 'three', {x = {y = true}}, [-7] = false, [0.25] = 'q'}\n"
  "t.self = t t[t] = 'key'\n"
  "return t, string.rep('s', 40), setmetatable({n = 1}, mt), string, print, _G, t,\n"
  "  math.mininteger, 0/0";

static const char *const code_src =
  "local n = 0 local mt = {} register_metatable('P', mt)\n"
  "local function inc() n = n + 1 return setmetatable({n}, mt) end\n"
  "local function get() return n, inc, print end\n"
  "return {inc, get, t = {get}}, inc";

/* Every proper prefix of a valid encoding fails cleanly. */
static void test_prefixes(const char *src, unsigned flags) {
  lua_State *A = new_state(), *B = new_state();
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  CHECK(run(B, "register_metatable('P', {})") == 0);
  int rc = encode_src(A, src, &b, err);
  CHECKF(rc == 0, "prefix source: %s", err);
  int bad = 0, n;
  for (size_t len = 0; len < b.len; len++) {
    rc = lparS_decode(B, b.data, len, flags, &n, err, sizeof err);
    if (rc != LPAR_EBADMSG || lua_gettop(B) != 0 || err[0] == '\0') bad++;
    lua_settop(B, 0);
  }
  CHECKF(bad == 0, "%d of %zu prefixes did not fail cleanly", bad, b.len);
  rc = lparS_decode(B, b.data, b.len, flags, &n, err, sizeof err);
  CHECKF(rc == 0, "whole: %s", err);
  lparB_free(&b);
  lua_close(A);
  lua_close(B);
}

/*
** Every single-byte change of a valid encoding decodes or fails cleanly;
** what decodes encodes again and decodes again.
*/
static void test_corruption(void) {
  lua_State *A = new_state(), *B = new_state();
  char err[ERRLEN];
  lparB_buffer b, again;
  lparB_init(&b);
  lparB_init(&again);
  CHECK(run(B, "register_metatable('P', {})") == 0);
  int rc = encode_src(A, rich_src, &b, err);
  CHECKF(rc == 0, "corruption source: %s", err);
  static const unsigned char masks[] = {0x01, 0x02, 0x04, 0x10, 0x40, 0x80, 0xff};
  int bad = 0, decoded = 0, n, n2;
  for (size_t i = 0; i < b.len; i++) {
    for (size_t m = 0; m < sizeof masks; m++) {
      b.data[i] ^= masks[m];
      rc = lparS_decode(B, b.data, b.len, 0, &n, err, sizeof err);
      if (rc == 0) {
        decoded++;
        again.len = 0;
        rc = lparS_encode(B, 1, n, "args", &again, err, sizeof err);
        if (rc == 0) rc = lparS_decode(B, again.data, again.len, 0, &n2, err, sizeof err);
        if (rc != 0 || n2 != n) bad++;
      } else if (rc != LPAR_EBADMSG || lua_gettop(B) != 0) {
        bad++;
      }
      lua_settop(B, 0);
      b.data[i] ^= masks[m];
    }
  }
  CHECKF(bad == 0, "%d corrupted inputs misbehaved (%d decoded)", bad, decoded);
  lparB_free(&b);
  lparB_free(&again);
  lua_close(A);
  lua_close(B);
}

/* Two tuples appended to one buffer; the decoder reads one at an offset. */
static void test_append(void) {
  lua_State *A = new_state(), *B = new_state();
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  CHECK(encode_src(A, "return 'first'", &b, err) == 0);
  size_t at = b.len;
  CHECK(encode_src(A, "return 'second', 2", &b, err) == 0);
  int n;
  int rc = lparS_decode(B, b.data + at, b.len - at, 0, &n, err, sizeof err);
  CHECK(rc == 0 && n == 2 && strcmp(lua_tostring(B, 1), "second") == 0);
  rc = lparS_decode(B, b.data, b.len, 0, &n, err, sizeof err);
  CHECK(rc == LPAR_EBADMSG && strstr(err, "trailing bytes at offset 8"));
  CHECK(lua_gettop(B) == 2);
  lparB_free(&b);
  lua_close(A);
  lua_close(B);
}

/* ------------------------------------------------------------------ bench */

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void bench_one(lua_State *L, const char *what, const char *src, int reps) {
  char err[ERRLEN];
  lparB_buffer b;
  lparB_init(&b);
  if (run(L, src) != 1) return;
  double t0 = now();
  for (int i = 0; i < reps; i++) {
    b.len = 0;
    if (lparS_encode(L, 1, 1, "args", &b, err, sizeof err) != 0) printf("encode: %s\n", err);
  }
  double t1 = now();
  int n;
  for (int i = 0; i < reps; i++) {
    if (lparS_decode(L, b.data, b.len, 0, &n, err, sizeof err) != 0) printf("decode: %s\n", err);
    lua_settop(L, 1);
  }
  double t2 = now();
  double mb = (double)b.len / 1e6;
  printf("%-28s %9zu bytes  encode %7.2f ms %8.0f MB/s   decode %7.2f ms %8.0f MB/s\n", what,
         b.len, (t1 - t0) / reps * 1e3, mb * reps / (t1 - t0), (t2 - t1) / reps * 1e3,
         mb * reps / (t2 - t1));
  lua_settop(L, 0);
  lparB_free(&b);
}

static int bench(void) {
  lua_State *L = new_state();
  bench_one(L, "1e6 integers (1..1e6)", "local t = {} for i = 1, 1e6 do t[i] = i end return t", 20);
  bench_one(L, "1e6 small integers (0..99)",
            "local t = {} for i = 1, 1e6 do t[i] = i % 100 end return t", 20);
  bench_one(L, "1e6 floats", "local t = {} for i = 1, 1e6 do t[i] = i + 0.5 end return t", 20);
  bench_one(L, "2 MiB string", "return string.rep('abcdefgh', 2^18)", 200);
  bench_one(L, "1e5 records {id,name,tags}",
            "local t = {} for i = 1, 1e5 do t[i] = {id = i, name = 'n' .. i, tags = {'a', 'b'}} end\n"
            "return t", 5);
  lua_close(L);
  return 0;
}

/* ----------------------------------------------------------------- corpus */

/* Seeds for fuzz_decode, encoded in a state like the fuzzer's ('P' registered). */
static int write_corpus(const char *dir) {
  static const char *const seeds[][2] = {
    {"scalars", "return nil, false, true, 0, 127, 128, -1, math.mininteger, math.maxinteger"},
    {"floats", "return 3.0, -0.0, 0/0, math.huge, -math.huge, 0.1, 5e-324"},
    {"strings", "return '', 'a\\0b', string.rep('x', 31), string.rep('y', 32), '\\255\\1'"},
    {"array", "local t = {} for i = 1, 40 do t[i] = i * 1000 end t[50] = 'x' return t"},
    {"hash", "return {x = 1, y = 2.5, ['a b'] = 'c', [true] = false, [1.5] = {}, [-3] = 4}"},
    {"nested", "return {a = {b = {c = {1, 2, {d = 'deep'}}}}}"},
    {"cycles", "local t = {} t.self = t t[t] = t local a = {1} return {a, a, t}, t, a"},
    {"named", "return print, math.sin, string.format, io.write, string, math, _G, {s = string}"},
    {"metatable", "local mt = {} register_metatable('P', mt)\n"
                  "local p = setmetatable({x = 1}, mt) return p, {p, setmetatable({}, mt)}"},
    {"function", "local n = 0 local function inc() n = n + 1 end\n"
                 "local function get() return n end return inc, get"},
    {"records", "local t = {} for i = 1, 8 do t[i] = {id = i, name = 'n' .. i} end return t"},
    {"holes", "return {1, nil, 3, nil, 5}, {[1] = 1, [3] = 3}"},
    {"deep", "local t = {} local c = t for i = 2, 60 do local n = {} c[1] = n c = n end return t"},
  };
  lua_State *A = new_state();
  char err[ERRLEN], path[512];
  lparB_buffer b;
  lparB_init(&b);
  int failed = 0;
  for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
    b.len = 0;
    if (encode_src(A, seeds[i][1], &b, err) != 0) {
      printf("seed %s: %s\n", seeds[i][0], err);
      failed = 1;
      continue;
    }
    snprintf(path, sizeof path, "%s/%02zu-%s.bin", dir, i + 1, seeds[i][0]);
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(b.data, 1, b.len, f) != b.len || fclose(f) != 0) {
      printf("cannot write %s\n", path);
      failed = 1;
    }
  }
  lparB_free(&b);
  lua_close(A);
  return failed;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--bench") == 0) return bench();
  if (argc > 2 && strcmp(argv[1], "--corpus") == 0) return write_corpus(argv[2]);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) roundtrip(&cases[i]);
  test_bytes();
  test_encode_errors();
  test_rebuild_names();
  test_depth();
  test_decode_errors();
  test_decode_function_errors();
  test_function_slots();
  test_prefixes(rich_src, 0);
  test_prefixes(code_src, CODE);
  test_corruption();
  test_append();
  return check_report();
}
