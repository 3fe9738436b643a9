/*
** test_matrix.c: tests of the matrix type's C interface (lua/binding/matrix.c).
**
** The Lua face is tested in spec/matrix_spec.lua; what is here is what Lua
** cannot reach (storage ownership, lparM_push/test/check, the metatable made
** on demand), plus a Lua chunk over every operation, so that the binding
** also runs under the sanitizer build, which has no busted.
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "check.h"
#include "matrix.h"

static lua_State *new_state(void) {
  lua_State *L = luaL_newstate();
  if (L == NULL) abort();
  luaL_openlibs(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, lparM_open);
  lua_setfield(L, -2, "lpar.matrix");
  lua_pop(L, 1);
  return L;
}

/* Run src; it must not fail. */
static int run(lua_State *L, const char *src, const char *name) {
  if (luaL_loadbuffer(L, src, strlen(src), name) != LUA_OK || lua_pcall(L, 0, 0, 0) != LUA_OK) {
    CHECKF(0, "%s: %s", name, lua_tostring(L, -1));
    lua_pop(L, 1);
    return 0;
  }
  return 1;
}

/* A storage whose release is counted in *(int *)ud. */
static void counted_release(lparM_storage *s) {
  (*(int *)s->ud)++;
  free(s->data);
  free(s);
}

static lparM_storage *counted_storage(size_t count, int *released) {
  lparM_storage *s = calloc(1, sizeof *s);
  s->data = calloc(count ? count : 1, sizeof(double));
  s->count = count;
  s->refs = 1;
  s->release = counted_release;
  s->ud = released;
  s->fd = -1;
  for (size_t k = 0; k < count; k++) s->data[k] = (double)k;
  return s;
}

static void test_storage(void) {
  lparM_storage *s = lparM_storage_new(100);
  CHECK(s != NULL && s->refs == 1 && s->count == 100 && s->fd == -1);
  CHECK(((uintptr_t)s->data & 63) == 0);
  int zero = 1;
  for (size_t k = 0; k < 100; k++) zero &= s->data[k] == 0;
  CHECK(zero);
  lparM_storage_retain(s);
  lparM_storage_release(s);
  CHECK(s->refs == 1);
  lparM_storage_release(s);
  lparM_storage *empty = lparM_storage_new(0);
  CHECK(empty != NULL && empty->count == 0);
  lparM_storage_release(empty);
  lparM_storage_release(NULL); /* allowed, like free(NULL) */
  CHECK(lparM_storage_new((size_t)1 << 41) == NULL);
  CHECK(lparM_storage_new(SIZE_MAX) == NULL);
}

static void test_views(void) {
  int released = 0;
  lparM_storage *s = counted_storage(12, &released);
  lparM_matrix m = {.st = s, .offset = 0, .rows = 3, .cols = 4, .stride = 4};
  CHECK(lparM_contiguous(&m));
  CHECK(*lparM_at(&m, 2, 1) == 9);
  lparM_matrix v = {.st = s, .offset = 5, .rows = 2, .cols = 2, .stride = 4};
  CHECK(!lparM_contiguous(&v));
  CHECK(*lparM_at(&v, 1, 1) == 10);
  v.rows = 1;
  CHECK(lparM_contiguous(&v));
  lparM_storage_release(s);
  CHECK(released == 1);
}

static int push_too_big(lua_State *L) {
  lparM_push(L, lua_touserdata(L, 1), 4, 4);
  return 1;
}

