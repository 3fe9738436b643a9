/*
** core.c: lpar.core, the thin Lua binding over liblpar.
**
** It runs liblpar on luv's loop (luv_loop), so waiting on a result is
** running that loop and luv timers keep firing meanwhile. Engine events are
** decoded here, in C, and handed to one Lua handler function per cluster;
** the policy (results, views, errors) lives in the Lua modules under lua/lpar.
** Recoverable failures return nil, message, code, as luv does.
*/
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <luv/luv.h>

#include "binding.h"
#include "lpar.h"
#include "matrix.h"
#include "serialize.h"

#define CLUSTER_MT "lpar.cluster"
#define STAMPS_SIZE (2 * sizeof(double))

typedef struct cluster_ud {
  lpar_cluster *c;
  lua_State *L;    /* main thread: callbacks run on it, as luv's do */
  int handler_ref; /* the Lua event handler */
  int raw;         /* hand messages over as bytes (a controller relays them) */
  uint64_t undecodable;
  lparB_buffer enc; /* reused for every send */
} cluster_ud;

int lparC_push_failure(lua_State *L, int code, const char *what) {
  lua_pushnil(L);
  if (what)
    lua_pushfstring(L, "%s: %s", what, lpar_strerror(code));
  else
    lua_pushstring(L, lpar_strerror(code));
  lua_pushinteger(L, code);
  return 3;
}

int lparC_traceback(lua_State *L) {
  luaL_traceback(L, L, luaL_tolstring(L, 1, NULL), 1);
  return 1;
}

/* Push the values of a RESULT/ERROR payload; returns how many, or -1. */
static int push_reply(uint64_t *undecodable, lua_State *L, const lpar_event *ev, char *err,
                      size_t errlen) {
  if (ev->flags & LPAR_FLAG_RAW) {
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushlstring(L, ev->payload, ev->len);
    return 3;
  }
  double stamps[2];
  if (ev->len < STAMPS_SIZE) {
    snprintf(err, errlen, "reply shorter than its timestamps");
    return -1;
  }
  memcpy(stamps, ev->payload, STAMPS_SIZE);
  lua_pushnumber(L, stamps[0]);
  lua_pushnumber(L, stamps[1]);
  int n = 0;
  lparS_shm shm = {.nfds = ev->nfds};
  for (int i = 0; i < ev->nfds; i++) shm.fds[i] = ev->fds[i];
  if (lparS_decode_shm(L, ev->payload + STAMPS_SIZE, ev->len - STAMPS_SIZE, LPARS_ALLOW_CODE,
                       &shm, &n, err, errlen) < 0) {
    lua_pop(L, 2);
    (*undecodable)++;
    return -1;
  }
  return n + 2;
}

static const char *message_kind(int type) {
  switch (type) {
  case LPAR_MSG_RESULT: return "result";
  case LPAR_MSG_ERROR: return "error";
  case LPAR_MSG_STDOUT: return "stdout";
  case LPAR_MSG_STDERR: return "stderr";
  case LPAR_MSG_DISPLAY: return "display";
  default: return NULL;
  }
}

