/*
** link.c: the binding's face of core/link.c, authenticated connections to
** a standalone controller.
**
**   core.keygen()                       -> 32 random bytes (a cluster key)
**   core.listen{path= | ip=, port=, key=, handler=}
**                                       -> server; handler(link) per connection
**   core.connect{path= | host=, port=, key=, handler=, decode=}
**                                       -> link, or nil, message
**
** A link's handler gets ("frame", type, flags, route, id, payload) for each
** authenticated frame, or with decode = true the same events as a local
** cluster's ("ready", "result", "stdout", ... with the route as the engine)
** plus ("exit", engine, status, signal) and ("control", id, values...).
** Both end with ("closed", reason, refused).
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <luv/luv.h>

#include "binding.h"
#include "link.h"
#include "serialize.h"

#define LINK_MT "lpar.link"
#define SERVER_MT "lpar.server"

typedef struct link_ud {
  lparL_link *l;
  lua_State *L;
  int handler_ref;
  int decode;
  uint64_t undecodable;
  lparB_buffer enc;
} link_ud;

typedef struct server_ud {
  lparL_server *s;
  lua_State *L;
  int handler_ref;
} server_ud;

static lua_State *main_thread(lua_State *L) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  lua_State *M = lua_tothread(L, -1);
  lua_pop(L, 1);
  return M;
}

static void call_handler(lua_State *L, int base, int nargs) {
  if (lua_pcall(L, nargs, 0, base) != LUA_OK)
    fprintf(stderr, "lpar: error in a connection handler: %s\n", lua_tostring(L, -1));
}

/* ---- events ---- */

static int push_decoded(link_ud *u, lua_State *L, const lparW_header *h, const char *payload) {
  switch (h->type) {
  case LPAR_MSG_HELLO:
    lua_pushstring(L, "ready");
    lua_pushinteger(L, h->route);
    lua_pushlstring(L, payload, (size_t)h->len);
    return 3;
  case LPAR_MSG_EXIT: {
    char text[64];
    size_t n = h->len < sizeof text - 1 ? (size_t)h->len : sizeof text - 1;
    memcpy(text, payload, n);
    text[n] = 0;
    int status = -1, sig = 0;
    sscanf(text, "%d %d", &status, &sig);
    lua_pushstring(L, "exit");
    lua_pushinteger(L, h->route);
    lua_pushinteger(L, status);
    lua_pushinteger(L, sig);
    return 4;
  }
  case LPAR_MSG_CONTROL: {
    char err[256];
    int n = 0;
    lua_pushstring(L, "control");
    lua_pushinteger(L, (lua_Integer)h->id);
    if (lparS_decode(L, payload, (size_t)h->len, 0, &n, err, sizeof err) < 0) {
      u->undecodable++;
      lua_pushnil(L);
      lua_pushfstring(L, "the controller's answer could not be decoded: %s", err);
      return 4;
    }
    return 2 + n;
  }
  default: {
    lpar_event ev = {.kind = LPAR_EV_MESSAGE, .engine = (int)h->route, .type = h->type,
                     .flags = h->flags, .id = h->id, .payload = payload, .len = (size_t)h->len};
    return lparC_push_event(&u->undecodable, L, &ev);
  }
  }
}

static void on_frame(lparL_link *l, const lparW_header *h, const char *payload, void *ud) {
  (void)l;
  link_ud *u = ud;
  if (u->handler_ref == LUA_NOREF) return;
  lua_State *L = u->L;
  int top = lua_gettop(L);
  if (!lua_checkstack(L, 16)) return;
  lua_pushcfunction(L, lparC_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, u->handler_ref);
  int n;
  if (u->decode) {
    n = push_decoded(u, L, h, payload);
  } else {
    lua_pushstring(L, "frame");
    lua_pushinteger(L, h->type);
    lua_pushinteger(L, h->flags);
    lua_pushinteger(L, h->route);
    lua_pushinteger(L, (lua_Integer)h->id);
    lua_pushlstring(L, payload, (size_t)h->len);
    n = 6;
  }
  if (n >= 0) call_handler(L, top + 1, n);
  lua_settop(L, top);
}