/* lparM_push works before lparM_open (it makes the metatable) and retains. */
static void test_push(void) {
  int released = 0;
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  lparM_storage *s = counted_storage(6, &released);
  lparM_matrix *a = lparM_push(L, s, 2, 3);
  CHECK(a != NULL && s->refs == 2 && a->stride == 3 && a->offset == 0);
  lparM_push(L, s, 3, 2);
  CHECK(s->refs == 3);
  lparM_storage_release(s);
  CHECK(lparM_test(L, -1) != NULL && lparM_test(L, -2) == a);
  lua_pushinteger(L, 1);
  CHECK(lparM_test(L, -1) == NULL);
  lua_newtable(L);
  luaL_setmetatable(L, LPARM_METATABLE);
  CHECK(lparM_test(L, -1) == NULL); /* a table is no matrix, whatever its metatable */
  lua_settop(L, 2);
  /* the metatable made by lparM_push is the one lparM_open fills and keeps */
  luaL_getmetatable(L, LPARM_METATABLE);
  const void *mt = lua_topointer(L, -1);
  lparM_open(L);
  lparM_open(L);
  luaL_getmetatable(L, LPARM_METATABLE);
  CHECK(lua_topointer(L, -1) == mt);
  lua_settop(L, 2);
  lua_getfield(L, 1, "shape"); /* methods work on a pushed matrix */
  lua_pushvalue(L, 1);
  lua_call(L, 1, 2);
  CHECK(lua_tointeger(L, -2) == 2 && lua_tointeger(L, -1) == 3);
  lua_settop(L, 2);
  lua_pushcfunction(L, push_too_big);
  lua_pushlightuserdata(L, s);
  CHECK(lua_pcall(L, 1, 1, 0) != LUA_OK);
  CHECKF(strstr(lua_tostring(L, -1), "4x4 matrix does not fit a storage of 6") != NULL, "%s",
         lua_tostring(L, -1));
  CHECK(released == 0);
  lua_close(L);
  CHECK(released == 1);
}

/* A closed matrix is no longer a matrix for lparM_test; its storage is gone. */
static void test_close(void) {
  int released = 0;
  lua_State *L = new_state();
  lparM_storage *s = counted_storage(4, &released);
  lparM_push(L, s, 2, 2);
  lparM_storage_release(s);
  lua_setglobal(L, "A");
  run(L,
      "local m = require 'lpar.matrix'\n"
      "local v = A:sub(1, 1)\n"
      "do local a <close> = A end\n"
      "assert(not m.ismatrix(A) and m.ismatrix(v))\n"
      "assert(not pcall(A.sum, A))\n"
      "assert(v:sum() == 1)\n"
      "A = nil\n",
      "=close");
  CHECK(released == 0); /* v still holds it */
  lua_gc(L, LUA_GCCOLLECT);
  CHECK(released == 1);
  lua_close(L);
}

/* Every operation once, checked, so the sanitizers see the binding. */
static const char *const everything =
  "local m = require 'lpar.matrix'\n"
  "local a = m.from{{1, 2, 3}, {4, 5, 6}}\n"
  "assert(a.rows == 2 and a.cols == 3 and #a == 2)\n"
  "local t = a:T()\n"
  "assert(t:get(3, 2) == 6)\n"
  "assert(a:dot(t) == m.from{{14, 32}, {32, 77}})\n"
  "assert(a:dot(m.ones(3, 1)) == m.from{{6}, {15}})\n"
  "assert(m.ones(1, 2):dot(a) == m.from{{5, 7, 9}})\n"
  "assert(m.zeros(2, 0):dot(m.zeros(0, 2)) == m.zeros(2, 2))\n"
  "local big = m.random(40, 50, 1)\n"
  "local v = big:sub(3, 30, 5, 44)\n"
  "assert(v:dot(v:T()):max_abs_diff(v:copy():dot(v:copy():T())) < 1e-12)\n"
  "assert(big:tile(4, 5, 11, 11).cols == 6)\n"
  "big:set_sub(2, 2, big:sub(1, 10, 1, 10))\n"
  "assert(big:get(2, 2) == m.random(40, 50, 1):get(1, 1))\n"
  "assert((a + a - a) == a and (2 * a) == (a * 2) and (-a):sum() == -21)\n"
  "assert(a:norm() == math.sqrt(91))\n"
  "assert(m.block{{a, a}, {a, a}}:sum() == 84)\n"
  "assert(m.eye(3):totable()[2][2] == 1)\n"
  "assert(m.new(2, 2, 3):sum() == 12)\n"
  "assert(tostring(m.random(100, 100)):find('...', 1, true))\n"
  "assert(tostring(m.zeros(0, 2)) == 'matrix(0x2)\\n[]')\n"
  "assert(m.random(300000, 1, 5):sum() > 0)\n"
  "assert(not pcall(m.new, 2^21, 2^20))\n"
  "assert(not pcall(function() return a:get(3, 1) end))\n"
  "assert(not pcall(m.from, {{1}, {1, 2}}))\n"
  "assert(not pcall(m.block, {{a, m.eye(3)}}))\n"
  "assert(m.blas_threads(1) == 1)\n";

static void test_everything(void) {
  lua_State *L = new_state();
  run(L, everything, "=everything");
  lua_close(L);
}

int main(void) {
  test_storage();
  test_views();
  test_push();
  test_close();
  test_everything();
  return check_report();
}
