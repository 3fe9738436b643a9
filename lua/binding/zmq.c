/*
** zmq.c: lpar.zmq, a thin binding over libzmq for the Jupyter kernel.
**
** Only what a kernel needs: a context, sockets (bind, multipart send and
** non-blocking receive, ZMQ_FD and ZMQ_EVENTS for an event loop), a
** heartbeat echo on a thread of its own, and HMAC-SHA256 and base64 from
** libsodium. The loop integration is Lua's: a luv poll handle watches each
** socket's ZMQ_FD. That descriptor is edge-triggered (it signals a change
** of ZMQ_EVENTS, not readiness), so the Lua side drains every socket with
** events()/recv() until it says nothing is left, after each wakeup and
** after each send. Failures return nil, message, errno, as luv does.
*/
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <sodium.h>
#include <zmq.h>

#include "kernel_interrupt.h"

#define MAX_RELAYED 64 /* frames of one control message kept by the relay */

#define CONTEXT_MT "lpar.zmq.context"
#define SOCKET_MT "lpar.zmq.socket"
#define MAX_FRAMES 4096 /* more parts than any Jupyter message has */

typedef struct relay {
  void *outside;       /* the control ROUTER, bound where Jupyter connects */
  void *inside;        /* a PAIR to the kernel's loop */
  unsigned char *key;  /* the connection file's key, to authenticate interrupts */
  size_t keylen;
} relay;

typedef struct context_ud {
  void *ctx;
  pthread_t threads[2]; /* the heartbeat and the control relay */
  int nthreads;
  relay control;
} context_ud;

typedef struct socket_ud {
  void *s;
} socket_ud;

static int push_zmq_error(lua_State *L, const char *what) {
  int e = zmq_errno();
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", what, zmq_strerror(e));
  lua_pushinteger(L, e);
  return 3;
}

/* ---- context ---- */

static context_ud *check_context(lua_State *L) {
  context_ud *c = luaL_checkudata(L, 1, CONTEXT_MT);
  if (c->ctx == NULL) luaL_error(L, "the zmq context is closed");
  return c;
}

static int l_context(lua_State *L) {
  context_ud *c = lua_newuserdatauv(L, sizeof *c, 0);
  memset(c, 0, sizeof *c);
  c->ctx = zmq_ctx_new();
  if (c->ctx == NULL) return push_zmq_error(L, "zmq_ctx_new");
  luaL_setmetatable(L, CONTEXT_MT);
  return 1;
}

/* The heartbeat: echo every message on a REP socket, on its own thread, so
** the frontend sees the kernel alive even while a cell computes. It ends
** when the context is shut down (ETERM). */
static void *heartbeat_main(void *arg) {
  void *s = arg;
  lparK_block_sigint();
  zmq_msg_t msg;
  for (;;) {
    if (zmq_msg_init(&msg) != 0) break;
    if (zmq_msg_recv(&msg, s, 0) < 0) {
      zmq_msg_close(&msg);
      if (zmq_errno() == EINTR) continue;
      break;
    }
    int more = zmq_msg_more(&msg);
    int rc;
    do rc = zmq_msg_send(&msg, s, more ? ZMQ_SNDMORE : 0);
    while (rc < 0 && zmq_errno() == EINTR);
    if (rc < 0) {
      zmq_msg_close(&msg);
      if (zmq_errno() == ETERM) break;
    }
  }
  zmq_close(s);
  return NULL;
}

