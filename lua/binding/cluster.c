/*
** cluster.c: the lpar.cluster type, the binding's face of lpar_cluster:
** engines reached from here, local children or behind a controller.
**
**   core.new_cluster{handler=, engine=, env={...}, blas_threads=, raw=}
**   core.connect{path= | host=, port=, key=, handler=, raw=}
**
** Both give the same object, with the same methods and the same events:
**   ("ready", engine, hello, pid)          ("exit", engine, status, signal[, why])
**   ("result", engine, id, started, completed, values...)
**   ("error", engine, id, started, completed, err)
**   ("stdout" | "stderr", engine, id, text)  ("display", engine, id, mime, data, meta)
**   ("undecodable", engine, id, why)         ("bad", engine, reason)
**   ("started", engine, id): a request sent with a deadline (send_by) began
** and, connected: ("control", id, values...), ("closed", reason, refused) and
** ("placed", engine, id): the controller sent load-balanced request id (sent
** to core.ANY_ENGINE + depth) to that engine; engine nil: withdrawn unsent.
** With raw, messages come as ("frame", engine, type, flags, id, payload), not
** decoded: a relay passes them on. Given on_result=, a function, results go
** to it instead, without their kind: on_result(engine, id, started,
** completed, values...), in one protected call that decodes and delivers
** (a result is most of the traffic; this is its short way in).
**
** Events are decoded and handed over inside a protected call, so neither a
** decoding failure nor an error in the handler unwinds through libuv.
*/
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <luv/luv.h>
#include <sodium.h>

#include "binding.h"
#include "cluster.h"
#include "funcache.h"
#include "lpar.h"
#include "matrix.h"
#include "route.h"
#include "serialize.h"
#include "wire.h"

#define CLUSTER_MT "lpar.cluster"
#define STAMPS_SIZE (2 * sizeof(double))
/*
** Values one reply may hand over: the handler passes them on through a few
** vararg calls, each a copy on a Lua stack of at most LUAI_MAXSTACK slots.
*/
#define MAX_REPLY_VALUES 200000

typedef struct cluster_ud {
  lpar_cluster *c;
  lua_State *L;    /* main thread: callbacks run on it, as luv's do */
  int handler_ref; /* the Lua event handler */
  int result_ref;  /* on_result, or LUA_NOREF: results go to the handler */
  int msgh_ref;    /* deliver_msgh closed over this ud, made once (LUA_NOREF until then) */
  int delivering;  /* deliver_result got past decoding: an error now is on_result's */
  int raw;
  uint64_t undecodable; /* replies that did not decode: counted here only */
  lparB_buffer enc;     /* reused for every send */
  lparF_sender funcs;   /* which functions each engine holds (funcache.h) */
} cluster_ud;

static const char *message_kind(int type) {
  switch (type) {
  case LPAR_MSG_RESULT: return "result";
  case LPAR_MSG_ERROR: return "error";
  case LPAR_MSG_STDOUT: return "stdout";
  case LPAR_MSG_STDERR: return "stderr";
  case LPAR_MSG_DISPLAY: return "display";
  case LPAR_MSG_CONTROL: return "control";
  case LPAR_MSG_STARTED: return "started";
  case LPAR_MSG_PLACED: return "placed";
  default: return NULL;
  }
}

/* Push a RESULT/ERROR's stamps and values; returns how many. Raises on bad input. */
static int push_reply(lua_State *L, const lpar_event *ev) {
  if (ev->flags & LPAR_FLAG_RAW) { /* a text-mode answer */
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushlstring(L, ev->payload, ev->len);
    return 3;
  }
  if (ev->len < STAMPS_SIZE) return luaL_error(L, "reply shorter than its timestamps");
  double stamps[2];
  memcpy(stamps, ev->payload, STAMPS_SIZE);
  lua_pushnumber(L, stamps[0]);
  lua_pushnumber(L, stamps[1]);
  char err[512];
  int n = 0;
  lparS_shm shm = {.nfds = ev->nfds};
  for (int i = 0; i < ev->nfds; i++) shm.fds[i] = ev->fds[i];
  if (lparS_decode_shm(L, ev->payload + STAMPS_SIZE, ev->len - STAMPS_SIZE, LPARS_ALLOW_CODE,
                       &shm, &n, err, sizeof err) < 0)
    return luaL_error(L, "%s", err);
  if (n > MAX_REPLY_VALUES)
    return luaL_error(L, "it holds %d values, more than the %d a reply may (return a table)", n,
                      MAX_REPLY_VALUES);
  return n + 2;
}

