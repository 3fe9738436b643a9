/*
** relay.c: the lpar.relay type, a standalone controller's data plane
** (core/relay.h) for its Lua control operations.
**
**   core.relay{socket=, ip=, port=, key=, engine=, env={...}, blas_threads=, handler=}
**
** The handler hears ("ready", engine), ("exit", engine, status, signal),
** ("control", peer, id, values...) with the values decoded as plain data
** (no bytecode is loaded from a control frame), and
** ("peer_closed", peer, reason, refused, engine or nil).
*/
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <luv/luv.h>
#include <sodium.h>

#include "binding.h"
#include "hostrelay.h"
#include "relay.h"
#include "serialize.h"

#define RELAY_MT "lpar.relay"

typedef struct relay_ud {
  lparY_relay *y;
  lua_State *L;
  int handler_ref;
  lparB_buffer enc;
} relay_ud;

/* Protected: (ev) -> the handler's arguments. */
static int push_relay_event(lua_State *L) {
  const lparY_event *ev = lua_touserdata(L, 1);
  lua_settop(L, 0);
  switch (ev->kind) {
  case LPARY_ENGINE_READY:
    lua_pushstring(L, "ready");
    lua_pushinteger(L, ev->engine);
    return 2;
  case LPARY_ENGINE_EXIT:
    lua_pushstring(L, "exit");
    lua_pushinteger(L, ev->engine);
    lua_pushinteger(L, ev->status);
    lua_pushinteger(L, ev->signal);
    return 4;
  case LPARY_PEER_CLOSED:
    lua_pushstring(L, "peer_closed");
    lua_pushinteger(L, ev->peer);
    lua_pushstring(L, ev->reason);
    lua_pushboolean(L, ev->refused);
    if (ev->engine >= 0)
      lua_pushinteger(L, ev->engine);
    else
      lua_pushnil(L);
    return 5;
  case LPARY_CONTROL: {
    lua_pushstring(L, "control");
    lua_pushinteger(L, ev->peer);
    lua_pushinteger(L, (lua_Integer)ev->id);
    char err[256];
    int n = 0;
    if (lparS_decode(L, ev->payload, ev->len, 0, &n, err, sizeof err) < 0) {
      lua_pushnil(L); /* an operation that does not decode is answered as unknown */
      return 4;
    }
    return 3 + n;
  }
  }
  return 0;
}

