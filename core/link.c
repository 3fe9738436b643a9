/*
** link.c: authenticated links between a standalone controller and its
** clients (and the engines that join it), on a libuv loop.
*/
#include "link.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <sodium.h>

#include "lpar.h"

#define HANDSHAKE_MS 5000

struct lparL_server {
  union {
    uv_pipe_t pipe;
    uv_tcp_t tcp;
  } h;
  int is_tcp;
  int port;
  int auth_timeout_ms;
  unsigned char key[LPARA_KEY_BYTES];
  lparL_accept_cb on_accept;
  void *ud;
  uint64_t refused, disconnected;
  int links; /* open links still counting on this server */
  int closing;
};

struct lparL_link {
  union {
    uv_pipe_t pipe;
    uv_tcp_t tcp;
  } h;
  lparL_server *server; /* NULL on the connecting side */
  uv_timer_t auth_timer; /* server side: cut off a peer that never authenticates */
  int open_handles;      /* freed when the last one has closed */
  lparA_channel chan;
  unsigned char nonce[LPARA_NONCE_BYTES]; /* ours */
  int have_session;                       /* the peer's nonce has come */
  int authenticated;                      /* a frame of the peer's has passed */
  int closing;
  const char *close_reason;
  int refused_close;
  char reason[160];
  lparW_reader reader;
  lparL_handlers handlers;
  void *ud;
};

typedef struct write_req {
  uv_write_t req;
  char data[];
} write_req;

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/*
** A write to a socket whose peer is gone raises SIGPIPE, which kills a
** process by default: a client would die with its controller. libuv writes
** with plain write(), so the signal is ignored instead, as Node does, when
** the host has not chosen otherwise; the write then fails with EPIPE.
*/
void lparL_ignore_sigpipe(void) {
  struct sigaction old;
  if (sigaction(SIGPIPE, NULL, &old) == 0 && old.sa_handler == SIG_DFL &&
      !(old.sa_flags & SA_SIGINFO))
    signal(SIGPIPE, SIG_IGN);
}

/* ---- closing ---- */

static void server_release(lparL_server *s) {
  if (s->closing == 2 && s->links == 0) {
    sodium_memzero(s->key, sizeof s->key);
    free(s);
  }
}

static void on_link_closed(uv_handle_t *h) {
  lparL_link *l = h->data;
  if (--l->open_handles > 0) return;
  if (l->handlers.on_close)
    l->handlers.on_close(l, l->close_reason ? l->close_reason : "closed", l->refused_close,
                         l->ud);
  lparW_reader_free(&l->reader);
  sodium_memzero(&l->chan, sizeof l->chan);
  lparL_server *s = l->server;
  free(l);
  if (s) {
    s->links--;
    server_release(s);
  }
}

static void close_link(lparL_link *l, const char *reason, int refused) {
  if (l->closing) return;
  l->closing = 1;
  l->close_reason = reason;
  l->refused_close = refused;
  if (refused && l->server) l->server->disconnected++;
  if (l->server) uv_close((uv_handle_t *)&l->auth_timer, on_link_closed);
  uv_close((uv_handle_t *)&l->h, on_link_closed);
}

void lparL_close(lparL_link *l) { close_link(l, NULL, 0); }

/* ---- reading ---- */

static void refuse(lparL_link *l, const char *what, const char *why) {
  if (l->server) l->server->refused++;
  snprintf(l->reason, sizeof l->reason, "%s: %s", what, why);
  close_link(l, l->reason, 1);
}

static void dispatch(lparL_link *l) {
  lparW_reader *r = &l->reader;
  if (!l->have_session) {
    if (r->buf.len - r->pos < LPARA_NONCE_BYTES) return;
    lparA_set_session(&l->chan, l->nonce, (unsigned char *)r->buf.data + r->pos);
    r->pos += LPARA_NONCE_BYTES;
    l->have_session = 1;
  }
  while (!l->closing) {
    lparW_header h;
    const char *payload = NULL, *reason = NULL;
    int rc = lparW_reader_next(r, &h, &payload, &reason);
    if (rc == 0) return;
    if (rc < 0) {
      l->chan.dropped++; /* lparA_verify counts the other refusals */
      refuse(l, "malformed frame", reason);
      return;
    }
    const unsigned char *trailer = (const unsigned char *)payload + h.len;
    if (lparA_verify(&l->chan, payload - LPARW_HEADER_SIZE, LPARW_HEADER_SIZE + (size_t)h.len,
                     trailer, &reason) != LPAR_OK) {
      refuse(l, "message failed authentication", reason);
      return;
    }
    if (!l->authenticated) {
      l->authenticated = 1;
      if (l->server) uv_timer_stop(&l->auth_timer);
      r->max_len = LPAR_MAX_PAYLOAD;
    }
    if (l->handlers.on_frame) l->handlers.on_frame(l, &h, payload, l->ud);
  }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  lparL_link *l = h->data;
  char *p = NULL;
  size_t n = 0;
  if (lparW_reader_space(&l->reader, &p, &n) < 0) n = 0;
  *buf = uv_buf_init(p, (unsigned)(n > UINT32_MAX ? UINT32_MAX : n));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  lparL_link *l = s->data;
  if (nread > 0) {
    lparW_reader_commit(&l->reader, (size_t)nread);
    dispatch(l);
  } else if (nread < 0) {
    close_link(l, nread == UV_EOF ? "the peer closed the connection" : "connection lost", 0);
  }
}