/* Push the handler's arguments for a MESSAGE; returns how many. Raises on bad input. */
static int push_message(lua_State *L, cluster_ud *u, const lpar_event *ev) {
  const char *kind = message_kind(ev->type);
  if (u->raw && ev->type != LPAR_MSG_CONTROL) {
    lua_pushstring(L, "frame");
    lua_pushinteger(L, ev->engine);
    lua_pushinteger(L, ev->type);
    lua_pushinteger(L, ev->flags);
    lua_pushinteger(L, (lua_Integer)ev->id);
    lua_pushlstring(L, ev->payload, ev->len);
    return 6;
  }
  if (kind == NULL) return luaL_error(L, "unexpected message type %d", ev->type);
  lua_pushstring(L, kind);
  if (ev->type == LPAR_MSG_CONTROL) { /* the controller's answers: plain data only */
    lua_pushinteger(L, (lua_Integer)ev->id);
    int n = 0;
    char err[256];
    if (lparS_decode(L, ev->payload, ev->len, 0, &n, err, sizeof err) < 0)
      return luaL_error(L, "the controller's answer could not be decoded: %s", err);
    return 2 + n;
  }
  if (ev->type == LPAR_MSG_PLACED && ev->engine >= LPAR_ANY_ENGINE)
    lua_pushnil(L);
  else
    lua_pushinteger(L, ev->engine);
  lua_pushinteger(L, (lua_Integer)ev->id);
  if (ev->type == LPAR_MSG_STARTED || ev->type == LPAR_MSG_PLACED) return 3;
  if (ev->type == LPAR_MSG_STDOUT || ev->type == LPAR_MSG_STDERR) {
    lua_pushlstring(L, ev->payload, ev->len);
    return 4;
  }
  if (ev->type == LPAR_MSG_DISPLAY) {
    int n = 0;
    char err[512];
    if (lparS_decode(L, ev->payload, ev->len, 0, &n, err, sizeof err) < 0)
      return luaL_error(L, "%s", err);
    return 3 + n;
  }
  return 3 + push_reply(L, ev);
}

static int push_event(lua_State *L, cluster_ud *u, const lpar_event *ev) {
  switch (ev->kind) {
  case LPAR_EV_READY:
    lua_pushstring(L, "ready");
    lua_pushinteger(L, ev->engine);
    lua_pushlstring(L, ev->payload, ev->len);
    lua_pushinteger(L, ev->pid);
    return 4;
  case LPAR_EV_EXIT:
    lua_pushstring(L, "exit");
    lua_pushinteger(L, ev->engine);
    lua_pushinteger(L, ev->exit_status);
    lua_pushinteger(L, ev->term_signal);
    if (ev->reason == NULL) return 4;
    lua_pushstring(L, ev->reason);
    return 5;
  case LPAR_EV_BAD_MESSAGE:
    lua_pushstring(L, "bad");
    lua_pushinteger(L, ev->engine);
    lua_pushstring(L, ev->reason);
    return 3;
  case LPAR_EV_CLOSED:
    lua_pushstring(L, "closed");
    lua_pushstring(L, ev->reason);
    lua_pushboolean(L, ev->exit_status);
    return 3;
  case LPAR_EV_MESSAGE: break;
  }
  return push_message(L, u, ev);
}