int lparC_push_event(uint64_t *undecodable, lua_State *L, const lpar_event *ev) {
  char err[512];
  switch (ev->kind) {
  case LPAR_EV_READY:
    lua_pushstring(L, "ready");
    lua_pushinteger(L, ev->engine);
    lua_pushlstring(L, ev->payload, ev->len);
    return 3;
  case LPAR_EV_EXIT:
    lua_pushstring(L, "exit");
    lua_pushinteger(L, ev->engine);
    lua_pushinteger(L, ev->exit_status);
    lua_pushinteger(L, ev->term_signal);
    return 4;
  case LPAR_EV_BAD_MESSAGE:
    lua_pushstring(L, "bad");
    lua_pushinteger(L, ev->engine);
    lua_pushstring(L, ev->reason);
    return 3;
  case LPAR_EV_MESSAGE:
    break;
  }
  const char *kind = message_kind(ev->type);
  if (kind == NULL) { /* a valid frame of a type no engine should send */
    (*undecodable)++;
    kind = "undecodable";
    snprintf(err, sizeof err, "unexpected message type %d from an engine", ev->type);
  }
  lua_pushstring(L, kind);
  lua_pushinteger(L, ev->engine);
  lua_pushinteger(L, (lua_Integer)ev->id);
  if (ev->type == LPAR_MSG_STDOUT || ev->type == LPAR_MSG_STDERR) {
    lua_pushlstring(L, ev->payload, ev->len);
    return 4;
  }
  if (ev->type == LPAR_MSG_DISPLAY) {
    int n = 0;
    if (lparS_decode(L, ev->payload, ev->len, 0, &n, err, sizeof err) == 0) return 3 + n;
    (*undecodable)++;
    lua_pop(L, 3);
    lua_pushstring(L, "undecodable");
    lua_pushinteger(L, ev->engine);
    lua_pushinteger(L, (lua_Integer)ev->id);
  } else if (strcmp(kind, "undecodable") != 0) {
    if (!lua_checkstack(L, 8)) return -1;
    int n = push_reply(undecodable, L, ev, err, sizeof err);
    if (n >= 0) return 3 + n;
    lua_pop(L, 3);
    lua_pushstring(L, "undecodable");
    lua_pushinteger(L, ev->engine);
    lua_pushinteger(L, (lua_Integer)ev->id);
  }
  lua_pushstring(L, err);
  return 4;
}

/* Raw mode: messages as ("frame", engine, type, flags, id, payload). */
static int push_raw_event(lua_State *L, const lpar_event *ev) {
  if (ev->kind != LPAR_EV_MESSAGE) {
    uint64_t ignored = 0;
    return lparC_push_event(&ignored, L, ev);
  }
  lua_pushstring(L, "frame");
  lua_pushinteger(L, ev->engine);
  lua_pushinteger(L, ev->type);
  lua_pushinteger(L, ev->flags);
  lua_pushinteger(L, (lua_Integer)ev->id);
  lua_pushlstring(L, ev->payload, ev->len);
  return 6;
}

static void on_event(lpar_cluster *c, const lpar_event *ev, void *ud) {
  (void)c;
  cluster_ud *u = ud;
  lua_State *L = u->L;
  int top = lua_gettop(L);
  lua_pushcfunction(L, lparC_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, u->handler_ref);
  int n = u->raw ? push_raw_event(L, ev) : lparC_push_event(&u->undecodable, L, ev);
  for (int i = 0; i < ev->nfds; i++) close(ev->fds[i]); /* matrices hold their own */
  if (n >= 0 && lua_pcall(L, n, 0, top + 1) != LUA_OK)
    fprintf(stderr, "lpar: error in the event handler: %s\n", lua_tostring(L, -1));
  lua_settop(L, top);
}

static cluster_ud *check_cluster(lua_State *L) {
  cluster_ud *u = luaL_checkudata(L, 1, CLUSTER_MT);
  if (u->c == NULL) luaL_error(L, "the cluster is stopped");
  return u;
}