static void on_close(lparL_link *l, const char *reason, int refused, void *ud) {
  (void)l;
  link_ud *u = ud;
  u->l = NULL;
  lua_State *L = u->L;
  if (u->handler_ref == LUA_NOREF) return;
  int top = lua_gettop(L);
  lua_pushcfunction(L, lparC_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, u->handler_ref);
  lua_pushstring(L, "closed");
  lua_pushstring(L, reason);
  lua_pushboolean(L, refused);
  call_handler(L, top + 1, 3);
  lua_settop(L, top);
  luaL_unref(L, LUA_REGISTRYINDEX, u->handler_ref);
  u->handler_ref = LUA_NOREF;
}

static const lparL_handlers link_handlers = {on_frame, on_close};

static link_ud *new_link_ud(lua_State *L) {
  link_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  u->L = main_thread(L);
  u->handler_ref = LUA_NOREF;
  lparB_init(&u->enc);
  luaL_setmetatable(L, LINK_MT);
  return u;
}

static link_ud *check_link(lua_State *L) {
  link_ud *u = luaL_checkudata(L, 1, LINK_MT);
  if (u->l == NULL) luaL_error(L, "the connection is closed");
  return u;
}

static int check_key(lua_State *L, int t, unsigned char key[LPARA_KEY_BYTES]) {
  lua_getfield(L, t, "key");
  size_t n;
  const char *k = lua_tolstring(L, -1, &n);
  if (k == NULL || n != LPARA_KEY_BYTES)
    return luaL_error(L, "key must be a string of %d bytes", LPARA_KEY_BYTES);
  memcpy(key, k, n);
  lua_pop(L, 1);
  return 0;
}

/* ---- link methods ---- */

