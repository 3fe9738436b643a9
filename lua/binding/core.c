/*
** core.c: lpar.core, the thin Lua binding over liblpar.
**
** It runs liblpar on luv's loop (luv_loop), so waiting on a result is
** running that loop and luv timers keep firing meanwhile. One type per
** file: lpar.cluster (cluster.c, engines local or behind a controller) and
** lpar.relay (relay.c, a controller's data plane); this file opens the
** module and holds its functions (the value encoding, keys, the clock).
** Engine events are decoded in C and handed to one Lua handler function per
** cluster; the policy (results, views, errors) lives in the Lua modules
** under lua/lpar. Recoverable failures return nil, message, code, as luv does.
*/
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <luv/luv.h>

#include "auth.h"
#include "binding.h"
#include "lpar.h"
#include "paths.h"
#include "route.h"
#include "serialize.h"

int lparC_push_error(lua_State *L, const char *message, int code) {
  lua_pushnil(L);
  lua_pushstring(L, message);
  lua_pushinteger(L, code);
  return 3;
}

int lparC_push_failure(lua_State *L, int code, const char *what) {
  lua_pushnil(L);
  if (what)
    lua_pushfstring(L, "%s: %s", what, lpar_strerror(code));
  else
    lua_pushstring(L, lpar_strerror(code));
  lua_pushinteger(L, code);
  return 3;
}

void lparC_unref(lua_State *L, int *ref) {
  if (*ref == LUA_NOREF) return;
  luaL_unref(L, LUA_REGISTRYINDEX, *ref);
  *ref = LUA_NOREF;
}

int lparC_traceback(lua_State *L) {
  luaL_traceback(L, L, luaL_tolstring(L, 1, NULL), 1);
  return 1;
}

static int l_keygen(lua_State *L) {
  unsigned char key[LPARA_KEY_BYTES];
  if (lparA_keygen(key) < 0) return lparC_push_failure(L, LPAR_ESYS, "no randomness");
  lua_pushlstring(L, (const char *)key, sizeof key);
  return 1;
}

static int l_encode(lua_State *L) {
  lparB_buffer b;
  char err[512];
  lparB_init(&b);
  int rc = lparS_encode(L, 1, lua_gettop(L), "value", &b, err, sizeof err);
  if (rc < 0) {
    lparB_free(&b);
    return lparC_push_error(L, err, rc);
  }
  lua_pushlstring(L, b.data, b.len);
  lparB_free(&b);
  return 1;
}

static int l_decode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  char err[512];
  int count = 0;
  int top = lua_gettop(L);
  /* core.decode(bytes, "data"): plain data only, no functions (no bytecode loaded). */
  const char *mode = luaL_optstring(L, 2, "any");
  unsigned flags = strcmp(mode, "data") == 0 ? 0 : LPARS_ALLOW_CODE;
  lua_settop(L, 1);
  top = 1;
  if (lparS_decode(L, s, n, flags, &count, err, sizeof err) < 0) {
    lua_settop(L, top);
    return lparC_push_error(L, err, LPAR_EBADMSG);
  }
  lua_pushboolean(L, 1);
  lua_insert(L, top + 1);
  return count + 1;
}

/* True while uv.run is running: a wait must not run the loop again then. */
static int l_loop_running(lua_State *L) {
  lua_pushboolean(L, luv_context(L)->mode >= 0);
  return 1;
}

static int l_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + ts.tv_nsec / 1e9);
  return 1;
}