/*
** core.new_cluster{handler=, engine=, env={...}, blas_threads=, raw=}: with
** raw, messages reach the handler as bytes, and engines send matrices inline.
*/
static int l_new_cluster(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "handler");
  luaL_argexpected(L, lua_isfunction(L, -1), 1, "table with a handler function");
  lua_getfield(L, 1, "engine");
  const char *engine = luaL_optstring(L, -1, NULL);
  lua_getfield(L, 1, "blas_threads");
  int blas = (int)luaL_optinteger(L, -1, 0);
  lua_getfield(L, 1, "raw");
  int raw = lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 1, "env");
  int nenv = lua_istable(L, -1) ? (int)luaL_len(L, -1) : 0;
  const char **env = lua_newuserdatauv(L, sizeof(char *) * (size_t)(nenv + 1), 0);
  for (int i = 0; i < nenv; i++) {
    lua_geti(L, -2, i + 1);
    env[i] = lua_tostring(L, -1);
    if (env[i] == NULL || strchr(env[i], '=') == NULL)
      return luaL_error(L, "env[%d] must be a \"NAME=value\" string", i + 1);
    lua_pop(L, 1); /* the string stays alive in the env table */
  }
  env[nenv] = NULL;

  cluster_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  lparB_init(&u->enc);
  u->raw = raw;
  luaL_setmetatable(L, CLUSTER_MT);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  u->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  lua_pushvalue(L, 2);
  u->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lpar_config cfg = {.engine_path = engine, .env = env, .blas_threads = blas,
                     .inline_only = raw, .on_event = on_event, .ud = u};
  int rc = lpar_cluster_new(luv_loop(L), &cfg, &u->c);
  if (rc < 0) return lparC_push_failure(L, rc, "cannot create the cluster");
  return 1;
}

static int l_spawn(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  int id = (int)luaL_checkinteger(L, 2), n = (int)luaL_checkinteger(L, 3);
  int rc = lpar_cluster_spawn(u->c, id, n);
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushinteger(L, lpar_cluster_pid(u->c, id));
  return 1;
}

