/*
** fuzz_decode.c: libFuzzer target for lparS_decode.
**
** Each input is decoded without LPARS_ALLOW_CODE, as from a peer that is
** not trusted with bytecode (malformed bytecode can crash the Lua VM). What
** decodes must encode again and that must decode again. The stack must be
** as it was after a failure, and a failure must say why.
*/
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "lpar.h"
#include "serialize.h"

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  L = luaL_newstate();
  if (L == NULL) abort();
  luaL_openlibs(L);
  /* The seeds use a metatable named 'P' (see test_serialize --corpus). */
  lua_pushcfunction(L, lparS_register_metatable);
  lua_pushliteral(L, "P");
  lua_newtable(L);
  lua_call(L, 2, 0);
  return 0;
}

static void fail(const char *what, const char *err) {
  fprintf(stderr, "fuzz_decode: %s: %s\n", what, err);
  abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char err[256];
  int top = lua_gettop(L), n = -1, n2 = -1;
  int rc = lparS_decode(L, data, size, 0, &n, err, sizeof err);
  if (rc != 0) {
    if (rc != LPAR_EBADMSG || err[0] == '\0') fail("bad failure", err);
    if (lua_gettop(L) != top) fail("failed decode changed the stack", err);
    return 0;
  }
  if (lua_gettop(L) != top + n) fail("decode pushed a wrong count", "");
  lparB_buffer b;
  lparB_init(&b);
  rc = lparS_encode(L, top + 1, n, "args", &b, err, sizeof err);
  /*
  ** LPAR_EDEPTH is allowed: the depth of a shared object is where the walk
  ** meets it first, and the encoder walks hash parts in lua_next order, not
  ** in the order the input listed them; so a graph that decodes within the
  ** limit may be walked deeper.
  */
  if (rc != 0 && rc != LPAR_EDEPTH) fail("re-encode failed", err);
  if (rc == 0) {
    if (lua_gettop(L) != top + n) fail("encode changed the stack", "");
    rc = lparS_decode(L, b.data, b.len, 0, &n2, err, sizeof err);
    if (rc != 0 || n2 != n) fail("round trip failed", err);
  }
  lparB_free(&b);
  lua_settop(L, top);
  return 0;
}