/*
** luv's default callback handler prints "Uncaught Error" and exits the
** process; an error in a user's timer must not kill a prompt or a script's
** engines. Report it with its traceback and carry on.
*/
static int keep_going_pcall(lua_State *L, int nargs, int nresults, int flags) {
  (void)flags;
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, lparC_traceback);
  lua_insert(L, base);
  int rc = lua_pcall(L, nargs, nresults, base);
  if (rc != LUA_OK) {
    fprintf(stderr, "lpar: error in a luv callback: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  lua_remove(L, base);
  if (rc != LUA_OK) return -rc;
  return nresults == LUA_MULTRET ? lua_gettop(L) - base + 1 : nresults;
}

/*
** trim([bytes]): give freed heap back to the system (glibc keeps it), or
** only when more than `bytes` lie free in it and more lies free than is in
** use; true if some went. The second condition tells a heap that shrank (a
** big result released) from one churning at its size, whose free chunks
** malloc is about to hand out again: trimming that one costs a walk of the
** heap now and a page fault for every page later. It asks malloc, not Lua,
** so a finalizer may call it (collectgarbage may not).
*/
static int l_trim(lua_State *L) {
  lua_Integer at_least = luaL_optinteger(L, 1, 0);
  if (at_least > 0) {
    struct mallinfo2 mi = mallinfo2();
    if (mi.fordblks <= (size_t)at_least || mi.fordblks <= mi.uordblks) {
      lua_pushboolean(L, 0);
      return 1;
    }
  }
  lua_pushboolean(L, malloc_trim(0));
  return 1;
}

static const luaL_Reg functions[] = {
  {"encode", l_encode},
  {"decode", l_decode},
  {"register_metatable", lparS_register_metatable},
  {"keygen", l_keygen},
  {"loop_running", l_loop_running},
  {"now", l_now},
  {"trim", l_trim},
  {NULL, NULL}};

int luaopen_lpar_core(lua_State *L) {
  /*
  ** luv first, so luv_loop(L) is the loop its module made. Pin luv's module
  ** table (it holds the loop's userdata): if the loop were collected while
  ** a cluster is open (say, a test runner unloads modules), luv's finalizer
  ** would close our handles as if they were its own.
  */
  lua_getglobal(L, "require");
  lua_pushstring(L, "luv");
  lua_call(L, 1, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, "lpar.luv");
  luv_ctx_t *ctx = luv_context(L);
  if (ctx->cb_pcall == luv_cfpcall || ctx->cb_pcall == NULL) luv_set_callback(L, keep_going_pcall);

  lparR_ignore_sigpipe(); /* luv's own writes (pipes, sockets) must not kill the host either */
  luaL_newlib(L, functions);
  lparC_open_cluster(L);
  lparC_open_relay(L);
  lparC_open_hostrelay(L);
  static const struct {
    const char *name;
    int value;
  } types[] = {{"HELLO", LPAR_MSG_HELLO},     {"EXECUTE", LPAR_MSG_EXECUTE},
               {"APPLY", LPAR_MSG_APPLY},     {"PUSH", LPAR_MSG_PUSH},
               {"PULL", LPAR_MSG_PULL},       {"RESULT", LPAR_MSG_RESULT},
               {"ERROR", LPAR_MSG_ERROR},     {"EXIT", LPAR_MSG_EXIT},
               {"CONTROL", LPAR_MSG_CONTROL}, {"FLAG_RAW", LPAR_FLAG_RAW},
               {"SIGNAL", LPAR_MSG_SIGNAL},   {"INTERRUPT", LPAR_MSG_INTERRUPT},
               {"PING", LPAR_MSG_PING},
               {"STDOUT", LPAR_MSG_STDOUT},   {"STDERR", LPAR_MSG_STDERR},
               {"DISPLAY", LPAR_MSG_DISPLAY}, {"FLAG_INLINE", LPAR_FLAG_INLINE},
               {"ECLOSED", LPAR_ECLOSED},     {"EDEAD", LPAR_EDEAD},
               {"HEARTBEAT", LPAR_MSG_HEARTBEAT}, {"HEARTBEAT_MS", LPAR_HEARTBEAT_MS},
               {"ANY_ENGINE", LPAR_ANY_ENGINE},
               {"NOT_RESPONDING_BEATS", LPAR_NOT_RESPONDING_BEATS}};
  for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
    lua_pushinteger(L, types[i].value);
    lua_setfield(L, -2, types[i].name);
  }
  lua_pushstring(L, LPAR_VERSION);
  lua_setfield(L, -2, "version");
  lua_pushstring(L, lpar_default_engine_path());
  lua_setfield(L, -2, "engine_path");
  char path[4096];
  lua_pushstring(L, lparP_command_path(path, sizeof path));
  lua_setfield(L, -2, "command_path");
  return 1;
}
