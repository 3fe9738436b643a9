/*
** link.c: listening for and connecting links (see link.h).
*/
#define _GNU_SOURCE /* accept4 */
#include "link.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <errno.h>
#include <fcntl.h>
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

struct lparL_server {
  lparR_owner owner; /* first: the routes' owner is the server */
  uv_poll_t poll;
  int fd;
  int is_tcp;
  int port;
  int closed; /* listening stopped and its handle closed */
  unsigned char key[LPARA_KEY_BYTES];
  lparL_accept_cb on_accept;
  void *ud;
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* ---- addresses ---- */

/*
** The address of a unix socket at `path`, or else of `ip` (numeric IPv4 or
** IPv6, or "localhost") and `port`. 0, or a negative code with err filled,
** saying what it was for (`verb`: "listen on", "connect to").
*/
static int socket_address(const char *path, const char *ip, int port, const char *verb,
                          struct sockaddr_storage *addr, socklen_t *len, char *err,
                          size_t errlen) {
  memset(addr, 0, sizeof *addr);
  if (path) {
    struct sockaddr_un *un = (struct sockaddr_un *)addr;
    if (strlen(path) >= sizeof un->sun_path) {
      set_err(err, errlen, "socket path too long for a unix socket (%s)", path);
      return LPAR_EINVAL;
    }
    un->sun_family = AF_UNIX;
    strcpy(un->sun_path, path);
    *len = sizeof *un;
    return LPAR_OK;
  }
  struct sockaddr_in *in4 = (struct sockaddr_in *)addr;
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)addr;
  const char *numeric = strcmp(ip, "localhost") == 0 ? "127.0.0.1" : ip;
  if (inet_pton(AF_INET, numeric, &in4->sin_addr) == 1) {
    in4->sin_family = AF_INET;
    in4->sin_port = htons((uint16_t)port);
    *len = sizeof *in4;
  } else if (inet_pton(AF_INET6, numeric, &in6->sin6_addr) == 1) {
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    *len = sizeof *in6;
  } else {
    set_err(err, errlen, "cannot %s %s: not a numeric IP address (resolve it first)", verb, ip);
    return LPAR_EINVAL;
  }
  return LPAR_OK;
}

/* ---- the listening side ---- */

static void server_free(lparL_server *s) {
  sodium_memzero(s->key, sizeof s->key);
  free(s);
}

/* The last route of a closed server is gone: free it. */
static void release_owner(lparR_owner *o) {
  lparL_server *s = (lparL_server *)o;
  if (s->closed) server_free(s);
}

static void accept_one(lparL_server *s, int fd) {
  /* Too many who have not shown the key yet: the oldest makes room (its
     descriptor is closed at once), so idle strangers cannot starve a client. */
  if (s->owner.open_strangers >= LPARL_MAX_STRANGERS &&
      !lparR_evict_oldest_stranger(&s->owner, "cut off: too many connections have not shown the key")) {
    s->owner.refused++;
    s->owner.disconnected++;
    close(fd);
    return;
  }
  if (s->is_tcp) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  lparR_route *r = NULL;
  if (lparR_open(s->poll.loop, s->is_tcp ? LPARR_TCP : LPARR_UNIX, fd, -1, s->key,
                 LPARA_CONTROLLER, NULL, NULL, &r) != LPAR_OK)
    return;
  lparR_set_owner(r, &s->owner);
  lparR_set_auth_timeout(r, LPARL_AUTH_TIMEOUT_MS);
  s->on_accept(s, r, s->ud);
}