/* ctx:heartbeat(endpoint) -> the bound endpoint */
static int l_heartbeat(lua_State *L) {
  context_ud *c = check_context(L);
  const char *endpoint = luaL_checkstring(L, 2);
  if (c->nthreads >= 2) return luaL_error(L, "the heartbeat already runs");
  void *s = zmq_socket(c->ctx, ZMQ_REP);
  if (s == NULL) return push_zmq_error(L, "zmq_socket(REP)");
  int linger = 0;
  if (zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger) != 0) {
    int n = push_zmq_error(L, "zmq_setsockopt(ZMQ_LINGER)");
    zmq_close(s);
    return n;
  }
  if (zmq_bind(s, endpoint) != 0) {
    int n = push_zmq_error(L, "zmq_bind");
    zmq_close(s);
    return n;
  }
  char last[256];
  size_t len = sizeof last;
  if (zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, last, &len) != 0) {
    int n = push_zmq_error(L, "zmq_getsockopt(ZMQ_LAST_ENDPOINT)");
    zmq_close(s);
    return n;
  }
  /* The socket moves to the thread; pthread_create is the memory barrier
  ** that libzmq asks for when a socket changes threads. */
  int e = pthread_create(&c->threads[c->nthreads], NULL, heartbeat_main, s);
  if (e != 0) {
    zmq_close(s);
    lua_pushnil(L);
    lua_pushfstring(L, "pthread_create: %s", strerror(e));
    lua_pushinteger(L, e);
    return 3;
  }
  c->nthreads++;
  lua_pushstring(L, last);
  return 1;
}

/* The threads end when the context is shut down: their calls fail with ETERM. */
static void stop_threads(context_ud *c) {
  zmq_ctx_shutdown(c->ctx);
  for (int i = 0; i < c->nthreads; i++) pthread_join(c->threads[i], NULL);
  c->nthreads = 0;
  free(c->control.key);
  c->control.key = NULL;
}


/*
** The control relay. Jupyter sends interrupt_request and shutdown_request on
** the control channel, and expects them served while a cell computes; a
** cell busy in Lua does not run the loop, so the control ROUTER is read by
** a thread of its own. It forwards every message, both ways, to a PAIR the
** kernel's loop reads; and when an authenticated message asks for an
** interrupt or a shutdown, it also interrupts the running cell right away,
** as SIGINT does, so the loop gets to run and answer it.
*/
/* Receive one message's frames: 0, or 1 when it had too many parts (read
** through and dropped), or -1 when the socket failed. */
static int recv_frames(void *from, zmq_msg_t *frames, int *nframes) {
  int n = 0, more = 1, dropped = 0;
  while (more) {
    zmq_msg_t m;
    if (zmq_msg_init(&m) != 0) {
      for (int i = 0; i < n; i++) zmq_msg_close(&frames[i]);
      return -1;
    }
    int rc;
    do rc = zmq_msg_recv(&m, from, 0);
    while (rc < 0 && zmq_errno() == EINTR);
    if (rc < 0) {
      zmq_msg_close(&m);
      for (int i = 0; i < n; i++) zmq_msg_close(&frames[i]);
      return -1;
    }
    more = zmq_msg_more(&m);
    if (n < MAX_RELAYED) frames[n++] = m;
    else {
      zmq_msg_close(&m);
      dropped = 1;
    }
  }
  if (dropped) {
    for (int i = 0; i < n; i++) zmq_msg_close(&frames[i]);
    n = 0;
  }
  *nframes = n;
  return dropped;
}

static int frame_is(zmq_msg_t *m, const char *text) {
  size_t len = strlen(text);
  return zmq_msg_size(m) == len && memcmp(zmq_msg_data(m), text, len) == 0;
}