/* Protected: (u, ev) -> the handler's arguments for the event. */
static int decode_event(lua_State *L) {
  cluster_ud *u = lua_touserdata(L, 1);
  const lpar_event *ev = lua_touserdata(L, 2);
  lua_settop(L, 0);
  return push_event(L, u, ev);
}

/* Protected: (u, ev) -> on_result(engine, id, started, completed, values...) called. */
static int deliver_result(lua_State *L) {
  cluster_ud *u = lua_touserdata(L, 1);
  const lpar_event *ev = lua_touserdata(L, 2);
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, u->result_ref);
  lua_pushinteger(L, ev->engine);
  lua_pushinteger(L, (lua_Integer)ev->id);
  int n = push_reply(L, ev);
  u->delivering = 1;
  lua_call(L, 2 + n, 0);
  return 0;
}

/* The message handler of deliver_result: a traceback for on_result's errors, a decoding error as it is. */
static int deliver_msgh(lua_State *L) {
  cluster_ud *u = lua_touserdata(L, lua_upvalueindex(1));
  return u->delivering ? lparC_traceback(L) : 1;
}

/* The handler's arguments for a message that did not decode, `why` on top: they replace it. */
static void push_undecodable(lua_State *L, cluster_ud *u, const lpar_event *ev) {
  char why[512];
  snprintf(why, sizeof why, "%s", lua_tostring(L, -1) ? lua_tostring(L, -1) : "out of memory");
  lua_pop(L, 1);
  lua_checkstack(L, 8);
  if (ev->kind == LPAR_EV_MESSAGE && ev->type == LPAR_MSG_CONTROL) {
    lua_pushstring(L, "control");
    lua_pushinteger(L, (lua_Integer)ev->id);
    lua_pushnil(L);
  } else {
    u->undecodable++;
    lua_pushstring(L, "undecodable");
    lua_pushinteger(L, ev->engine);
    lua_pushinteger(L, (lua_Integer)ev->id);
  }
  lua_pushstring(L, why);
}

/* A reply the handler (or on_result) could not take must still end its request. */
static void end_refused_reply(lua_State *L, cluster_ud *u, const lpar_event *ev, int top) {
  if (ev->kind != LPAR_EV_MESSAGE || u->raw || (ev->type != LPAR_MSG_RESULT && ev->type != LPAR_MSG_ERROR))
    return;
  lua_settop(L, top);
  lua_rawgeti(L, LUA_REGISTRYINDEX, u->handler_ref);
  lua_pushstring(L, "undecodable");
  lua_pushinteger(L, ev->engine);
  lua_pushinteger(L, (lua_Integer)ev->id);
  lua_pushstring(L, "the event handler failed on it");
  if (lua_pcall(L, 4, 0, 0) != LUA_OK)
    fprintf(stderr, "lpar: error in the event handler: %s\n", lua_tostring(L, -1));
}

/*
** A result, when there is an on_result: decoded and delivered in one
** protected call. 1 when it is done with, 0 when it did not decode: then
** the handler's arguments for an "undecodable" event are on the stack
** above `top` + 2 (the traceback function and the handler).
*/
static int on_result_event(lua_State *L, cluster_ud *u, const lpar_event *ev, int top) {
  int outer = u->delivering; /* a delivery this one runs inside, if on_result ever drains a route */
  u->delivering = 0;
  if (u->msgh_ref == LUA_NOREF) { /* made once: a closure per result would be garbage per result */
    lua_pushlightuserdata(L, u);
    lua_pushcclosure(L, deliver_msgh, 1);
    u->msgh_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, u->msgh_ref);
  lua_pushcfunction(L, deliver_result);
  lua_pushlightuserdata(L, u);
  lua_pushlightuserdata(L, (void *)ev);
  int status = lua_pcall(L, 2, 0, top + 1), delivered = u->delivering;
  u->delivering = outer;
  if (status == LUA_OK) return 1;
  if (delivered) {
    fprintf(stderr, "lpar: error in the event handler: %s\n", lua_tostring(L, -1));
    end_refused_reply(L, u, ev, top);
    return 1;
  }
  /* [msgh, error] becomes [traceback, handler, error], as on the handler's way */
  lua_replace(L, top + 1);
  lua_pushcfunction(L, lparC_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, u->handler_ref);
  lua_rotate(L, top + 1, -1);
  push_undecodable(L, u, ev);
  return 0;
}