/* cluster:send(engine, type, id, root, values...) */
static int l_send(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  int engine = (int)luaL_checkinteger(L, 2);
  int type = (int)luaL_checkinteger(L, 3);
  lua_Integer id = luaL_checkinteger(L, 4);
  const char *root = luaL_checkstring(L, 5);
  char err[512];
  u->enc.len = 0;
  lparS_shm shm = {.min_bytes = LPARM_SHM_MIN_BYTES};
  int rc = lparS_encode_shm(L, 6, lua_gettop(L) - 5, root, &u->enc, &shm, err, sizeof err);
  if (rc < 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    lua_pushinteger(L, rc);
    return 3;
  }
  rc = lpar_cluster_send_fds(u->c, engine, type, 0, (uint64_t)id, u->enc.data, u->enc.len,
                             shm.fds, shm.nfds);
  lparS_shm_done(&shm);
  if (u->enc.cap > (1u << 24)) lparB_free(&u->enc);
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

/* cluster:send_bytes(engine, type, flags, id, payload): a payload already encoded. */
static int l_send_bytes(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  size_t n;
  const char *p = luaL_checklstring(L, 6, &n);
  int rc = lpar_cluster_send(u->c, (int)luaL_checkinteger(L, 2), (int)luaL_checkinteger(L, 3),
                             (unsigned)luaL_checkinteger(L, 4) & ~LPAR_FLAG_FDS,
                             (uint64_t)luaL_checkinteger(L, 5), p, n);
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_send_raw(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  int engine = (int)luaL_checkinteger(L, 2);
  size_t n;
  const char *s = luaL_checklstring(L, 3, &n);
  int rc = lpar_cluster_send_raw(u->c, engine, s, n);
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

static const struct {
  const char *name;
  int sig;
} signals[] = {{"INT", SIGINT}, {"TERM", SIGTERM}, {"KILL", SIGKILL}, {"SEGV", SIGSEGV},
               {"HUP", SIGHUP}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2}, {"STOP", SIGSTOP},
               {"CONT", SIGCONT}, {"ABRT", SIGABRT}, {NULL, 0}};

int lparC_check_signal(lua_State *L, int arg) {
  if (lua_type(L, arg) == LUA_TNUMBER) return (int)luaL_checkinteger(L, arg);
  const char *name = luaL_checkstring(L, arg);
  if (strncmp(name, "SIG", 3) == 0) name += 3;
  for (int i = 0; signals[i].name; i++)
    if (strcmp(signals[i].name, name) == 0) return signals[i].sig;
  return luaL_argerror(L, arg, lua_pushfstring(L, "unknown signal '%s'", name));
}

static int l_signal(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  int rc = lpar_cluster_signal(u->c, (int)luaL_checkinteger(L, 2), lparC_check_signal(L, 3));
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_interrupt(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  int rc = lpar_cluster_interrupt(u->c, (int)luaL_checkinteger(L, 2),
                                  (uint64_t)luaL_checkinteger(L, 3));
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_pid(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  int rc = lpar_cluster_pid(u->c, (int)luaL_checkinteger(L, 2));
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushinteger(L, rc);
  return 1;
}

static int l_stats(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, (lua_Integer)lpar_cluster_bad_messages(u->c));
  lua_setfield(L, -2, "bad_messages");
  lua_pushinteger(L, (lua_Integer)u->undecodable);
  lua_setfield(L, -2, "undecodable");
  return 1;
}

/* stop/__gc/__close: idempotent, so they may run in any order. */
static int l_stop(lua_State *L) {
  cluster_ud *u = luaL_checkudata(L, 1, CLUSTER_MT);
  if (u->c) {
    lpar_cluster_free(u->c);
    u->c = NULL;
    luaL_unref(L, LUA_REGISTRYINDEX, u->handler_ref);
    u->handler_ref = LUA_NOREF;
    lparB_free(&u->enc);
  }
  return 0;
}

static int l_encode(lua_State *L) {
  lparB_buffer b;
  char err[512];
  lparB_init(&b);
  int rc = lparS_encode(L, 1, lua_gettop(L), "value", &b, err, sizeof err);
  if (rc < 0) {
    lparB_free(&b);
    lua_pushnil(L);
    lua_pushstring(L, err);
    lua_pushinteger(L, rc);
    return 3;
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
    lua_pushnil(L);
    lua_pushstring(L, err);
    lua_pushinteger(L, LPAR_EBADMSG);
    return 3;
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

static const luaL_Reg cluster_methods[] = {
  {"spawn", l_spawn}, {"send", l_send}, {"send_raw", l_send_raw}, {"signal", l_signal},
  {"send_bytes", l_send_bytes},
  {"pid", l_pid},     {"stats", l_stats}, {"stop", l_stop},       {"interrupt", l_interrupt},
  {NULL, NULL}};

static const luaL_Reg functions[] = {
  {"new_cluster", l_new_cluster},
  {"encode", l_encode},
  {"decode", l_decode},
  {"register_metatable", lparS_register_metatable},
  {"loop_running", l_loop_running},
  {"now", l_now},
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

  luaL_newmetatable(L, CLUSTER_MT);
  luaL_newlib(L, cluster_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_stop);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_stop);
  lua_setfield(L, -2, "__close");
  lua_pop(L, 1);

  luaL_newlib(L, functions);
  lparC_open_link(L);
  static const struct {
    const char *name;
    int value;
  } types[] = {{"HELLO", LPAR_MSG_HELLO},     {"EXECUTE", LPAR_MSG_EXECUTE},
               {"APPLY", LPAR_MSG_APPLY},     {"PUSH", LPAR_MSG_PUSH},
               {"PULL", LPAR_MSG_PULL},       {"RESULT", LPAR_MSG_RESULT},
               {"ERROR", LPAR_MSG_ERROR},     {"EXIT", LPAR_MSG_EXIT},
               {"CONTROL", LPAR_MSG_CONTROL}, {"FLAG_RAW", LPAR_FLAG_RAW},
               {"ECLOSED", LPAR_ECLOSED},     {"EDEAD", LPAR_EDEAD}};
  for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
    lua_pushinteger(L, types[i].value);
    lua_setfield(L, -2, types[i].name);
  }
  lua_pushstring(L, LPAR_VERSION);
  lua_setfield(L, -2, "version");
  lua_pushstring(L, lpar_default_engine_path());
  lua_setfield(L, -2, "engine_path");
  lua_pushstring(L, lpar_command_path());
  lua_setfield(L, -2, "command_path");
  return 1;
}
