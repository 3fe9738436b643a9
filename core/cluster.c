/*
** cluster.c: the engines a host drives, local children or behind a
** standalone controller, with one send and one vocabulary of events.
**
** Local engines: each is a child process spawned with posix_spawn (glibc's
** vfork path: cheap even from a large parent) with one end of a socketpair
** as fd 3 and a datagram socket for descriptors as fd 4; the parent's ends
** are a route (route.h). The child's exit is watched through a pidfd, so a
** death is seen at once and its status is exact. Engines sit in their own
** process group, so a Ctrl-C typed at the host's terminal does not kill them.
**
** Connected: one sealed link to a controller carries every engine's
** traffic, the route field naming the engine; the controller tells of
** engines coming and going with HELLO and EXIT frames.
*/
#include "lpar.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cluster.h"
#include "link.h"
#include "place.h"
#include "route.h"
#include "wire.h"

extern char **environ;

typedef struct engine {
  lpar_cluster *c;
  int id;
  pid_t pid;
  int pidfd;
  lparR_route *route; /* NULL once closed */
  uv_poll_t exit_poll;
  int alive;   /* process not yet reaped */
  int retired; /* slot released; freed once its handles have closed */
  int open;    /* handles not yet closed: the poll, the route */
  uint64_t last_seen; /* uv_now when it last sent a frame */
  int heartbeat_ms;   /* its heartbeat period, as its hello said (0: none) */
} engine;

/* What a connected cluster knows of an engine behind its controller. */
typedef struct remote_engine {
  int state; /* 0 unknown, 1 ready, 2 dead */
  int pid;
  int inline_only; /* its hello said: no descriptors (an engine joined from elsewhere) */
} remote_engine;

struct lpar_cluster {
  uv_loop_t *loop;
  lpar_event_cb on_event;
  void *ud;
  char errmsg[256];
  int freeing;
  int handles_open; /* engines and links whose handles are not closed yet */
  /* local */
  char *engine_path;
  char **env; /* extra entries, copied */
  int blas_threads;
  engine **slots;
  int nslots;
  uint64_t bad_messages;
  /* connected */
  lparR_route *link;
  remote_engine *remote;
  int nremote;
  /* batching: frames sent meanwhile wait on corked routes (see lpar_cluster_batch_begin) */
  int batch_depth;    /* lpar_cluster_batch_begin calls not yet ended */
  int in_dispatch;    /* handling the frames of one read */
  int *corked;        /* engines whose routes are corked (-1: the link) */
  int ncorked, capcorked;
};

static int fail(lpar_cluster *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(lpar_cluster *c, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->errmsg, sizeof c->errmsg, fmt, ap);
  va_end(ap);
  return code;
}

const char *lpar_cluster_errmsg(const lpar_cluster *c) {
  if (c == NULL) return "no cluster (out of memory?)";
  return c->errmsg[0] ? c->errmsg : "no error";
}

const char *lpar_default_engine_path(void) {
  static char path[4096]; /* as documented: valid until the next call */
  return lparL_path("engine", path, sizeof path) ? path : "lpar-engine";
}

static char *dup_string(const char *s) {
  size_t n = strlen(s) + 1;
  char *p = malloc(n);
  if (p) memcpy(p, s, n);
  return p;
}

static void free_env(char **env) {
  if (env == NULL) return;
  for (char **p = env; *p; p++) free(*p);
  free(env);
}

static lpar_cluster *cluster_alloc(uv_loop_t *loop, lpar_event_cb on_event, void *ud) {
  lpar_cluster *c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  c->loop = loop;
  c->on_event = on_event;
  c->ud = ud;
  return c;
}

static void cluster_release(lpar_cluster *c) {
  free(c->corked);
  free(c->slots);
  free(c->remote);
  free_env(c->env);
  free(c->engine_path);
  free(c);
}

/* A handle closed: the cluster goes once the last one has, if it is being freed. */
static void handle_gone(lpar_cluster *c) {
  if (--c->handles_open == 0 && c->freeing) cluster_release(c);
}

/* Nothing is reported once the host has freed the cluster. */
static void emit(lpar_cluster *c, lpar_event *ev) {
  if (c->on_event && !c->freeing) c->on_event(c, ev, c->ud);
}

/* ---- local engines ---- */

