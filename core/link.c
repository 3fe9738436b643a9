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
  uv_timer_t retry; /* accepting paused: nothing could be taken */
  int handles;      /* of poll and retry, not closed yet */
  int fd;
  int spare; /* a descriptor held back, to take and answer a connection when none is left */
  int is_tcp;
  int port;
  int closed; /* listening stopped and its handles closed */
  uint64_t no_fds; /* connections answered "out of file descriptors" */
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

/* Where the peer on `fd` is: its IPv4 address or IPv6 /64 (TCP), or nothing. */
static void source_of(const lparL_server *s, int fd, lparR_source *src) {
  memset(src, 0, sizeof *src);
  struct sockaddr_storage addr;
  socklen_t len = sizeof addr;
  if (!s->is_tcp || getpeername(fd, (struct sockaddr *)&addr, &len) != 0) return;
  if (addr.ss_family == AF_INET) {
    memcpy(src->bytes, &((struct sockaddr_in *)&addr)->sin_addr, 4);
    src->len = 4;
  } else if (addr.ss_family == AF_INET6) {
    const unsigned char *a = ((struct sockaddr_in6 *)&addr)->sin6_addr.s6_addr;
    static const unsigned char v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (memcmp(a, v4mapped, 12) == 0) { /* an IPv4 peer on a v6 socket is that address */
      memcpy(src->bytes, a + 12, 4);
      src->len = 4;
    } else { /* one host holds a whole /64: count by it, not by address */
      memcpy(src->bytes, a, 8);
      src->len = 8;
    }
  }
}

static void accept_one(lparL_server *s, int fd) {
  /* Too many who have not shown the key yet, from this source or in all: the
     oldest of that source (or of the biggest) makes room, its descriptor
     closed at once, so idle strangers cannot starve a client and one source
     cannot take every place. */
  lparR_source src;
  source_of(s, fd, &src);
  int full = 0;
  if (src.len > 0 && lparR_strangers_from(&s->owner, &src) >= LPARL_MAX_STRANGERS_PER_SOURCE)
    full = !lparR_evict_oldest_stranger(&s->owner, &src,
                                        "cut off: too many connections from its address have not shown the key");
  else if (s->owner.open_strangers >= LPARL_MAX_STRANGERS)
    full = !lparR_evict_oldest_stranger(&s->owner, NULL,
                                        "cut off: too many connections have not shown the key");
  if (full) {
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
  lparR_set_source(r, &src);
  lparR_set_owner(r, &s->owner);
  lparR_set_auth_timeout(r, LPARL_AUTH_TIMEOUT_MS);
  s->on_accept(s, r, s->ud);
}

static void on_listen_poll(uv_poll_t *p, int status, int events);

static void on_retry(uv_timer_t *t) {
  lparL_server *s = t->data;
  if (!s->closed) uv_poll_start(&s->poll, UV_READABLE, on_listen_poll);
}

/* Take no connection for LPARL_RETRY_MS: the listening socket stays
   readable, and polling it meanwhile would spin. */
static void pause_accepting(lparL_server *s) {
  uv_poll_stop(&s->poll);
  uv_timer_start(&s->retry, on_retry, LPARL_RETRY_MS, 0);
}

/*
** accept failed with EMFILE or ENFILE: no descriptor for a connection, if
** one is waiting at all (the kernel says so before it looks). The spare
** descriptor held back for this is let go to take it: then a stranger, if
** any, is cut off to make room and the newcomer stays; with none, the
** newcomer is told why it cannot stay (a notice in place of the hello,
** which the client shows) and closed. The spare is held again after. 1 to
** go on accepting, 0 to stop.
*/
static int out_of_descriptors(lparL_server *s, int err) {
  if (s->spare < 0) s->spare = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (s->spare < 0) { /* not even one: try again shortly */
    pause_accepting(s);
    return 0;
  }
  close(s->spare);
  s->spare = -1;
  int fd = accept4(s->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
  int accept_errno = errno;
  if (fd >= 0 && lparR_evict_oldest_stranger(&s->owner, NULL,
                                             "cut off: the controller ran out of file descriptors")) {
    accept_one(s, fd);
  } else if (fd >= 0) {
    char why[200], drain[256];
    snprintf(why, sizeof why,
             "it is out of file descriptors (%s; pid %d): raise its limit (ulimit -n) "
             "or close some of its connections",
             strerror(err), (int)getpid());
    /* What the client sent is read first: unread bytes would make the close
       reset the connection, and the notice might be lost. */
    while (recv(fd, drain, sizeof drain, MSG_DONTWAIT) > 0) {
    }
    lparR_write_notice(fd, why);
    /* A hello that came after that read would too: say we are done, read
       once more, then close. */
    shutdown(fd, SHUT_WR);
    while (recv(fd, drain, sizeof drain, MSG_DONTWAIT) > 0) {
    }
    close(fd);
    s->no_fds++;
  }
  s->spare = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (fd < 0 && accept_errno != EAGAIN && accept_errno != EWOULDBLOCK) {
    pause_accepting(s);
    return 0;
  }
  return fd >= 0;
}

static void on_listen_poll(uv_poll_t *p, int status, int events) {
  (void)events;
  lparL_server *s = p->data;
  if (status < 0 || s->closed) return;
  for (int i = 0; i < 64; i++) { /* a burst, but let the others run too */
    int fd = accept4(s->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      accept_one(s, fd);
    } else if (errno == EMFILE || errno == ENFILE) {
      if (!out_of_descriptors(s, errno)) return;
    } else if (errno == ENOBUFS || errno == ENOMEM) {
      pause_accepting(s);
      return;
    } else if (errno != EINTR && errno != ECONNABORTED && errno != EPROTO) {
      return; /* EAGAIN: the backlog is empty */
    }
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
  s->spare = open("/dev/null", O_RDONLY | O_CLOEXEC);
  uv_poll_init(loop, &s->poll, s->fd);
  s->poll.data = s;
  uv_timer_init(loop, &s->retry);
  s->retry.data = s;
  s->handles = 2;
  uv_poll_start(&s->poll, UV_READABLE, on_listen_poll);
  *out = s;
  return LPAR_OK;
}

int lparL_server_port(const lparL_server *s) { return s->port; }
uint64_t lparL_server_refused(const lparL_server *s) { return s->owner.refused; }
uint64_t lparL_server_disconnected(const lparL_server *s) { return s->owner.disconnected; }
uint64_t lparL_server_no_fds(const lparL_server *s) { return s->no_fds; }

static void on_server_closed(uv_handle_t *h) {
  lparL_server *s = h->data;
  if (--s->handles > 0) return;
  close(s->fd);
  if (s->spare >= 0) close(s->spare);
  s->closed = 1;
  if (s->owner.routes == 0) server_free(s);
}

void lparL_server_close(lparL_server *s) {
  if (uv_is_closing((uv_handle_t *)&s->poll)) return;
  uv_close((uv_handle_t *)&s->poll, on_server_closed);
  uv_close((uv_handle_t *)&s->retry, on_server_closed);
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