/*
** Hand an event to the Lua handler `ref`: `push` turns (ev) into the
** handler's arguments, and both run protected, so neither a decoding
** failure nor an error in the handler unwinds through libuv; `who` names
** the handler's owner in what is printed then.
*/
static void call_handler(lua_State *L, int ref, lua_CFunction push, const void *ev,
                         const char *who) {
  if (ref == LUA_NOREF || !lua_checkstack(L, 8)) return;
  int top = lua_gettop(L);
  lua_pushcfunction(L, lparC_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  lua_pushcfunction(L, push);
  lua_pushlightuserdata(L, (void *)ev);
  if (lua_pcall(L, 1, LUA_MULTRET, 0) == LUA_OK) {
    if (lua_pcall(L, lua_gettop(L) - (top + 2), 0, top + 1) != LUA_OK)
      fprintf(stderr, "lpar: error in the %s: %s\n", who, lua_tostring(L, -1));
  } else {
    fprintf(stderr, "lpar: a %s event was lost: %s\n", who, lua_tostring(L, -1));
  }
  lua_settop(L, top);
}

static void on_relay_event(lparY_relay *y, const lparY_event *ev, void *ud) {
  (void)y;
  relay_ud *u = ud;
  call_handler(u->L, u->handler_ref, push_relay_event, ev, "controller");
}

static relay_ud *check_relay(lua_State *L) {
  relay_ud *u = luaL_checkudata(L, 1, RELAY_MT);
  if (u->y == NULL) luaL_error(L, "the controller is stopped");
  return u;
}

static const char *opt_field(lua_State *L, const char *name) {
  lua_getfield(L, 1, name);
  const char *s = lua_tostring(L, -1);
  lua_pop(L, 1); /* the string stays alive in the options table */
  return s;
}

static int l_relay(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lparY_config cfg = {.on_event = on_relay_event};
  lparC_check_key(L, 1, cfg.key);
  cfg.socket = opt_field(L, "socket");
  cfg.ip = opt_field(L, "ip");
  lua_getfield(L, 1, "port");
  cfg.port = (int)luaL_optinteger(L, -1, 0);
  lua_getfield(L, 1, "blas_threads");
  cfg.engines.blas_threads = (int)luaL_optinteger(L, -1, 0);
  lua_pop(L, 2);
  cfg.engines.engine_path = opt_field(L, "engine");
  if (cfg.socket == NULL) return luaL_error(L, "relay: give the socket path");
  lua_getfield(L, 1, "env");
  int nenv = lua_istable(L, -1) ? (int)luaL_len(L, -1) : 0;
  const char **env = lua_newuserdatauv(L, sizeof(char *) * (size_t)(nenv + 1), 0);
  for (int i = 0; i < nenv; i++) {
    lua_geti(L, -2, i + 1);
    env[i] = lua_tostring(L, -1);
    if (env[i] == NULL || strchr(env[i], '=') == NULL)
      return luaL_error(L, "env[%d] must be a \"NAME=value\" string", i + 1);
    lua_pop(L, 1);
  }
  env[nenv] = NULL;
  cfg.engines.env = env;
  lua_getfield(L, 1, "handler");
  luaL_argexpected(L, lua_isfunction(L, -1), 1, "table with a handler function");
  int handler = luaL_ref(L, LUA_REGISTRYINDEX);
  relay_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  lparB_init(&u->enc);
  u->handler_ref = handler;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  u->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  luaL_setmetatable(L, RELAY_MT);
  cfg.ud = u;
  char err[512] = "";
  int rc = lparY_new(luv_loop(L), &cfg, &u->y, err, sizeof err);
  sodium_memzero(cfg.key, sizeof cfg.key);
  if (rc < 0) {
    u->y = NULL;
    return lparC_push_error(L, err, rc);
  }
  return 1;
}

static int l_spawn(lua_State *L) {
  relay_ud *u = check_relay(L);
  char err[512];
  int rc = lparY_spawn(u->y, (int)luaL_checkinteger(L, 2), (int)luaL_checkinteger(L, 3), err,
                       sizeof err);
  if (rc < 0) {
    return lparC_push_error(L, err, rc);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_signal(lua_State *L) {
  relay_ud *u = check_relay(L);
  int rc = lparY_signal(u->y, (int)luaL_checkinteger(L, 2), lparC_check_signal(L, 3));
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_join(lua_State *L) {
  relay_ud *u = check_relay(L);
  int rc = lparY_join(u->y, (uint32_t)luaL_checkinteger(L, 2), (int)luaL_checkinteger(L, 3),
                      (int)luaL_optinteger(L, 4, 1), luaL_optstring(L, 5, NULL));
  if (rc < 0) return lparC_push_failure(L, rc, "join");
  lua_pushboolean(L, 1);
  return 1;
}

/* relay:answer(peer, id, values...): plain data, encoded here. */
static int l_answer(lua_State *L) {
  relay_ud *u = check_relay(L);
  uint32_t peer = (uint32_t)luaL_checkinteger(L, 2);
  uint64_t id = (uint64_t)luaL_checkinteger(L, 3);
  char err[512];
  u->enc.len = 0;
  int rc = lparS_encode(L, 4, lua_gettop(L) - 3, "answer", &u->enc, err, sizeof err);
  if (rc < 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  rc = lparY_answer(u->y, peer, id, u->enc.data, u->enc.len);
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

static const char *state_name(lparY_engine_state s) {
  switch (s) {
  case LPARY_STARTING: return "starting";
  case LPARY_READY: return "ready";
  case LPARY_DEAD: return "dead";
  default: return "none";
  }
}

/* relay:engine(id) -> {state=, kind=, pid=, status=, signal=, queue=, silent_ms=, heartbeat_ms=,
   link_sent=} or nil */
static int l_engine(lua_State *L) {
  relay_ud *u = check_relay(L);
  lparY_engine_info e;
  if (lparY_engine(u->y, (int)luaL_checkinteger(L, 2), &e) < 0) return 0;
  lua_createtable(L, 0, 8);
  lua_pushstring(L, state_name(e.state));
  lua_setfield(L, -2, "state");
  lua_pushstring(L, e.joined ? "joined" : "local");
  lua_setfield(L, -2, "kind");
  lua_pushinteger(L, e.pid);
  lua_setfield(L, -2, "pid");
  lua_pushinteger(L, e.status);
  lua_setfield(L, -2, "status");
  lua_pushinteger(L, e.signal);
  lua_setfield(L, -2, "signal");
  lua_pushinteger(L, (lua_Integer)e.in_flight);
  lua_setfield(L, -2, "queue");
  if (e.silent_ms >= 0) {
    lua_pushinteger(L, (lua_Integer)e.silent_ms);
    lua_setfield(L, -2, "silent_ms");
    lua_pushinteger(L, e.heartbeat_ms);
    lua_setfield(L, -2, "heartbeat_ms");
  }
  if (e.joined) {
    lua_pushinteger(L, (lua_Integer)e.link_sent);
    lua_setfield(L, -2, "link_sent");
  }
  return 1;
}

static int l_stats(lua_State *L) {
  relay_ud *u = check_relay(L);
  lparY_stats s;
  lparY_get_stats(u->y, &s);
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, (lua_Integer)s.waiting);
  lua_setfield(L, -2, "waiting");
  lua_pushinteger(L, (lua_Integer)s.no_fds);
  lua_setfield(L, -2, "no_fds");
  lua_pushinteger(L, (lua_Integer)s.refused);
  lua_setfield(L, -2, "refused");
  lua_pushinteger(L, (lua_Integer)s.disconnected);
  lua_setfield(L, -2, "disconnected");
  lua_pushinteger(L, (lua_Integer)s.bad_messages);
  lua_setfield(L, -2, "bad_messages");
  lua_pushinteger(L, s.clients);
  lua_setfield(L, -2, "clients");
  lua_pushinteger(L, s.engines);
  lua_setfield(L, -2, "engines");
  lua_pushinteger(L, lparY_port(u->y));
  lua_setfield(L, -2, "port");
  return 1;
}

static int l_stop(lua_State *L) {
  relay_ud *u = luaL_checkudata(L, 1, RELAY_MT);
  if (u->y) {
    lparY_free(u->y);
    u->y = NULL;
  }
  lparC_unref(L, &u->handler_ref);
  lparB_free(&u->enc);
  return 0;
}

void lparC_open_relay(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"spawn", l_spawn}, {"signal", l_signal}, {"join", l_join}, {"answer", l_answer},
    {"engine", l_engine}, {"stats", l_stats}, {"stop", l_stop}, {NULL, NULL}};
  luaL_newmetatable(L, RELAY_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_stop);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  static const luaL_Reg functions[] = {{"relay", l_relay}, {NULL, NULL}};
  luaL_setfuncs(L, functions, 0);
}

/*
** The lpar.hostrelay type: a joined host's relay (core/hostrelay.h).
**
**   core.host_relay{link=, first=, count=, n=, host=, engine=, env={...}, handler=}
**
** takes the link of `link`, a connected lpar.cluster that has joined (the
** cluster is left with none). The handler hears ("ready", engine),
** ("exit", engine, status, signal) and ("closed", reason, silent).
*/
#define HOSTRELAY_MT "lpar.hostrelay"

typedef struct hostrelay_ud {
  lparJ_relay *j;
  lua_State *L;
  int handler_ref;
} hostrelay_ud;

static int push_host_event(lua_State *L) {
  const lparJ_event *ev = lua_touserdata(L, 1);
  lua_settop(L, 0);
  switch (ev->kind) {
  case LPARJ_READY:
    lua_pushstring(L, "ready");
    lua_pushinteger(L, ev->engine);
    return 2;
  case LPARJ_EXIT:
    lua_pushstring(L, "exit");
    lua_pushinteger(L, ev->engine);
    lua_pushinteger(L, ev->status);
    lua_pushinteger(L, ev->signal);
    return 4;
  case LPARJ_CLOSED:
    lua_pushstring(L, "closed");
    lua_pushstring(L, ev->reason);
    lua_pushboolean(L, ev->silent);
    return 3;
  }
  return 0;
}

static void on_host_event(lparJ_relay *j, const lparJ_event *ev, void *ud) {
  (void)j;
  hostrelay_ud *u = ud;
  call_handler(u->L, u->handler_ref, push_host_event, ev, "host relay");
}

static int int_field(lua_State *L, const char *name, int fallback) {
  lua_getfield(L, 1, name);
  int v = (int)luaL_optinteger(L, -1, fallback);
  lua_pop(L, 1);
  return v;
}

static int l_host_relay(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lparJ_config cfg = {.on_event = on_host_event};
  cfg.first = int_field(L, "first", -1);
  cfg.count = int_field(L, "count", 0);
  cfg.n = int_field(L, "n", 0);
  cfg.host = opt_field(L, "host");
  cfg.engines.engine_path = opt_field(L, "engine");
  cfg.engines.env = lparC_check_env(L, 1); /* stays on the stack until lparJ_new has copied it */
  lua_getfield(L, 1, "handler");
  luaL_argexpected(L, lua_isfunction(L, -1), 1, "table with a handler function");
  lua_pop(L, 1);
  hostrelay_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  u->handler_ref = LUA_NOREF;
  luaL_setmetatable(L, HOSTRELAY_MT);
  lua_getfield(L, 1, "link");
  lparR_route *link = lparC_take_link(L, lua_gettop(L)); /* raises before anything is owned */
  lua_pop(L, 1);
  lua_getfield(L, 1, "handler");
  u->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  u->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  cfg.ud = u;
  char err[512] = "";
  int rc = lparJ_new(luv_loop(L), link, &cfg, &u->j, err, sizeof err);
  if (rc < 0) {
    u->j = NULL;
    lparC_unref(L, &u->handler_ref);
    return lparC_push_error(L, err, rc);
  }
  return 1;
}

static hostrelay_ud *check_hostrelay(lua_State *L) {
  hostrelay_ud *u = luaL_checkudata(L, 1, HOSTRELAY_MT);
  if (u->j == NULL) luaL_error(L, "the host relay is stopped");
  return u;
}

static int l_host_spawn(lua_State *L) {
  hostrelay_ud *u = check_hostrelay(L);
  char err[512];
  int rc = lparJ_spawn(u->j, (int)luaL_checkinteger(L, 2), err, sizeof err);
  if (rc < 0) {
    return lparC_push_error(L, err, rc);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_host_stop(lua_State *L) {
  hostrelay_ud *u = luaL_checkudata(L, 1, HOSTRELAY_MT);
  if (u->j) {
    lparJ_free(u->j);
    u->j = NULL;
  }
  lparC_unref(L, &u->handler_ref);
  return 0;
}

void lparC_open_hostrelay(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"spawn", l_host_spawn}, {"stop", l_host_stop}, {NULL, NULL}};
  luaL_newmetatable(L, HOSTRELAY_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_host_stop);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_host_stop);
  lua_setfield(L, -2, "__close");
  lua_pop(L, 1);
  static const luaL_Reg functions[] = {{"host_relay", l_host_relay}, {NULL, NULL}};
  luaL_setfuncs(L, functions, 0);
}