int lpar_cluster_new(uv_loop_t *loop, const lpar_config *cfg, lpar_cluster **out) {
  if (loop == NULL || cfg == NULL || out == NULL) return LPAR_EINVAL;
  lpar_cluster *c = cluster_alloc(loop, cfg->on_event, cfg->ud);
  if (c == NULL) return LPAR_ENOMEM;
  c->blas_threads = cfg->blas_threads > 0 ? cfg->blas_threads : 1;
  c->engine_path = dup_string(cfg->engine_path ? cfg->engine_path : lpar_default_engine_path());
  size_t n = 0;
  while (cfg->env && cfg->env[n]) n++;
  c->env = calloc(n + 1, sizeof *c->env);
  int ok = c->engine_path && c->env;
  for (size_t i = 0; ok && i < n; i++) ok = (c->env[i] = dup_string(cfg->env[i])) != NULL;
  if (!ok) {
    cluster_release(c);
    return LPAR_ENOMEM;
  }
  *out = c;
  return LPAR_OK;
}

static engine *find_engine(const lpar_cluster *c, int id) {
  if (id < 0 || id >= c->nslots) return NULL;
  return c->slots[id];
}

static void engine_handle_closed(engine *e) {
  if (--e->open > 0) return;
  lpar_cluster *c = e->c;
  free(e);
  handle_gone(c);
}

static void on_exit_poll_closed(uv_handle_t *h) { engine_handle_closed(h->data); }

/* Release the slot and close the handles; memory goes in the close callbacks. */
static void retire(engine *e) {
  if (e->retired) return;
  e->retired = 1;
  if (e->c->slots[e->id] == e) e->c->slots[e->id] = NULL;
  if (e->route) lparR_close(e->route, NULL);
  uv_close((uv_handle_t *)&e->exit_poll, on_exit_poll_closed);
  if (e->pidfd >= 0) close(e->pidfd); /* uv_close does not close the fd of a poll */
  e->pidfd = -1;
}

/* An engine without its socket is useless: make sure it goes. */
static void disconnect(engine *e) {
  if (e->route) lparR_close(e->route, NULL);
  if (e->alive) kill(e->pid, SIGKILL);
}

static void engine_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds,
                         int nfds, void *ud) {
  (void)r;
  engine *e = ud;
  e->c->in_dispatch = 1;
  uv_update_time(e->c->loop); /* the loop's time may be stale after Lua ran */
  e->last_seen = uv_now(e->c->loop);
  if (h->type == LPAR_MSG_HEARTBEAT) return; /* only a sign of life */
  lpar_event ev = {.kind = h->type == LPAR_MSG_HELLO ? LPAR_EV_READY : LPAR_EV_MESSAGE,
                   .engine = e->id, .type = h->type, .flags = h->flags, .id = h->id,
                   .payload = payload, .len = (size_t)h->len, .fds = fds, .nfds = nfds};
  if (ev.kind == LPAR_EV_READY) {
    ev.pid = lparW_hello_pid(payload, (size_t)h->len);
    e->heartbeat_ms = lparW_hello_heartbeat(payload, (size_t)h->len);
  }
  emit(e->c, &ev);
}

static void engine_closed(lparR_route *r, const char *reason, int refused, void *ud) {
  (void)r;
  engine *e = ud;
  e->route = NULL;
  if (refused) {
    e->c->bad_messages++;
    lpar_event ev = {.kind = LPAR_EV_BAD_MESSAGE, .engine = e->id, .reason = reason};
    emit(e->c, &ev);
  }
  if (e->alive) kill(e->pid, SIGKILL); /* its EXIT follows from the pidfd */
  engine_handle_closed(e);
}

static void uncork_all(lpar_cluster *c);

/* The frames of one read are handled: what their handlers sent goes out together. */
static void engine_dispatched(lparR_route *r, void *ud) {
  (void)r;
  lpar_cluster *c = ((engine *)ud)->c;
  c->in_dispatch = 0;
  if (c->batch_depth == 0) uncork_all(c);
}

static const lparR_handlers engine_handlers = {engine_frame, engine_closed, NULL, engine_dispatched};