/*
** Decode first, then call the handler, each protected: a message that does
** not decode (or holds more values than a Lua stack) becomes an
** "undecodable" event for its request, and an error in the handler is
** reported; neither unwinds through libuv.
*/
static void on_event(lpar_cluster *c, const lpar_event *ev, void *ud) {
  (void)c;
  cluster_ud *u = ud;
  lua_State *L = u->L;
  /* An engine that says hello, or has gone, holds none of our functions. */
  if (ev->kind == LPAR_EV_READY || ev->kind == LPAR_EV_EXIT) lparF_forget_engine(&u->funcs, ev->engine);
  if (u->handler_ref == LUA_NOREF) return;
  int top = lua_gettop(L);
  if (!lua_checkstack(L, 8)) return;
  if (ev->kind == LPAR_EV_MESSAGE && ev->type == LPAR_MSG_RESULT && !u->raw && u->result_ref != LUA_NOREF) {
    if (on_result_event(L, u, ev, top)) {
      lua_settop(L, top);
      return;
    }
  } else {
    lua_pushcfunction(L, lparC_traceback);
    lua_rawgeti(L, LUA_REGISTRYINDEX, u->handler_ref);
    lua_pushcfunction(L, decode_event);
    lua_pushlightuserdata(L, u);
    lua_pushlightuserdata(L, (void *)ev);
    if (lua_pcall(L, 2, LUA_MULTRET, 0) != LUA_OK) {
      lua_settop(L, top + 3); /* the error on top of the traceback function and the handler */
      push_undecodable(L, u, ev);
    }
  }
  int nargs = lua_gettop(L) - (top + 2);
  if (lua_pcall(L, nargs, 0, top + 1) != LUA_OK) {
    fprintf(stderr, "lpar: error in the event handler: %s\n", lua_tostring(L, -1));
    end_refused_reply(L, u, ev, top);
  }
  lua_settop(L, top);
}

static cluster_ud *check_cluster(lua_State *L) {
  cluster_ud *u = luaL_checkudata(L, 1, CLUSTER_MT);
  if (u->c == NULL) luaL_error(L, "the cluster is stopped");
  return u;
}

static cluster_ud *new_ud(lua_State *L, int raw) {
  cluster_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  lparB_init(&u->enc);
  lparF_init(&u->funcs);
  u->raw = raw;
  u->handler_ref = LUA_NOREF;
  u->result_ref = LUA_NOREF;
  u->msgh_ref = LUA_NOREF;
  luaL_setmetatable(L, CLUSTER_MT);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  u->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  return u;
}

static int get_handler(lua_State *L) {
  lua_getfield(L, 1, "handler");
  luaL_argexpected(L, lua_isfunction(L, -1), 1, "table with a handler function");
  return luaL_ref(L, LUA_REGISTRYINDEX);
}

/* The optional on_result function of the options at 1: a reference, or LUA_NOREF. */
static int get_on_result(lua_State *L) {
  lua_getfield(L, 1, "on_result");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return LUA_NOREF;
  }
  luaL_argexpected(L, lua_isfunction(L, -1), 1, "on_result to be a function");
  return luaL_ref(L, LUA_REGISTRYINDEX);
}