/* Whether the frames are a signed interrupt or shutdown request. */
static int is_urgent(const relay *r, zmq_msg_t *frames, int n) {
  int d = 0;
  while (d < n && !frame_is(&frames[d], "<IDS|MSG>")) d++;
  if (d + 5 >= n) return 0; /* the delimiter, a signature and four parts */
  if (r->keylen > 0) {
    crypto_auth_hmacsha256_state st;
    crypto_auth_hmacsha256_init(&st, r->key, r->keylen);
    for (int i = d + 2; i <= d + 5; i++)
      crypto_auth_hmacsha256_update(&st, zmq_msg_data(&frames[i]), zmq_msg_size(&frames[i]));
    unsigned char mac[crypto_auth_hmacsha256_BYTES];
    crypto_auth_hmacsha256_final(&st, mac);
    char hex[2 * sizeof mac + 1];
    sodium_bin2hex(hex, sizeof hex, mac, sizeof mac);
    zmq_msg_t *sig = &frames[d + 1];
    if (zmq_msg_size(sig) != 2 * sizeof mac || sodium_memcmp(zmq_msg_data(sig), hex, 2 * sizeof mac) != 0)
      return 0;
  }
  zmq_msg_t *h = &frames[d + 2];
  size_t len = zmq_msg_size(h);
  char header[1024];
  if (len >= sizeof header) len = sizeof header - 1;
  memcpy(header, zmq_msg_data(h), len);
  header[len] = '\0';
  return strstr(header, "\"interrupt_request\"") != NULL || strstr(header, "\"shutdown_request\"") != NULL;
}

static int send_frames(void *to, zmq_msg_t *frames, int n) {
  int failed = 0;
  for (int i = 0; i < n; i++) {
    int rc = -1;
    if (!failed) {
      do rc = zmq_msg_send(&frames[i], to, i < n - 1 ? ZMQ_SNDMORE : 0);
      while (rc < 0 && zmq_errno() == EINTR);
    }
    if (rc < 0) {
      failed = 1;
      zmq_msg_close(&frames[i]);
    }
  }
  return failed ? -1 : 0;
}

static void *relay_main(void *arg) {
  relay *r = arg;
  lparK_block_sigint();
  zmq_msg_t frames[MAX_RELAYED];
  zmq_pollitem_t items[2] = {{r->outside, 0, ZMQ_POLLIN, 0}, {r->inside, 0, ZMQ_POLLIN, 0}};
  for (;;) {
    if (zmq_poll(items, 2, -1) < 0) {
      if (zmq_errno() == EINTR) continue;
      break; /* ETERM: the kernel is ending */
    }
    for (int i = 0; i < 2; i++) {
      if (!(items[i].revents & ZMQ_POLLIN)) continue;
      void *from = i == 0 ? r->outside : r->inside, *to = i == 0 ? r->inside : r->outside;
      int n, rc = recv_frames(from, frames, &n);
      if (rc < 0) goto done;
      if (rc > 0) continue;
      if (i == 0 && is_urgent(r, frames, n)) lparK_interrupt_main();
      if (send_frames(to, frames, n) < 0 && zmq_errno() == ETERM) goto done;
    }
  }
done:
  zmq_close(r->outside);
  zmq_close(r->inside);
  return NULL;
}