static void on_exit_poll(uv_poll_t *p, int status, int events) {
  (void)status;
  (void)events;
  engine *e = p->data;
  int st = 0;
  pid_t r = waitpid(e->pid, &st, WNOHANG);
  if (r == 0) return; /* spurious */
  uv_poll_stop(p);
  e->alive = 0;
  if (e->route) lparR_drain(e->route); /* a dead engine's last words are still in the socket */
  disconnect(e);
  lpar_event ev = {.kind = LPAR_EV_EXIT, .engine = e->id, .exit_status = -1};
  if (r == e->pid && WIFEXITED(st)) ev.exit_status = WEXITSTATUS(st);
  if (r == e->pid && WIFSIGNALED(st)) ev.term_signal = WTERMSIG(st);
  lpar_cluster *c = e->c;
  retire(e);
  emit(c, &ev);
}

/* environ minus the names we set, then ours, then the host's extra entries. */
static char **engine_environment(lpar_cluster *c, int id, int n) {
  static const char *const ours[] = {"LPAR_FD=", "LPAR_SIDE_FD=", "LPAR_ENGINE_ID=", "LPAR_ENGINE_N=",
                                     "LPAR_PARENT_PID=", "OPENBLAS_NUM_THREADS="};
  size_t nenv = 0, nextra = 0;
  while (environ[nenv]) nenv++;
  while (c->env[nextra]) nextra++;
  char **env = calloc(nenv + nextra + 7, sizeof *env);
  if (env == NULL) return NULL;
  size_t k = 0;
  for (size_t i = 0; i < nenv; i++) {
    int skip = 0;
    for (size_t j = 0; j < sizeof ours / sizeof *ours; j++)
      skip |= strncmp(environ[i], ours[j], strlen(ours[j])) == 0;
    for (size_t j = 0; j < nextra && !skip; j++) {
      const char *eq = strchr(c->env[j], '=');
      size_t len = eq ? (size_t)(eq - c->env[j]) + 1 : strlen(c->env[j]);
      skip |= strncmp(environ[i], c->env[j], len) == 0;
    }
    if (!skip) env[k++] = dup_string(environ[i]);
  }
  char tmp[64];
  env[k++] = dup_string("LPAR_FD=3");
  env[k++] = dup_string("LPAR_SIDE_FD=4");
  snprintf(tmp, sizeof tmp, "LPAR_ENGINE_ID=%d", id);
  env[k++] = dup_string(tmp);
  snprintf(tmp, sizeof tmp, "LPAR_ENGINE_N=%d", n);
  env[k++] = dup_string(tmp);
  snprintf(tmp, sizeof tmp, "LPAR_PARENT_PID=%ld", (long)getpid());
  env[k++] = dup_string(tmp);
  int blas_given = 0;
  for (size_t j = 0; j < nextra; j++)
    blas_given |= strncmp(c->env[j], ours[5], strlen(ours[5])) == 0;
  if (!blas_given) {
    snprintf(tmp, sizeof tmp, "OPENBLAS_NUM_THREADS=%d", c->blas_threads);
    env[k++] = dup_string(tmp);
  }
  for (size_t j = 0; j < nextra; j++) env[k++] = dup_string(c->env[j]);
  for (size_t i = 0; i < k; i++) {
    if (env[i] == NULL) {
      for (size_t j = 0; j < k; j++) free(env[j]);
      free(env);
      return NULL;
    }
  }
  return env;
}

/* posix_spawn's own error (errno value), or 0. */
static int spawn_process(lpar_cluster *c, int child_fd, int child_side, char **env, pid_t *pid) {
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, child_fd, 3);
  posix_spawn_file_actions_adddup2(&fa, child_side, 4);
  posix_spawnattr_init(&attr);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF |
                                      POSIX_SPAWN_SETPGROUP);
  char *argv[] = {c->engine_path, NULL};
  int err = posix_spawn(pid, c->engine_path, &fa, &attr, argv, env);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  return err;
}

/* The descriptor fd, moved to a number above `min` if it is not already. */
static int move_above(int fd, int min) {
  if (fd < 0 || fd > min) return fd;
  int moved = fcntl(fd, F_DUPFD_CLOEXEC, min + 1);
  close(fd);
  return moved;
}