static int opt_bool(lua_State *L, const char *field) {
  lua_getfield(L, 1, field);
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

const char **lparC_check_env(lua_State *L, int t) {
  lua_getfield(L, t, "env");
  int nenv = lua_istable(L, -1) ? (int)luaL_len(L, -1) : 0;
  const char **env = lua_newuserdatauv(L, sizeof(char *) * (size_t)(nenv + 1), 0);
  for (int i = 0; i < nenv; i++) {
    lua_geti(L, -2, i + 1);
    env[i] = lua_tostring(L, -1);
    if (env[i] == NULL || strchr(env[i], '=') == NULL)
      luaL_error(L, "env[%d] must be a \"NAME=value\" string", i + 1);
    lua_pop(L, 1); /* the string stays alive in the env table */
  }
  env[nenv] = NULL;
  return env;
}

static int l_new_cluster(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "engine");
  const char *engine = luaL_optstring(L, -1, NULL);
  lua_getfield(L, 1, "blas_threads");
  int blas = (int)luaL_optinteger(L, -1, 0);
  const char **env = lparC_check_env(L, 1);
  int handler = get_handler(L), on_result = get_on_result(L);
  cluster_ud *u = new_ud(L, opt_bool(L, "raw"));
  u->handler_ref = handler;
  u->result_ref = on_result;
  lpar_config cfg = {.engine_path = engine, .env = env, .blas_threads = blas,
                     .on_event = on_event, .ud = u};
  int rc = lpar_cluster_new(luv_loop(L), &cfg, &u->c);
  if (rc < 0) return lparC_push_failure(L, rc, "cannot create the cluster");
  return 1;
}

int lparC_check_key(lua_State *L, int t, unsigned char key[32]) {
  lua_getfield(L, t, "key");
  size_t n;
  const char *k = lua_tolstring(L, -1, &n);
  if (k == NULL || n != 32) return luaL_error(L, "key must be a string of 32 bytes");
  memcpy(key, k, n);
  lua_pop(L, 1);
  return 0;
}

static int l_connect(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lpar_connect_config cfg = {.on_event = on_event};
  lparC_check_key(L, 1, cfg.key);
  lua_getfield(L, 1, "path");
  cfg.path = lua_tostring(L, -1);
  lua_getfield(L, 1, "host");
  cfg.host = lua_tostring(L, -1);
  lua_getfield(L, 1, "port");
  cfg.port = (int)luaL_optinteger(L, -1, 0);
  if (cfg.path == NULL && cfg.host == NULL) return luaL_error(L, "give a socket path, or a host and port");
  int handler = get_handler(L), on_result = get_on_result(L);
  cluster_ud *u = new_ud(L, opt_bool(L, "raw"));
  cfg.ud = u;
  int rc = lpar_cluster_connect(luv_loop(L), &cfg, &u->c);
  if (rc < 0) {
    lua_pushnil(L);
    lua_pushstring(L, lpar_cluster_errmsg(u->c));
    lua_pushinteger(L, rc);
    lpar_cluster_free(u->c);
    u->c = NULL;
    lparC_unref(L, &handler);
    lparC_unref(L, &on_result);
    return 3;
  }
  u->handler_ref = handler;
  u->result_ref = on_result;
  sodium_memzero(cfg.key, sizeof cfg.key);
  return 1;
}

static int l_spawn(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  int id = (int)luaL_checkinteger(L, 2), n = (int)luaL_checkinteger(L, 3);
  int rc = lpar_cluster_spawn(u->c, id, n);
  if (rc < 0) {
    return lparC_push_error(L, lpar_cluster_errmsg(u->c), rc);
  }
  lua_pushinteger(L, lpar_cluster_pid(u->c, id));
  return 1;
}

/* A failed send: on a link that has just closed (its close event not yet
   delivered), say why it closed rather than "engine is not running". */
static int push_send_failure(lua_State *L, cluster_ud *u, int rc) {
  lparR_route *link = lparK_link(u->c);
  const char *why = rc == LPAR_EDEAD && link ? lparR_close_reason(link) : NULL;
  if (why == NULL) return lparC_push_failure(L, rc, NULL);
  lua_pushnil(L);
  if (strncmp(why, "the controller refused", 22) == 0) /* it said why: that is the whole story */
    lua_pushstring(L, why);
  else
    lua_pushfstring(L, "the connection to the controller was lost (%s)", why);
  lua_pushinteger(L, rc);
  return 3;
}