static lparL_link *link_new(void) {
  lparL_link *l = calloc(1, sizeof *l);
  if (l == NULL) return NULL;
  lparW_reader_init(&l->reader);
  l->reader.routed = 1;
  l->reader.trailer = LPARA_TRAILER_BYTES;
  l->reader.max_len = LPARL_UNAUTHENTICATED_MAX;
  lparA_nonce(l->nonce);
  return l;
}

/* ---- writing ---- */

static void on_write(uv_write_t *req, int status) {
  (void)status; /* a failed write shows as a read error and on_close */
  free(req);
}

/* Write the pieces in order: what the socket takes now, then a queued copy. */
static int write_pieces(lparL_link *l, uv_buf_t *b, int nb) {
  if (l->closing) return LPAR_ECLOSED;
  int n = uv_try_write((uv_stream_t *)&l->h, b, (unsigned)nb);
  if (n < 0 && n != UV_EAGAIN) return LPAR_ECLOSED;
  size_t done = n > 0 ? (size_t)n : 0, total = 0;
  for (int i = 0; i < nb; i++) total += b[i].len;
  if (done == total) return LPAR_OK;
  write_req *w = malloc(sizeof *w + (total - done));
  if (w == NULL) return LPAR_ENOMEM;
  size_t k = 0, skip = done;
  for (int i = 0; i < nb; i++) {
    size_t take = b[i].len;
    if (skip >= take) {
      skip -= take;
      continue;
    }
    memcpy(w->data + k, b[i].base + skip, take - skip);
    k += take - skip;
    skip = 0;
  }
  uv_buf_t rest = uv_buf_init(w->data, (unsigned)k);
  if (uv_write(&w->req, (uv_stream_t *)&l->h, &rest, 1, on_write) != 0) {
    free(w);
    return LPAR_ECLOSED;
  }
  return LPAR_OK;
}

static int check_frame(const lparL_link *l, unsigned route, size_t len) {
  if (!l->have_session && l->server) return LPAR_EINVAL; /* peer's nonce not in yet */
  if (route > LPARL_MAX_ROUTE) return LPAR_EINVAL;
  if (len > LPAR_MAX_PAYLOAD || len > UINT32_MAX) return LPAR_ETOOBIG;
  return LPAR_OK;
}

/* The header and trailer of the next frame: signing consumes a sequence number. */
static int seal(lparL_link *l, int type, unsigned flags, unsigned route, uint64_t id,
                const void *payload, size_t len, char head[LPARW_HEADER_SIZE],
                unsigned char trailer[LPARA_TRAILER_BYTES]) {
  int rc = check_frame(l, route, len);
  if (rc < 0) return rc;
  lparW_pack_routed(head, type, flags, route, id, len);
  lparA_sign2(&l->chan, head, LPARW_HEADER_SIZE, payload, len, trailer);
  return LPAR_OK;
}

int lparL_send(lparL_link *l, int type, unsigned flags, unsigned route, uint64_t id,
               const void *payload, size_t len) {
  char head[LPARW_HEADER_SIZE];
  unsigned char trailer[LPARA_TRAILER_BYTES];
  int rc = seal(l, type, flags, route, id, payload, len, head, trailer);
  if (rc < 0) return rc;
  uv_buf_t b[3] = {uv_buf_init(head, sizeof head), uv_buf_init((char *)payload, (unsigned)len),
                   uv_buf_init((char *)trailer, sizeof trailer)};
  return write_pieces(l, b, 3);
}