static int grow_slots(lpar_cluster *c, int id) {
  if (id < c->nslots) return LPAR_OK;
  int n = c->nslots ? c->nslots : 8;
  while (n <= id) n *= 2;
  engine **s = realloc(c->slots, (size_t)n * sizeof *s);
  if (s == NULL) return LPAR_ENOMEM;
  for (int i = c->nslots; i < n; i++) s[i] = NULL;
  c->slots = s;
  c->nslots = n;
  return LPAR_OK;
}

/* Start the process; its ends of the sockets go to sv[0], side[0]. */
static int start_engine(lpar_cluster *c, int id, int n, int sv[2], int side[2], pid_t *pid) {
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
    return fail(c, LPAR_ESYS, "cannot start engine %d: socketpair: %s", id, strerror(errno));
  if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, side) < 0) {
    int err = errno;
    close(sv[0]);
    close(sv[1]);
    return fail(c, LPAR_ESYS, "cannot start engine %d: socketpair: %s", id, strerror(err));
  }
  /* dup2(fd, fd) would keep close-on-exec set: keep the child's ends above 4. */
  sv[1] = move_above(sv[1], 4);
  side[1] = move_above(side[1], 4);
  char **env = engine_environment(c, id, n);
  int err = env && sv[1] >= 0 && side[1] >= 0 ? spawn_process(c, sv[1], side[1], env, pid) : ENOMEM;
  free_env(env);
  if (sv[1] >= 0) close(sv[1]);
  if (side[1] >= 0) close(side[1]);
  if (err == 0) return LPAR_OK;
  close(sv[0]);
  close(side[0]);
  return fail(c, err == ENOMEM ? LPAR_ENOMEM : LPAR_ESPAWN, "cannot start engine %d (%s): %s", id,
              c->engine_path, strerror(err));
}

int lpar_cluster_spawn(lpar_cluster *c, int id, int n) {
  if (c->link) return fail(c, LPAR_EINVAL, "engines behind a controller are started by it");
  if (c->freeing || id < 0 || n < 1 || id >= 1 << 20)
    return fail(c, LPAR_EINVAL, "engine id %d of %d is out of range", id, n);
  if (grow_slots(c, id) < 0) return fail(c, LPAR_ENOMEM, "out of memory");
  if (c->slots[id] && c->slots[id]->alive)
    return fail(c, LPAR_EINVAL, "engine %d is running already", id);
  int sv[2], side[2];
  pid_t pid = 0;
  int rc = start_engine(c, id, n, sv, side, &pid);
  if (rc < 0) return rc;
  int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  engine *e = calloc(1, sizeof *e);
  if (pidfd < 0 || e == NULL) {
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    close(sv[0]);
    close(side[0]);
    if (pidfd >= 0) close(pidfd);
    free(e);
    return fail(c, pidfd < 0 ? LPAR_ESYS : LPAR_ENOMEM, "cannot watch engine %d", id);
  }
  uv_update_time(c->loop);
  *e = (engine){.c = c, .id = id, .pid = pid, .pidfd = pidfd, .alive = 1,
                .last_seen = uv_now(c->loop)};
  if (lparR_open(c->loop, LPARR_ENGINE, sv[0], side[0], NULL, 0, &engine_handlers, e, &e->route) < 0) {
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    close(pidfd);
    free(e);
    return fail(c, LPAR_ESYS, "cannot watch engine %d's socket", id);
  }
  uv_poll_init(c->loop, &e->exit_poll, pidfd);
  e->exit_poll.data = e;
  e->open = 2;
  c->handles_open++;
  if (c->slots[id]) retire(c->slots[id]);
  c->slots[id] = e;
  uv_poll_start(&e->exit_poll, UV_READABLE, on_exit_poll);
  return LPAR_OK;
}

/* ---- connected to a controller ---- */

static remote_engine *remote_slot(lpar_cluster *c, int id) {
  if (id < 0 || id > LPARR_MAX_ROUTE) return NULL;
  if (id >= c->nremote) {
    int n = c->nremote ? c->nremote : 8;
    while (n <= id) n *= 2;
    remote_engine *r = realloc(c->remote, (size_t)n * sizeof *r);
    if (r == NULL) return NULL;
    memset(r + c->nremote, 0, (size_t)(n - c->nremote) * sizeof *r);
    c->remote = r;
    c->nremote = n;
  }
  return &c->remote[id];
}