/* Encode the values from `first` (after a deadline, if given) and send them. */
static int send_values(lua_State *L, cluster_ud *u, const double *deadline, int first) {
  int engine = (int)luaL_checkinteger(L, 2);
  int type = (int)luaL_checkinteger(L, 3);
  lua_Integer id = luaL_checkinteger(L, 4);
  const char *root = luaL_checkstring(L, first - 1);
  char err[512];
  unsigned flags = 0;
  u->enc.len = 0;
  if (deadline) {
    if (lparB_append(&u->enc, deadline, sizeof *deadline) < 0) return lparC_push_failure(L, LPAR_ENOMEM, NULL);
    flags |= LPAR_FLAG_DEADLINE;
  }
  lparS_shm shm = {.min_bytes = lpar_cluster_passes_fds(u->c, engine) ? LPARM_SHM_MIN_BYTES : 0};
  /* Which engine a load-balanced request meets is the controller's choice:
  ** its functions go whole, as no engine may be counted on to hold them. */
  lparF_sender *funcs = engine >= LPAR_ANY_ENGINE ? NULL : &u->funcs;
  int rc = lparS_encode_for(L, first, lua_gettop(L) - first + 1, root, &u->enc, &shm, funcs,
                            engine, err, sizeof err);
  if (rc < 0) {
    return lparC_push_error(L, err, rc);
  }
  rc = lpar_cluster_send_fds(u->c, engine, type, flags, (uint64_t)id, u->enc.data, u->enc.len,
                             shm.fds, shm.nfds);
  if (rc == 0 && funcs)
    lparF_commit(funcs, engine); /* the engine now holds the functions it set */
  else
    lparF_discard(&u->funcs);
  lparS_shm_done(&shm);
  if (u->enc.cap > (1u << 24)) lparB_free(&u->enc);
  if (rc < 0) return push_send_failure(L, u, rc);
  lua_pushboolean(L, 1);
  return 1;
}

/* cluster:send(engine, type, id, root, values...), matrices as shared memory where they can. */
static int l_send(lua_State *L) { return send_values(L, check_cluster(L), NULL, 6); }

/*
** cluster:send_by(engine, type, id, deadline, root, values...): the same with
** a deadline (CLOCK_REALTIME seconds, as core.now()): the engine drops the
** request unstarted if it passes first, and says "started" when it begins.
*/
static int l_send_by(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  double deadline = luaL_checknumber(L, 5);
  lua_remove(L, 5);
  return send_values(L, u, &deadline, 6);
}

/*
** cluster:send_many(engines, type, first_id, root, values...): one request
** to every engine of the list, encoded once, engines[i] under first_id + i - 1;
** behind a controller, one frame (see lpar_cluster_send_many). The engines
** must all take descriptors or none (cluster:passes_fds). true when it went
** to all; nil, msg, code when it went to none; false and {[i] = {msg, code}}
** for the engines it did not reach.
*/
static int l_send_many(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  int type = (int)luaL_checkinteger(L, 3);
  lua_Integer first = luaL_checkinteger(L, 4);
  const char *root = luaL_checkstring(L, 5);
  lua_Integer n = luaL_len(L, 2);
  if (n < 1 || n > LPARW_MAX_FANOUT) return luaL_error(L, "send_many: 1 to %d engines", LPARW_MAX_FANOUT);
  int *engines = lua_newuserdatauv(L, 2 * sizeof(int) * (size_t)n, 0), *rcs = engines + n;
  lua_insert(L, 6); /* kept alive below the values */
  for (lua_Integer i = 0; i < n; i++) {
    lua_geti(L, 2, i + 1);
    engines[i] = (int)luaL_checkinteger(L, -1);
    lua_pop(L, 1);
  }
  char err[512];
  u->enc.len = 0;
  lparS_shm shm = {.min_bytes = lpar_cluster_passes_fds(u->c, engines[0]) ? LPARM_SHM_MIN_BYTES : 0};
  int rc = lparS_encode_shm(L, 7, lua_gettop(L) - 6, root, &u->enc, &shm, err, sizeof err);
  if (rc < 0) {
    return lparC_push_error(L, err, rc);
  }
  rc = lpar_cluster_send_many(u->c, engines, (int)n, type, 0, (uint64_t)first, u->enc.data,
                              u->enc.len, shm.fds, shm.nfds, rcs);
  lparS_shm_done(&shm);
  if (u->enc.cap > (1u << 24)) lparB_free(&u->enc);
  if (rc == LPAR_OK) {
    lua_pushboolean(L, 1);
    return 1;
  }
  int reached = 0;
  for (lua_Integer i = 0; i < n; i++) reached += rcs[i] == LPAR_OK;
  if (reached == 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 0);
  lua_createtable(L, 0, 0);
  for (lua_Integer i = 0; i < n; i++) {
    if (rcs[i] == LPAR_OK) continue;
    lua_createtable(L, 2, 0);
    lua_pushstring(L, lpar_strerror(rcs[i]));
    lua_rawseti(L, -2, 1);
    lua_pushinteger(L, rcs[i]);
    lua_rawseti(L, -2, 2);
    lua_rawseti(L, -2, i + 1);
  }
  return 2;
}