/* link:set_handler(fn, decode) */
static int l_link_set_handler(lua_State *L) {
  link_ud *u = check_link(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (u->handler_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, u->handler_ref);
  lua_pushvalue(L, 2);
  u->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  u->decode = lua_toboolean(L, 3);
  return 0;
}

/* link:send(type, route, id, root, values...): the values encoded, matrices inline. */
static int l_link_send(lua_State *L) {
  link_ud *u = check_link(L);
  int type = (int)luaL_checkinteger(L, 2);
  lua_Integer route = luaL_checkinteger(L, 3), id = luaL_checkinteger(L, 4);
  const char *root = luaL_checkstring(L, 5);
  char err[512];
  u->enc.len = 0;
  int rc = lparS_encode(L, 6, lua_gettop(L) - 5, root, &u->enc, err, sizeof err);
  if (rc < 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    lua_pushinteger(L, rc);
    return 3;
  }
  if (route < 0 || route > LPARL_MAX_ROUTE) return luaL_argerror(L, 3, "route out of range");
  rc = lparL_send(u->l, type, 0, (unsigned)route, (uint64_t)id, u->enc.data, u->enc.len);
  if (u->enc.cap > (1u << 24)) lparB_free(&u->enc);
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

/* The arguments of send_bytes and sign: (type, flags, route, id, payload). */
typedef struct frame_args {
  int type;
  unsigned flags, route;
  uint64_t id;
  const char *payload;
  size_t len;
} frame_args;

static frame_args check_frame_args(lua_State *L) {
  frame_args f;
  f.type = (int)luaL_checkinteger(L, 2);
  f.flags = (unsigned)luaL_checkinteger(L, 3) & ~LPAR_FLAG_FDS;
  lua_Integer route = luaL_checkinteger(L, 4);
  if (route < 0 || route > LPARL_MAX_ROUTE) luaL_argerror(L, 4, "route out of range");
  f.route = (unsigned)route;
  f.id = (uint64_t)luaL_checkinteger(L, 5);
  f.payload = luaL_checklstring(L, 6, &f.len);
  return f;
}

/* link:send_bytes(type, flags, route, id, payload) */
static int l_link_send_bytes(lua_State *L) {
  link_ud *u = check_link(L);
  frame_args f = check_frame_args(L);
  int rc = lparL_send(u->l, f.type, f.flags, f.route, f.id, f.payload, f.len);
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

/* link:sign(type, flags, route, id, payload) -> the bytes send_bytes would write. */
static int l_link_sign(lua_State *L) {
  link_ud *u = check_link(L);
  frame_args f = check_frame_args(L);
  lparB_buffer b;
  lparB_init(&b);
  int rc = lparL_sign(u->l, f.type, f.flags, f.route, f.id, f.payload, f.len, &b);
  if (rc < 0) {
    lparB_free(&b);
    return lparC_push_failure(L, rc, NULL);
  }
  lua_pushlstring(L, b.data, b.len);
  lparB_free(&b);
  return 1;
}

static int l_link_send_raw(lua_State *L) {
  link_ud *u = check_link(L);
  size_t n;
  const char *p = luaL_checklstring(L, 2, &n);
  int rc = lparL_send_raw(u->l, p, n);
  if (rc < 0) return lparC_push_failure(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_link_is_open(lua_State *L) {
  link_ud *u = luaL_checkudata(L, 1, LINK_MT);
  lua_pushboolean(L, u->l != NULL);
  return 1;
}

static int l_link_stats(lua_State *L) {
  link_ud *u = luaL_checkudata(L, 1, LINK_MT);
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, (lua_Integer)(u->l ? lparL_refused(u->l) : 0));
  lua_setfield(L, -2, "refused");
  lua_pushinteger(L, (lua_Integer)u->undecodable);
  lua_setfield(L, -2, "undecodable");
  return 1;
}

/* close (the handler still hears "closed" from the loop) */
static int l_link_close(lua_State *L) {
  link_ud *u = luaL_checkudata(L, 1, LINK_MT);
  if (u->l) lparL_close(u->l);
  return 0;
}

/* __gc: the userdata goes away, so the link must not call back into it. */
static int l_link_gc(lua_State *L) {
  link_ud *u = luaL_checkudata(L, 1, LINK_MT);
  if (u->l) {
    lparL_set_handlers(u->l, NULL, NULL);
    lparL_close(u->l);
    u->l = NULL;
  }
  if (u->handler_ref != LUA_NOREF) {
    luaL_unref(L, LUA_REGISTRYINDEX, u->handler_ref);
    u->handler_ref = LUA_NOREF;
  }
  lparB_free(&u->enc);
  return 0;
}

/* ---- servers ---- */

static void on_accept(lparL_server *s, lparL_link *l, void *ud) {
  (void)s;
  server_ud *su = ud;
  lua_State *L = su->L;
  int top = lua_gettop(L);
  lua_pushcfunction(L, lparC_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, su->handler_ref);
  link_ud *u = new_link_ud(L);
  u->l = l;
  lparL_set_handlers(l, &link_handlers, u);
  call_handler(L, top + 1, 1);
  lua_settop(L, top);
}

/*
** The options listen and connect share: key, address (path, or ip/host and
** port) and handler, which is left on the stack top.
*/
static void get_options(lua_State *L, unsigned char key[LPARA_KEY_BYTES], const char **path,
                        const char **host, int *port) {
  luaL_checktype(L, 1, LUA_TTABLE);
  check_key(L, 1, key);
  lua_getfield(L, 1, "path");
  *path = lua_tostring(L, -1);
  lua_getfield(L, 1, "ip");
  *host = lua_tostring(L, -1);
  if (*host == NULL) {
    lua_getfield(L, 1, "host");
    *host = lua_tostring(L, -1);
  }
  lua_getfield(L, 1, "port");
  *port = (int)luaL_optinteger(L, -1, 0);
  if (*path == NULL && *host == NULL) luaL_error(L, "give a socket path, or an ip and port");
  lua_getfield(L, 1, "handler");
  luaL_argexpected(L, lua_isfunction(L, -1), 1, "table with a handler function");
}

static int l_listen(lua_State *L) {
  unsigned char key[LPARA_KEY_BYTES];
  const char *path, *ip;
  int port;
  get_options(L, key, &path, &ip, &port);
  server_ud *su = lua_newuserdatauv(L, sizeof *su, 0);
  memset(su, 0, sizeof *su);
  su->L = main_thread(L);
  lua_pushvalue(L, -2);
  su->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  luaL_setmetatable(L, SERVER_MT);
  char err[512] = "";
  int rc = lparL_listen(luv_loop(L), path, ip, port, key, on_accept, su, &su->s, err, sizeof err);
  if (rc < 0) {
    su->s = NULL;
    lua_pushnil(L);
    lua_pushstring(L, err);
    lua_pushinteger(L, rc);
    return 3;
  }
  return 1;
}

static int l_server_port(lua_State *L) {
  server_ud *su = luaL_checkudata(L, 1, SERVER_MT);
  lua_pushinteger(L, su->s ? lparL_server_port(su->s) : 0);
  return 1;
}

static int l_server_stats(lua_State *L) {
  server_ud *su = luaL_checkudata(L, 1, SERVER_MT);
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, su->s ? (lua_Integer)lparL_server_refused(su->s) : 0);
  lua_setfield(L, -2, "refused");
  lua_pushinteger(L, su->s ? (lua_Integer)lparL_server_disconnected(su->s) : 0);
  lua_setfield(L, -2, "disconnected");
  return 1;
}

static int l_server_close(lua_State *L) {
  server_ud *su = luaL_checkudata(L, 1, SERVER_MT);
  if (su->s) {
    lparL_server_close(su->s);
    su->s = NULL;
  }
  if (su->handler_ref != LUA_NOREF) {
    luaL_unref(L, LUA_REGISTRYINDEX, su->handler_ref);
    su->handler_ref = LUA_NOREF;
  }
  return 0;
}

/* ---- connecting ---- */

static int l_connect(lua_State *L) {
  unsigned char key[LPARA_KEY_BYTES];
  const char *path, *host;
  int port;
  get_options(L, key, &path, &host, &port);
  lua_getfield(L, 1, "decode");
  int decode = lua_toboolean(L, -1);
  lua_pop(L, 1);
  link_ud *u = new_link_ud(L);
  char err[512] = "";
  int rc = lparL_connect(luv_loop(L), path, host, port, key, &link_handlers, u, &u->l, err,
                         sizeof err);
  if (rc < 0) {
    u->l = NULL;
    lua_pushnil(L);
    lua_pushstring(L, err);
    lua_pushinteger(L, rc);
    return 3;
  }
  lua_pushvalue(L, -2);
  u->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  u->decode = decode;
  return 1;
}

static int l_keygen(lua_State *L) {
  unsigned char key[LPARA_KEY_BYTES];
  if (lparA_keygen(key) < 0) return lparC_push_failure(L, LPAR_ESYS, "no randomness");
  lua_pushlstring(L, (const char *)key, sizeof key);
  return 1;
}

static const luaL_Reg link_methods[] = {
  {"set_handler", l_link_set_handler}, {"send", l_link_send},
  {"send_bytes", l_link_send_bytes},   {"sign", l_link_sign},
  {"send_raw", l_link_send_raw},       {"close", l_link_close},
  {"is_open", l_link_is_open},         {"stats", l_link_stats},
  {NULL, NULL}};

static const luaL_Reg server_methods[] = {
  {"port", l_server_port}, {"stats", l_server_stats}, {"close", l_server_close}, {NULL, NULL}};

void lparC_open_link(lua_State *L) {
  luaL_newmetatable(L, LINK_MT);
  luaL_newlib(L, link_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_link_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, SERVER_MT);
  luaL_newlib(L, server_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_server_close);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  static const luaL_Reg functions[] = {
    {"keygen", l_keygen}, {"listen", l_listen}, {"connect", l_connect}, {NULL, NULL}};
  luaL_setfuncs(L, functions, 0);
}