static void link_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds,
                       int nfds, void *ud) {
  (void)r;
  lpar_cluster *c = ud;
  c->in_dispatch = 1;
  lpar_event ev = {.kind = LPAR_EV_MESSAGE, .engine = (int)h->route, .type = h->type,
                   .flags = h->flags, .id = h->id, .payload = payload, .len = (size_t)h->len,
                   .fds = fds, .nfds = nfds};
  char why[192]; /* an EXIT's why: ev.reason points into it */
  if (h->type == LPAR_MSG_HELLO) {
    ev.kind = LPAR_EV_READY;
    ev.pid = lparW_hello_pid(payload, (size_t)h->len);
    remote_engine *e = remote_slot(c, (int)h->route);
    if (e) *e = (remote_engine){1, ev.pid, (h->flags & LPAR_FLAG_INLINE) != 0};
  } else if (h->type == LPAR_MSG_EXIT) {
    ev.kind = LPAR_EV_EXIT;
    lparW_exit_parse(payload, (size_t)h->len, &ev.exit_status, &ev.term_signal, why, sizeof why);
    if (why[0]) ev.reason = why; /* what the controller knows of why: a host gone silent */
    remote_engine *e = remote_slot(c, (int)h->route);
    if (e) e->state = 2;
  }
  emit(c, &ev);
}

static void link_closed(lparR_route *r, const char *reason, int refused, void *ud) {
  (void)r;
  lpar_cluster *c = ud;
  c->link = NULL;
  if (!c->freeing) {
    lpar_event ev = {.kind = LPAR_EV_CLOSED, .engine = -1, .reason = reason, .exit_status = refused};
    emit(c, &ev);
  }
  handle_gone(c);
}

static void link_dispatched(lparR_route *r, void *ud) {
  (void)r;
  lpar_cluster *c = ud;
  c->in_dispatch = 0;
  if (c->batch_depth == 0) uncork_all(c);
}

static const lparR_handlers link_handlers = {link_frame, link_closed, NULL, link_dispatched};

int lpar_cluster_connect(uv_loop_t *loop, const lpar_connect_config *cfg, lpar_cluster **out) {
  if (loop == NULL || cfg == NULL || out == NULL || (cfg->path == NULL && cfg->host == NULL))
    return LPAR_EINVAL;
  lpar_cluster *c = cluster_alloc(loop, cfg->on_event, cfg->ud);
  if (c == NULL) return LPAR_ENOMEM;
  int rc = lparL_connect(loop, cfg->path, cfg->host, cfg->port, cfg->key, &link_handlers, c,
                         &c->link, c->errmsg, sizeof c->errmsg);
  if (rc < 0) {
    *out = c; /* for lpar_cluster_errmsg; lpar_cluster_free releases it */
    return rc;
  }
  c->handles_open = 1;
  *out = c;
  return LPAR_OK;
}

/* ---- the same calls for both ---- */

int lpar_cluster_send(lpar_cluster *c, int engine, int type, unsigned flags, uint64_t id,
                      const void *payload, size_t len) {
  return lpar_cluster_send_fds(c, engine, type, flags, id, payload, len, NULL, 0);
}

/* The route a message to `engine` takes, or a negative code. */
static int route_to(lpar_cluster *c, int id, lparR_route **r, unsigned *field) {
  if (c->freeing) return LPAR_ECLOSED;
  if (c->link) {
    if (id < 0 || id > LPARR_MAX_ROUTE) return LPAR_ENOENGINE;
    *r = c->link;
    *field = (unsigned)id;
    return LPAR_OK;
  }
  if (c->engine_path == NULL) return LPAR_EDEAD; /* a connected cluster whose link is gone */
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  if (e->route == NULL) return LPAR_EDEAD;
  *r = e->route;
  *field = 0;
  return LPAR_OK;
}

/* Inside a batch: cork the route a frame to `engine` takes, remembering it. */
static void cork_for(lpar_cluster *c, int engine, lparR_route *r) {
  if (lparR_is_corked(r)) return;
  if (c->ncorked == c->capcorked) {
    int n = c->capcorked ? 2 * c->capcorked : 16;
    int *p = realloc(c->corked, (size_t)n * sizeof *p);
    if (p == NULL) return; /* then it is written at once, as outside a batch */
    c->corked = p;
    c->capcorked = n;
  }
  lparR_cork(r);
  c->corked[c->ncorked++] = r == c->link ? -1 : engine;
}