/* cluster:passes_fds(engine): whether messages to it may carry shared memory. */
static int l_passes_fds(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  lua_pushboolean(L, lpar_cluster_passes_fds(u->c, (int)luaL_checkinteger(L, 2)));
  return 1;
}

/* cluster:send_bytes(engine, type, flags, id, payload): a payload already encoded. */
static int l_send_bytes(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  size_t n;
  const char *p = luaL_checklstring(L, 6, &n);
  int rc = lpar_cluster_send(u->c, (int)luaL_checkinteger(L, 2), (int)luaL_checkinteger(L, 3),
                             (unsigned)luaL_checkinteger(L, 4), (uint64_t)luaL_checkinteger(L, 5),
                             p, n);
  if (rc < 0) return push_send_failure(L, u, rc);
  lua_pushboolean(L, 1);
  return 1;
}

/* cluster:send_raw(engine, bytes): bytes as they are (tests of bad input; a link ignores engine). */
static int l_send_raw(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  int engine = (int)luaL_checkinteger(L, 2);
  size_t n;
  const char *s = luaL_checklstring(L, 3, &n);
  int rc = lparK_send_raw(u->c, lparK_link(u->c) ? 0 : engine, s, n);
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

/* cluster:seal(engine, type, flags, id, payload): the sealed bytes send_bytes would write. */
static int l_seal(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  lparR_route *link = lparK_link(u->c);
  if (link == NULL) return luaL_error(L, "seal: only a connected cluster's link seals frames");
  size_t n;
  const char *p = luaL_checklstring(L, 6, &n);
  lparB_buffer b;
  lparB_init(&b);
  int rc = lparR_seal_copy(link, (int)luaL_checkinteger(L, 3), (unsigned)luaL_checkinteger(L, 4),
                           (unsigned)luaL_checkinteger(L, 2), (uint64_t)luaL_checkinteger(L, 5),
                           p, n, &b);
  if (rc < 0) {
    lparB_free(&b);
    return lparC_push_failure(L, rc, "seal (before the controller's hello?)");
  }
  lua_pushlstring(L, b.data, b.len);
  lparB_free(&b);
  return 1;
}

struct lparR_route *lparC_take_link(lua_State *L, int idx) {
  cluster_ud *u = luaL_checkudata(L, idx, CLUSTER_MT);
  lparR_route *r = u->c ? lparK_take_link(u->c) : NULL;
  if (r == NULL) luaL_error(L, "the cluster has no link to take (not connected, or its link closed)");
  return r;
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
  if (strncmp(name, "SIG", 3) == 0 || strncmp(name, "sig", 3) == 0) name += 3;
  for (int i = 0; signals[i].name; i++)
    if (strcasecmp(signals[i].name, name) == 0) return signals[i].sig;
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

/* c:silence(id): ms since local engine id last sent anything; nil, msg when not local. */
/* cluster:silence(engine): ms since local engine's last frame, and its heartbeat period (0: none). */
static int l_silence(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  int id = (int)luaL_checkinteger(L, 2);
  int64_t ms = lpar_cluster_silence_ms(u->c, id);
  if (ms < 0) return lparC_push_failure(L, (int)ms, NULL);
  lua_pushinteger(L, (lua_Integer)ms);
  lua_pushinteger(L, lpar_cluster_heartbeat_ms(u->c, id));
  return 2;
}

static int l_stats(lua_State *L) {
  cluster_ud *u = luaL_checkudata(L, 1, CLUSTER_MT);
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, u->c ? (lua_Integer)lpar_cluster_bad_messages(u->c) : 0);
  lua_setfield(L, -2, "bad_messages");
  lua_pushinteger(L, (lua_Integer)u->undecodable);
  lua_setfield(L, -2, "undecodable");
  lua_pushstring(L, u->c ? lpar_cluster_cipher(u->c) : "none");
  lua_setfield(L, -2, "cipher");
  lparR_route *link = u->c ? lparK_link(u->c) : NULL;
  lua_pushboolean(L, link && lparR_session_started(link));
  lua_setfield(L, -2, "session");
  return 1;
}

static int l_is_open(lua_State *L) {
  cluster_ud *u = luaL_checkudata(L, 1, CLUSTER_MT);
  lua_pushboolean(L, u->c && (lparK_link(u->c) != NULL || !lparK_connected(u->c)));
  return 1;
}

/* stop/__gc/__close: idempotent, so they may run in any order. */
static int l_stop(lua_State *L) {
  cluster_ud *u = luaL_checkudata(L, 1, CLUSTER_MT);
  if (u->c) {
    lpar_cluster_free(u->c);
    u->c = NULL;
  }
  lparC_unref(L, &u->handler_ref);
  lparC_unref(L, &u->result_ref);
  lparC_unref(L, &u->msgh_ref);
  lparB_free(&u->enc);
  lparF_release(L, &u->funcs);
  lparF_free(&u->funcs);
  return 0;
}

/*
** cluster:batch(fn, ...): fn(...) with its sends gathered and written
** together when it returns or raises; fn's results.
*/
static int l_batch(lua_State *L) {
  cluster_ud *u = check_cluster(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lpar_cluster_batch_begin(u->c);
  int status = lua_pcall(L, lua_gettop(L) - 2, LUA_MULTRET, 0);
  /* the cluster may have been stopped by fn */
  if (u->c) lpar_cluster_batch_end(u->c);
  if (status != LUA_OK) return lua_error(L);
  return lua_gettop(L) - 1;
}

static const luaL_Reg cluster_methods[] = {
  {"batch", l_batch},         {"send_by", l_send_by},
  {"spawn", l_spawn},         {"send", l_send},           {"send_bytes", l_send_bytes},
  {"send_many", l_send_many}, {"passes_fds", l_passes_fds},
  {"send_raw", l_send_raw},   {"seal", l_seal},           {"signal", l_signal},
  {"interrupt", l_interrupt}, {"pid", l_pid}, {"silence", l_silence},             {"stats", l_stats},
  {"is_open", l_is_open},     {"stop", l_stop},           {NULL, NULL}};

void lparC_open_cluster(lua_State *L) {
  luaL_newmetatable(L, CLUSTER_MT);
  luaL_newlib(L, cluster_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_stop);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_stop);
  lua_setfield(L, -2, "__close");
  lua_pop(L, 1);
  static const luaL_Reg functions[] = {
    {"new_cluster", l_new_cluster}, {"connect", l_connect}, {NULL, NULL}};
  luaL_setfuncs(L, functions, 0);
}