int lparL_sign(lparL_link *l, int type, unsigned flags, unsigned route, uint64_t id,
               const void *payload, size_t len, lparB_buffer *out) {
  char head[LPARW_HEADER_SIZE];
  unsigned char trailer[LPARA_TRAILER_BYTES];
  int rc = seal(l, type, flags, route, id, payload, len, head, trailer);
  if (rc < 0) return rc;
  if (lparB_append(out, head, sizeof head) < 0 || lparB_append(out, payload, len) < 0 ||
      lparB_append(out, trailer, sizeof trailer) < 0)
    return LPAR_ENOMEM;
  return LPAR_OK;
}

int lparL_send_raw(lparL_link *l, const void *bytes, size_t len) {
  uv_buf_t b = uv_buf_init((char *)bytes, (unsigned)len);
  return write_pieces(l, &b, 1);
}

void lparL_set_handlers(lparL_link *l, const lparL_handlers *handlers, void *ud) {
  if (handlers)
    l->handlers = *handlers;
  else
    memset(&l->handlers, 0, sizeof l->handlers);
  l->ud = ud;
}

uint64_t lparL_refused(const lparL_link *l) { return l->chan.dropped; }

/* ---- the listening side ---- */

static void on_auth_timeout(uv_timer_t *t) {
  lparL_link *l = t->data;
  snprintf(l->reason, sizeof l->reason, "no authenticated message within %d ms",
           l->server->auth_timeout_ms);
  l->server->refused++;
  close_link(l, l->reason, 1);
}

static void on_connection(uv_stream_t *srv, int status) {
  lparL_server *s = srv->data;
  if (status < 0 || s->closing) return;
  lparL_link *l = link_new();
  if (l == NULL) return;
  lparA_init(&l->chan, s->key, LPARA_CONTROLLER);
  int rc = s->is_tcp ? uv_tcp_init(srv->loop, &l->h.tcp) : uv_pipe_init(srv->loop, &l->h.pipe, 0);
  if (rc != 0) {
    lparW_reader_free(&l->reader);
    free(l);
    return;
  }
  l->h.pipe.data = l;
  l->server = s;
  s->links++;
  uv_timer_init(srv->loop, &l->auth_timer);
  l->auth_timer.data = l;
  l->open_handles = 2;
  uv_timer_start(&l->auth_timer, on_auth_timeout, (uint64_t)s->auth_timeout_ms, 0);
  if (uv_accept(srv, (uv_stream_t *)&l->h) != 0) {
    close_link(l, "accept failed", 0);
    return;
  }
  if (s->is_tcp) uv_tcp_nodelay(&l->h.tcp, 1);
  s->on_accept(s, l, s->ud);
  uv_buf_t b = uv_buf_init((char *)l->nonce, sizeof l->nonce);
  if (write_pieces(l, &b, 1) != LPAR_OK || uv_read_start((uv_stream_t *)&l->h, on_alloc, on_read) != 0)
    close_link(l, "connection lost", 0);
}

int lparL_listen(uv_loop_t *loop, const char *path, const char *ip, int port,
                 const unsigned char key[LPARA_KEY_BYTES], lparL_accept_cb on_accept, void *ud,
                 lparL_server **out, char *err, size_t errlen) {
  lparL_server *s = calloc(1, sizeof *s);
  if (s == NULL) return LPAR_ENOMEM;
  lparL_ignore_sigpipe();
  memcpy(s->key, key, LPARA_KEY_BYTES);
  s->auth_timeout_ms = LPARL_AUTH_TIMEOUT_MS;
  s->on_accept = on_accept;
  s->ud = ud;
  int rc;
  if (path) {
    if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
      set_err(err, errlen, "socket path too long for a unix socket (%s)", path);
      free(s);
      return LPAR_EINVAL;
    }
    uv_pipe_init(loop, &s->h.pipe, 0);
    /* Created with no access for others from the start, then bound. */
    mode_t old = umask(0177);
    rc = uv_pipe_bind(&s->h.pipe, path);
    umask(old);
  } else {
    s->is_tcp = 1;
    uv_tcp_init(loop, &s->h.tcp);
    struct sockaddr_storage addr;
    rc = uv_ip4_addr(ip, port, (struct sockaddr_in *)&addr);
    if (rc != 0) rc = uv_ip6_addr(ip, port, (struct sockaddr_in6 *)&addr);
    if (rc == 0) rc = uv_tcp_bind(&s->h.tcp, (struct sockaddr *)&addr, 0);
  }
  s->h.pipe.data = s;
  if (rc == 0) rc = uv_listen((uv_stream_t *)&s->h, 128, on_connection);
  if (rc != 0) {
    set_err(err, errlen, "cannot listen on %s: %s", path ? path : ip, uv_strerror(rc));
    s->closing = 2;
    uv_close((uv_handle_t *)&s->h, (uv_close_cb)free);
    return LPAR_ESYS;
  }
  if (s->is_tcp) {
    struct sockaddr_storage addr;
    int len = sizeof addr;
    uv_tcp_getsockname(&s->h.tcp, (struct sockaddr *)&addr, &len);
    s->port = ntohs(addr.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&addr)->sin6_port
                                                : ((struct sockaddr_in *)&addr)->sin_port);
  }
  *out = s;
  return LPAR_OK;
}