/* By id, not by pointer: a route may have closed since it was corked. */
static void uncork_all(lpar_cluster *c) {
  for (int i = 0; i < c->ncorked; i++) {
    lparR_route *r = NULL;
    unsigned field = 0;
    if (c->corked[i] < 0)
      r = c->link;
    else if (route_to(c, c->corked[i], &r, &field) < 0)
      r = NULL;
    if (r) lparR_uncork(r);
  }
  c->ncorked = 0;
}

void lpar_cluster_batch_begin(lpar_cluster *c) { c->batch_depth++; }

void lpar_cluster_batch_end(lpar_cluster *c) {
  if (c->batch_depth > 0 && --c->batch_depth == 0 && !c->in_dispatch) uncork_all(c);
}

int lpar_cluster_send_fds(lpar_cluster *c, int engine, int type, unsigned flags, uint64_t id,
                          const void *payload, size_t len, const int *fds, int nfds) {
  lparR_route *r = NULL;
  unsigned field = 0;
  int rc = route_to(c, engine, &r, &field);
  if (rc < 0) return rc;
  if (c->batch_depth > 0 || c->in_dispatch) cork_for(c, engine, r);
  rc = lparR_send(r, type, flags, field, id, payload, len, fds, nfds);
  return rc == LPAR_EINVAL && nfds > 0 ? LPAR_EUNSENDABLE : rc;
}

int lpar_cluster_send_many(lpar_cluster *c, const int *engines, int n, int type, unsigned flags,
                           uint64_t first_id, const void *payload, size_t len, const int *fds,
                           int nfds, int *rcs) {
  if (n < 1 || engines == NULL) return LPAR_EINVAL;
  if (c->freeing) return LPAR_ECLOSED;
  flags &= ~(unsigned)(LPAR_FLAG_ROUTES | LPAR_FLAG_SHM);
  if (c->link == NULL || n == 1) {
    int first = LPAR_OK;
    for (int i = 0; i < n; i++) {
      int rc = lpar_cluster_send_fds(c, engines[i], type, flags, first_id + (uint64_t)i, payload,
                                     len, fds, nfds);
      if (rcs) rcs[i] = rc;
      if (rc < 0 && first == LPAR_OK) first = rc;
    }
    return first;
  }
  /* Behind a controller: once over the link, with the route list. */
  if (n > LPARW_MAX_FANOUT) return LPAR_EINVAL;
  for (int i = 0; i < n; i++)
    if (engines[i] < 0 || engines[i] > LPARR_MAX_ROUTE) return LPAR_ENOENGINE;
  size_t bytes = lparW_fanout_bytes((size_t)n);
  char *list = malloc(bytes);
  if (list == NULL) return LPAR_ENOMEM;
  lparW_fanout_count(list, (size_t)n);
  for (int i = 0; i < n; i++) lparW_fanout_put(list, (size_t)i, (unsigned)engines[i], (unsigned)i);
  int rc = lparR_send2(c->link, type, flags | LPAR_FLAG_ROUTES, 0, first_id, list, bytes, payload,
                       len, fds, nfds);
  free(list);
  if (rc == LPAR_EINVAL && nfds > 0) rc = LPAR_EUNSENDABLE;
  for (int i = 0; rcs && i < n; i++) rcs[i] = rc;
  return rc;
}

int lpar_cluster_execute(lpar_cluster *c, int engine, uint64_t id, const char *code, size_t len) {
  return lpar_cluster_send(c, engine, LPAR_MSG_EXECUTE, LPAR_FLAG_TEXT | LPAR_FLAG_RAW, id, code,
                           len);
}

int lpar_cluster_passes_fds(const lpar_cluster *c, int engine) {
  if (c->link == NULL) return c->engine_path != NULL;
  if (!lparR_passes_fds(c->link)) return 0;
  if (engine >= LPAR_ANY_ENGINE) {
    /* The controller picks: descriptors would keep it to its local engines. */
    for (int i = 0; i < c->nremote; i++)
      if (c->remote[i].state == 1 && c->remote[i].inline_only) return 0;
    return 1;
  }
  return !(engine >= 0 && engine < c->nremote && c->remote[engine].inline_only);
}