static void on_listen_poll(uv_poll_t *p, int status, int events) {
  (void)events;
  lparL_server *s = p->data;
  if (status < 0 || s->closed) return;
  for (int i = 0; i < 64; i++) { /* a burst, but let the others run too */
    int fd = accept4(s->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return; /* EAGAIN, or a connection that died in the backlog */
    accept_one(s, fd);
  }
}

static int bind_socket(const char *path, const char *ip, int port, int *fd, char *err,
                       size_t errlen) {
  struct sockaddr_storage addr;
  socklen_t len;
  int rc = socket_address(path, ip, port, "listen on", &addr, &len, err, errlen);
  if (rc < 0) return rc;
  *fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  int one = 1;
  if (*fd >= 0 && !path) setsockopt(*fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  mode_t old = umask(0177); /* the socket is created with no access for others */
  rc = *fd < 0 ? -1 : bind(*fd, (struct sockaddr *)&addr, len);
  umask(old);
  if (rc == 0) rc = listen(*fd, 128);
  if (rc != 0) {
    set_err(err, errlen, "cannot listen on %s: %s", path ? path : ip, strerror(errno));
    if (*fd >= 0) close(*fd);
    return LPAR_ESYS;
  }
  return LPAR_OK;
}

int lparL_listen(uv_loop_t *loop, const char *path, const char *ip, int port,
                 const unsigned char key[LPARA_KEY_BYTES], lparL_accept_cb on_accept, void *ud,
                 lparL_server **out, char *err, size_t errlen) {
  lparL_server *s = calloc(1, sizeof *s);
  if (s == NULL) return LPAR_ENOMEM;
  int rc = bind_socket(path, ip, port, &s->fd, err, errlen);
  if (rc < 0) {
    free(s);
    return rc;
  }
  memcpy(s->key, key, LPARA_KEY_BYTES);
  s->owner.release = release_owner;
  s->on_accept = on_accept;
  s->ud = ud;
  s->is_tcp = path == NULL;
  if (s->is_tcp) {
    struct sockaddr_storage addr;
    socklen_t len = sizeof addr;
    getsockname(s->fd, (struct sockaddr *)&addr, &len);
    s->port = ntohs(addr.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&addr)->sin6_port
                                                : ((struct sockaddr_in *)&addr)->sin_port);
  }
  uv_poll_init(loop, &s->poll, s->fd);
  s->poll.data = s;
  uv_poll_start(&s->poll, UV_READABLE, on_listen_poll);
  *out = s;
  return LPAR_OK;
}

int lparL_server_port(const lparL_server *s) { return s->port; }
uint64_t lparL_server_refused(const lparL_server *s) { return s->owner.refused; }
uint64_t lparL_server_disconnected(const lparL_server *s) { return s->owner.disconnected; }

static void on_server_closed(uv_handle_t *h) {
  lparL_server *s = h->data;
  close(s->fd);
  s->closed = 1;
  if (s->owner.routes == 0) server_free(s);
}

void lparL_server_close(lparL_server *s) {
  if (uv_is_closing((uv_handle_t *)&s->poll)) return;
  uv_close((uv_handle_t *)&s->poll, on_server_closed);
}

/* ---- the connecting side ---- */

static int connect_socket(const char *path, const char *host, int port, char *err, size_t errlen) {
  struct sockaddr_storage addr;
  socklen_t len;
  if (socket_address(path, host, port, "connect to", &addr, &len, err, errlen) < 0) return -1;
  int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    set_err(err, errlen, "cannot connect to %s: %s", path ? path : host, strerror(errno));
    return -1;
  }
  if (!path) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  /* In progress is fine: the route's first write waits for the connection. */
  if (connect(fd, (struct sockaddr *)&addr, len) != 0 && errno != EINPROGRESS) {
    set_err(err, errlen, "cannot connect to %s: %s", path ? path : host, strerror(errno));
    close(fd);
    return -1;
  }
  return fd;
}

int lparL_connect(uv_loop_t *loop, const char *path, const char *host, int port,
                  const unsigned char key[LPARA_KEY_BYTES], const lparR_handlers *handlers,
                  void *ud, lparR_route **out, char *err, size_t errlen) {
  int fd = connect_socket(path, host, port, err, errlen);
  if (fd < 0) return LPAR_ESYS;
  int rc = lparR_open(loop, path ? LPARR_UNIX : LPARR_TCP, fd, -1, key, LPARA_CLIENT, handlers,
                      ud, out);
  if (rc < 0) set_err(err, errlen, "cannot connect to %s: %s", path ? path : host, lpar_strerror(rc));
  return rc;
}