/* ctx:control_relay(endpoint, key) -> a PAIR socket carrying the control
** channel's messages (identities first, as a ROUTER hands them over) */
static int l_control_relay(lua_State *L) {
  context_ud *c = check_context(L);
  const char *endpoint = luaL_checkstring(L, 2);
  size_t keylen;
  const char *key = luaL_checklstring(L, 3, &keylen);
  if (c->nthreads >= 2 || c->control.outside) return luaL_error(L, "the control relay already runs");
  relay *r = &c->control;
  char inproc[64];
  snprintf(inproc, sizeof inproc, "inproc://lpar-control-%p", (void *)c);
  void *outside = zmq_socket(c->ctx, ZMQ_ROUTER), *inside = zmq_socket(c->ctx, ZMQ_PAIR);
  socket_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->s = zmq_socket(c->ctx, ZMQ_PAIR);
  luaL_setmetatable(L, SOCKET_MT);
  int linger = 0;
  const char *failed = NULL;
  if (!outside || !inside || !u->s) failed = "zmq_socket";
  else if (zmq_setsockopt(outside, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
           zmq_setsockopt(inside, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
           zmq_setsockopt(u->s, ZMQ_LINGER, &linger, sizeof linger) != 0)
    failed = "zmq_setsockopt(ZMQ_LINGER)";
  else if (zmq_bind(outside, endpoint) != 0) failed = "zmq_bind";
  else if (zmq_bind(inside, inproc) != 0 || zmq_connect(u->s, inproc) != 0) failed = "inproc";
  if (failed == NULL) {
    r->key = malloc(keylen + 1);
    if (r->key == NULL) failed = "out of memory";
    else memcpy(r->key, key, keylen);
    r->keylen = keylen;
  }
  if (failed == NULL) {
    r->outside = outside;
    r->inside = inside;
    if (pthread_create(&c->threads[c->nthreads], NULL, relay_main, r) != 0) failed = "pthread_create";
  }
  if (failed) {
    int n = push_zmq_error(L, failed);
    if (outside) zmq_close(outside);
    if (inside) zmq_close(inside);
    r->outside = r->inside = NULL;
    return n;
  }
  c->nthreads++;
  return 1;
}

/* ctx:term(): stop the heartbeat, then end the context. Every socket of
** this context must be closed first (zmq_ctx_term waits for them). */
static int l_term(lua_State *L) {
  context_ud *c = luaL_checkudata(L, 1, CONTEXT_MT);
  if (c->ctx == NULL) return 0;
  stop_threads(c);
  int rc;
  do rc = zmq_ctx_term(c->ctx);
  while (rc != 0 && zmq_errno() == EINTR);
  c->ctx = NULL;
  return 0;
}

/* Collected: stop the heartbeat, but do not wait for sockets that may be
** collected after the context (zmq_ctx_term would wait for them forever). */
static int l_context_gc(lua_State *L) {
  context_ud *c = luaL_checkudata(L, 1, CONTEXT_MT);
  if (c->ctx == NULL) return 0;
  stop_threads(c);
  return 0;
}

static const struct {
  const char *name;
  int type;
} socket_types[] = {{"ROUTER", ZMQ_ROUTER}, {"DEALER", ZMQ_DEALER}, {"PUB", ZMQ_PUB},
                    {"SUB", ZMQ_SUB},       {"REP", ZMQ_REP},       {"REQ", ZMQ_REQ}};

/* ctx:socket("ROUTER" | "PUB" | ...) -> socket */
static int l_socket(lua_State *L) {
  context_ud *c = check_context(L);
  const char *name = luaL_checkstring(L, 2);
  int type = -1;
  for (size_t i = 0; i < sizeof socket_types / sizeof *socket_types; i++)
    if (strcmp(socket_types[i].name, name) == 0) type = socket_types[i].type;
  if (type < 0) return luaL_argerror(L, 2, "unknown socket type");
  socket_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->s = zmq_socket(c->ctx, type);
  if (u->s == NULL) return push_zmq_error(L, "zmq_socket");
  luaL_setmetatable(L, SOCKET_MT);
  int linger = 0; /* closing never waits for a peer that went away */
  if (zmq_setsockopt(u->s, ZMQ_LINGER, &linger, sizeof linger) != 0)
    return push_zmq_error(L, "zmq_setsockopt(ZMQ_LINGER)");
  return 1;
}

/* ---- sockets ---- */

static socket_ud *check_socket(lua_State *L) {
  socket_ud *u = luaL_checkudata(L, 1, SOCKET_MT);
  if (u->s == NULL) luaL_error(L, "the zmq socket is closed");
  return u;
}

/* sock:bind(endpoint) -> the bound endpoint (tcp://127.0.0.1:PORT) */
static int l_bind(lua_State *L) {
  socket_ud *u = check_socket(L);
  const char *endpoint = luaL_checkstring(L, 2);
  if (zmq_bind(u->s, endpoint) != 0) return push_zmq_error(L, "zmq_bind");
  char last[256];
  size_t len = sizeof last;
  if (zmq_getsockopt(u->s, ZMQ_LAST_ENDPOINT, last, &len) != 0)
    return push_zmq_error(L, "zmq_getsockopt(ZMQ_LAST_ENDPOINT)");
  lua_pushstring(L, last);
  return 1;
}

/* sock:connect(endpoint) -> true (a test's client side) */
static int l_connect(lua_State *L) {
  socket_ud *u = check_socket(L);
  if (zmq_connect(u->s, luaL_checkstring(L, 2)) != 0) return push_zmq_error(L, "zmq_connect");
  lua_pushboolean(L, 1);
  return 1;
}

/* sock:fd() -> ZMQ_FD, for a luv poll handle */
static int l_fd(lua_State *L) {
  socket_ud *u = check_socket(L);
  int fd;
  size_t len = sizeof fd;
  if (zmq_getsockopt(u->s, ZMQ_FD, &fd, &len) != 0) return push_zmq_error(L, "zmq_getsockopt(ZMQ_FD)");
  lua_pushinteger(L, fd);
  return 1;
}

/* sock:readable() -> whether a message waits (ZMQ_EVENTS & ZMQ_POLLIN).
** Reading ZMQ_EVENTS also rearms ZMQ_FD. */
static int l_readable(lua_State *L) {
  socket_ud *u = check_socket(L);
  int events;
  size_t len = sizeof events;
  int rc;
  do rc = zmq_getsockopt(u->s, ZMQ_EVENTS, &events, &len);
  while (rc != 0 && zmq_errno() == EINTR);
  if (rc != 0) return push_zmq_error(L, "zmq_getsockopt(ZMQ_EVENTS)");
  lua_pushboolean(L, (events & ZMQ_POLLIN) != 0);
  return 1;
}

/* sock:recv() -> {frames...}, or false when nothing waits (never blocks) */
static int l_recv(lua_State *L) {
  socket_ud *u = check_socket(L);
  lua_newtable(L);
  int n = 0, more = 1;
  while (more) {
    zmq_msg_t msg;
    if (zmq_msg_init(&msg) != 0) return push_zmq_error(L, "zmq_msg_init");
    int rc;
    do rc = zmq_msg_recv(&msg, u->s, n == 0 ? ZMQ_DONTWAIT : 0);
    while (rc < 0 && zmq_errno() == EINTR);
    if (rc < 0) {
      zmq_msg_close(&msg);
      if (n == 0 && zmq_errno() == EAGAIN) {
        lua_pushboolean(L, 0);
        return 1;
      }
      return push_zmq_error(L, "zmq_msg_recv");
    }
    more = zmq_msg_more(&msg);
    if (n < MAX_FRAMES) { /* a flood of parts is read through, not kept */
      lua_pushlstring(L, zmq_msg_data(&msg), zmq_msg_size(&msg));
      lua_rawseti(L, -2, ++n);
    }
    zmq_msg_close(&msg);
  }
  return 1;
}

/* sock:send({frames...}) -> true; one multipart message */
static int l_send(lua_State *L) {
  socket_ud *u = check_socket(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer n = luaL_len(L, 2);
  if (n < 1) return luaL_argerror(L, 2, "no frames to send");
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, 2, i);
    size_t len;
    const char *data = lua_tolstring(L, -1, &len);
    if (data == NULL) return luaL_error(L, "frame %d is not a string", (int)i);
    int rc;
    do rc = zmq_send(u->s, data, len, i < n ? ZMQ_SNDMORE : 0);
    while (rc < 0 && zmq_errno() == EINTR);
    lua_pop(L, 1);
    if (rc < 0) return push_zmq_error(L, "zmq_send");
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* sock:subscribe(prefix): for a SUB socket */
static int l_subscribe(lua_State *L) {
  socket_ud *u = check_socket(L);
  size_t len;
  const char *prefix = luaL_optlstring(L, 2, "", &len);
  if (zmq_setsockopt(u->s, ZMQ_SUBSCRIBE, prefix, len) != 0)
    return push_zmq_error(L, "zmq_setsockopt(ZMQ_SUBSCRIBE)");
  lua_pushboolean(L, 1);
  return 1;
}

static int l_close(lua_State *L) {
  socket_ud *u = luaL_checkudata(L, 1, SOCKET_MT);
  if (u->s != NULL) {
    zmq_close(u->s); /* fails only on a bad handle, which u->s is not */
    u->s = NULL;
  }
  return 0;
}

/* ---- crypto and encoding (libsodium) ---- */

/* hmac_sha256(key, part1, part2, ...) -> lowercase hex digest */
static int l_hmac_sha256(lua_State *L) {
  size_t klen;
  const char *key = luaL_checklstring(L, 1, &klen);
  crypto_auth_hmacsha256_state st;
  crypto_auth_hmacsha256_init(&st, (const unsigned char *)key, klen);
  int top = lua_gettop(L);
  for (int i = 2; i <= top; i++) {
    size_t len;
    const char *part = luaL_checklstring(L, i, &len);
    crypto_auth_hmacsha256_update(&st, (const unsigned char *)part, len);
  }
  unsigned char mac[crypto_auth_hmacsha256_BYTES];
  crypto_auth_hmacsha256_final(&st, mac);
  char hex[2 * sizeof mac + 1];
  sodium_bin2hex(hex, sizeof hex, mac, sizeof mac);
  lua_pushstring(L, hex);
  return 1;
}

/* equal(a, b) -> whether two strings are equal, in constant time */
static int l_equal(lua_State *L) {
  size_t alen, blen;
  const char *a = luaL_checklstring(L, 1, &alen);
  const char *b = luaL_checklstring(L, 2, &blen);
  lua_pushboolean(L, alen == blen && sodium_memcmp(a, b, alen) == 0);
  return 1;
}

static int l_base64(lua_State *L) {
  size_t len;
  const unsigned char *bin = (const unsigned char *)luaL_checklstring(L, 1, &len);
  size_t size = sodium_base64_ENCODED_LEN(len, sodium_base64_VARIANT_ORIGINAL);
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, size);
  sodium_bin2base64(out, size, bin, len, sodium_base64_VARIANT_ORIGINAL);
  luaL_pushresultsize(&b, size - 1); /* without the terminating NUL */
  return 1;
}

static int l_base64_decode(lua_State *L) {
  size_t len;
  const char *text = luaL_checklstring(L, 1, &len);
  luaL_Buffer b;
  size_t cap = len / 4 * 3 + 3, out_len = 0;
  unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, cap);
  if (sodium_base642bin(out, cap, text, len, "\n\r ", &out_len, NULL,
                        sodium_base64_VARIANT_ORIGINAL) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, "not base64");
    return 2;
  }
  luaL_pushresultsize(&b, out_len);
  return 1;
}