int lpar_cluster_signal(lpar_cluster *c, int id, int sig) {
  if (c->link) {
    char text[16];
    int n = snprintf(text, sizeof text, "%d", sig);
    return lpar_cluster_send(c, id, LPAR_MSG_SIGNAL, LPAR_FLAG_RAW, 0, text, (size_t)n);
  }
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  if (!e->alive) return LPAR_EDEAD;
  return kill(e->pid, sig) == 0 ? LPAR_OK : LPAR_ESYS;
}

int lpar_cluster_interrupt(lpar_cluster *c, int id, uint64_t mid) {
  if (c->link) return lpar_cluster_send(c, id, LPAR_MSG_INTERRUPT, LPAR_FLAG_RAW, mid, "", 0);
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  if (!e->alive) return LPAR_EDEAD;
  union sigval v = {.sival_ptr = (void *)(uintptr_t)mid};
  return sigqueue(e->pid, SIGINT, v) == 0 ? LPAR_OK : LPAR_ESYS;
}

int64_t lpar_cluster_silence_ms(const lpar_cluster *c, int id) {
  if (c->link || c->remote) return LPAR_ENOENGINE;
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  if (!e->alive || e->route == NULL) return LPAR_EDEAD;
  uv_update_time(c->loop);
  uint64_t now = uv_now(c->loop);
  return now > e->last_seen ? (int64_t)(now - e->last_seen) : 0;
}

int lpar_cluster_heartbeat_ms(const lpar_cluster *c, int id) {
  if (c->link || c->remote) return LPAR_ENOENGINE;
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  return e->heartbeat_ms;
}

int lpar_cluster_pid(lpar_cluster *c, int id) {
  if (c->link || c->remote) {
    if (id < 0 || id >= c->nremote || c->remote[id].state == 0) return LPAR_ENOENGINE;
    return c->remote[id].state == 1 && c->link ? c->remote[id].pid : LPAR_EDEAD;
  }
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  return e->alive ? (int)e->pid : LPAR_EDEAD;
}

uint64_t lpar_cluster_bad_messages(const lpar_cluster *c) { return c->bad_messages; }

const char *lpar_cluster_cipher(const lpar_cluster *c) {
  return c->link ? lparR_cipher(c->link) : "none";
}

int lparK_send_raw(lpar_cluster *c, int engine, const void *bytes, size_t len) {
  lparR_route *r = NULL;
  unsigned field = 0;
  int rc = route_to(c, engine, &r, &field);
  return rc < 0 ? rc : lparR_send_raw(r, bytes, len);
}

lparR_route *lparK_link(lpar_cluster *c) { return c->link; }

lparR_route *lparK_take_link(lpar_cluster *c) {
  lparR_route *r = c->link;
  if (r == NULL) return NULL;
  lparR_set_handlers(r, NULL, NULL);
  c->link = NULL;
  handle_gone(c); /* the link no longer keeps c; its new owner closes it */
  return r;
}
int lparK_connected(const lpar_cluster *c) { return c->engine_path == NULL; }

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

void lpar_cluster_stop(lpar_cluster *c) {
  if (c->link) {
    lparR_close(c->link, "closed by this client");
    return; /* link_closed follows from the loop */
  }
  /* Close every socket first, so all engines see EOF and exit in parallel. */
  for (int i = 0; i < c->nslots; i++)
    if (c->slots[i] && c->slots[i]->route) lparR_close(c->slots[i]->route, NULL);
  double deadline = now_ms() + 200;
  for (int i = 0; i < c->nslots; i++) {
    engine *e = c->slots[i];
    if (e == NULL) continue;
    while (e->alive) {
      if (waitpid(e->pid, NULL, WNOHANG) != 0) {
        e->alive = 0;
      } else if (now_ms() > deadline) { /* busy in a loop: no EOF will reach it */
        kill(e->pid, SIGKILL);
        waitpid(e->pid, NULL, 0);
        e->alive = 0;
      } else {
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
      }
    }
    retire(e);
  }
}

void lpar_cluster_free(lpar_cluster *c) {
  if (c == NULL || c->freeing) return;
  lpar_cluster_stop(c);
  c->freeing = 1;
  if (c->handles_open == 0) cluster_release(c);
}