int lparL_server_port(const lparL_server *s) { return s->port; }
void lparL_server_set_auth_timeout(lparL_server *s, int ms) { s->auth_timeout_ms = ms; }
uint64_t lparL_server_refused(const lparL_server *s) { return s->refused; }
uint64_t lparL_server_disconnected(const lparL_server *s) { return s->disconnected; }

static void on_server_closed(uv_handle_t *h) {
  lparL_server *s = h->data;
  s->closing = 2;
  server_release(s);
}

void lparL_server_close(lparL_server *s) {
  if (s->closing) return;
  s->closing = 1;
  uv_close((uv_handle_t *)&s->h, on_server_closed);
}

/* ---- the connecting side ---- */

static int open_socket(const char *path, const char *host, int port, char *err, size_t errlen) {
  if (path) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) {
      set_err(err, errlen, "socket path too long for a unix socket (%s)", path);
      return -1;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
      set_err(err, errlen, "cannot connect to %s: %s", path, strerror(errno));
      if (fd >= 0) close(fd);
      return -1;
    }
    return fd;
  }
  char service[16];
  snprintf(service, sizeof service, "%d", port);
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
  int rc = getaddrinfo(host, service, &hints, &res);
  if (rc != 0) {
    set_err(err, errlen, "cannot resolve %s: %s", host, gai_strerror(rc));
    return -1;
  }
  int fd = -1, saved = 0;
  for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      saved = errno;
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(res);
  if (fd < 0) set_err(err, errlen, "cannot connect to %s: %s", host, strerror(saved));
  return fd;
}

/* Read exactly n bytes within the handshake's time. */
static int read_exactly(int fd, unsigned char *p, size_t n) {
  size_t got = 0;
  while (got < n) {
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int rc = poll(&pfd, 1, HANDSHAKE_MS);
    if (rc == 0) return -1;
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return -1;
    ssize_t k = read(fd, p + got, n - got);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    got += (size_t)k;
  }
  return 0;
}

int lparL_connect(uv_loop_t *loop, const char *path, const char *host, int port,
                  const unsigned char key[LPARA_KEY_BYTES], const lparL_handlers *handlers,
                  void *ud, lparL_link **out, char *err, size_t errlen) {
  lparL_ignore_sigpipe();
  int fd = open_socket(path, host, port, err, errlen);
  if (fd < 0) return LPAR_ESYS;
  lparL_link *l = link_new();
  if (l == NULL) {
    close(fd);
    return LPAR_ENOMEM;
  }
  lparA_init(&l->chan, key, LPARA_CLIENT);
  unsigned char theirs[LPARA_NONCE_BYTES];
  if (lparW_write_all(fd, l->nonce, sizeof l->nonce) < 0 ||
      read_exactly(fd, theirs, sizeof theirs) < 0) {
    set_err(err, errlen, "%s did not answer as an lpar controller", path ? path : host);
    close(fd);
    lparW_reader_free(&l->reader);
    free(l);
    return LPAR_ESYS;
  }
  lparA_set_session(&l->chan, l->nonce, theirs);
  l->have_session = 1;
  l->open_handles = 1;
  int rc = path ? uv_pipe_init(loop, &l->h.pipe, 0) : uv_tcp_init(loop, &l->h.tcp);
  if (rc == 0) rc = path ? uv_pipe_open(&l->h.pipe, fd) : uv_tcp_open(&l->h.tcp, fd);
  l->h.pipe.data = l;
  if (rc != 0) {
    set_err(err, errlen, "cannot use the connection to %s: %s", path ? path : host,
            uv_strerror(rc));
    close(fd);
    l->closing = 1;
    uv_close((uv_handle_t *)&l->h, on_link_closed);
    return LPAR_ESYS;
  }
  if (!path) uv_tcp_nodelay(&l->h.tcp, 1);
  lparL_set_handlers(l, handlers, ud);
  if (uv_read_start((uv_stream_t *)&l->h, on_alloc, on_read) != 0) {
    lparL_set_handlers(l, NULL, NULL); /* the caller never sees this link */
    close_link(l, "connection lost", 0);
    set_err(err, errlen, "cannot read from %s", path ? path : host);
    return LPAR_ESYS;
  }
  *out = l;
  return LPAR_OK;
}