static int l_version(lua_State *L) {
  int major, minor, patch;
  zmq_version(&major, &minor, &patch);
  lua_pushfstring(L, "%d.%d.%d", major, minor, patch);
  return 1;
}

static const luaL_Reg context_methods[] = {
  {"socket", l_socket}, {"heartbeat", l_heartbeat}, {"control_relay", l_control_relay},
  {"term", l_term},     {NULL, NULL}};

static const luaL_Reg socket_methods[] = {
  {"bind", l_bind},     {"connect", l_connect}, {"fd", l_fd},           {"readable", l_readable},
  {"recv", l_recv},     {"send", l_send},       {"subscribe", l_subscribe}, {"close", l_close},
  {NULL, NULL}};

static const luaL_Reg functions[] = {
  {"context", l_context}, {"hmac_sha256", l_hmac_sha256}, {"equal", l_equal},
  {"base64", l_base64},   {"base64_decode", l_base64_decode}, {"version", l_version},
  {NULL, NULL}};

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc) {
  luaL_newmetatable(L, name);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}

int luaopen_lpar_zmq(lua_State *L);

int luaopen_lpar_zmq(lua_State *L) {
  if (sodium_init() < 0) return luaL_error(L, "libsodium failed to initialize");
  new_class(L, CONTEXT_MT, context_methods, l_context_gc);
  new_class(L, SOCKET_MT, socket_methods, l_close);
  luaL_newlib(L, functions);
  lparK_open_interrupt(L);
  return 1;
}
