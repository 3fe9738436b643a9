/*
** cluster.c: local engines, their processes and their sockets.
**
** Each engine is a child process spawned with posix_spawn (glibc's vfork
** path: cheap even from a large parent) with one end of a socketpair as fd 3.
** The parent end is a libuv pipe on the host's loop; the child's exit is
** watched through a pidfd, so a death is seen at once and its status is
** exact. Engines sit in their own process group, so a Ctrl-C typed at the
** host's terminal does not kill them.
*/
#include "lpar.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "link.h"
#include "shm.h"
#include "wire.h"

extern char **environ;

typedef struct engine {
  lpar_cluster *c;
  int id;
  pid_t pid;
  int pidfd;
  int side; /* socket for descriptors (shared memory), blocking */
  uv_pipe_t pipe;
  uv_poll_t exit_poll;
  int open_handles; /* freed when this reaches 0 after retire */
  int alive;        /* process not yet reaped */
  int connected;    /* socket open for reading and writing */
  int retired;      /* handles closing; slot released */
  lparW_reader reader;
} engine;

struct lpar_cluster {
  uv_loop_t *loop;
  lpar_event_cb on_event;
  void *ud;
  char *engine_path;
  char **env; /* extra entries, copied */
  int blas_threads;
  int inline_only;
  engine **slots;
  int nslots;
  int engines_open; /* engines whose handles are not closed yet */
  int freeing;
  uint64_t bad_messages;
};

typedef struct write_req {
  uv_write_t req;
  char data[];
} write_req;

const char *lpar_default_engine_path(void) {
  const char *env = getenv("LPAR_ENGINE");
  return env && *env ? env : LPAR_ENGINE_PATH;
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

int lpar_cluster_new(uv_loop_t *loop, const lpar_config *cfg, lpar_cluster **out) {
  if (loop == NULL || cfg == NULL || out == NULL) return LPAR_EINVAL;
  lpar_cluster *c = calloc(1, sizeof *c);
  if (c == NULL) return LPAR_ENOMEM;
  lparL_ignore_sigpipe(); /* an engine that dies must not take its host with it */
  c->loop = loop;
  c->on_event = cfg->on_event;
  c->ud = cfg->ud;
  c->blas_threads = cfg->blas_threads > 0 ? cfg->blas_threads : 1;
  c->inline_only = cfg->inline_only;
  c->engine_path = dup_string(cfg->engine_path ? cfg->engine_path
                                               : lpar_default_engine_path());
  size_t n = 0;
  while (cfg->env && cfg->env[n]) n++;
  c->env = calloc(n + 1, sizeof *c->env);
  int ok = c->engine_path && c->env;
  for (size_t i = 0; ok && i < n; i++) ok = (c->env[i] = dup_string(cfg->env[i])) != NULL;
  if (!ok) {
    free_env(c->env);
    free(c->engine_path);
    free(c);
    return LPAR_ENOMEM;
  }
  *out = c;
  return LPAR_OK;
}

static engine *find_engine(const lpar_cluster *c, int id) {
  if (id < 0 || id >= c->nslots) return NULL;
  return c->slots[id];
}

static void emit(engine *e, lpar_event *ev) {
  ev->engine = e->id;
  if (e->c->on_event) e->c->on_event(e->c, ev, e->c->ud);
}

static void cluster_release(lpar_cluster *c) {
  free(c->slots);
  free_env(c->env);
  free(c->engine_path);
  free(c);
}

static void on_handle_closed(uv_handle_t *h) {
  engine *e = h->data;
  if (--e->open_handles > 0) return;
  lpar_cluster *c = e->c;
  lparW_reader_free(&e->reader);
  free(e);
  if (--c->engines_open == 0 && c->freeing) cluster_release(c);
}

/* Release the slot and close the handles; memory goes in the close callbacks. */
static void retire(engine *e) {
  if (e->retired) return;
  e->retired = 1;
  e->connected = 0;
  if (e->c->slots[e->id] == e) e->c->slots[e->id] = NULL;
  uv_close((uv_handle_t *)&e->pipe, on_handle_closed);
  uv_close((uv_handle_t *)&e->exit_poll, on_handle_closed);
  if (e->pidfd >= 0) close(e->pidfd); /* uv_close does not close the fd of a poll */
  e->pidfd = -1;
  if (e->side >= 0) close(e->side);
  e->side = -1;
}

static void disconnect(engine *e) {
  if (!e->connected) return;
  e->connected = 0;
  uv_read_stop((uv_stream_t *)&e->pipe);
  if (e->alive) kill(e->pid, SIGKILL); /* an engine without its socket is useless */
}

/* Hand every whole frame in the reader to the host. */
static void dispatch_frames(engine *e) {
  for (;;) {
    lparW_header h;
    const char *payload = NULL, *reason = NULL;
    int rc = lparW_reader_next(&e->reader, &h, &payload, &reason);
    if (rc == 0) return;
    if (rc < 0) {
      e->c->bad_messages++;
      lpar_event ev = {.kind = LPAR_EV_BAD_MESSAGE, .reason = reason};
      disconnect(e);
      emit(e, &ev);
      return;
    }
    lpar_event ev = {.kind = LPAR_EV_MESSAGE, .type = h.type, .flags = h.flags,
                     .id = h.id, .payload = payload, .len = (size_t)h.len};
    int fds[LPARH_MAX_FDS];
    if (h.flags & LPAR_FLAG_FDS) {
      /* The engine sent them before the frame, so they are waiting. */
      ev.nfds = lparH_recv_fds(e->side, fds, LPARH_MAX_FDS, 0);
      if (ev.nfds < 0) {
        e->c->bad_messages++;
        lpar_event bad = {.kind = LPAR_EV_BAD_MESSAGE,
                          .reason = "frame flagged with descriptors that did not come"};
        disconnect(e);
        emit(e, &bad);
        return;
      }
      ev.fds = fds;
    }
    if (h.type == LPAR_MSG_HELLO) ev.kind = LPAR_EV_READY;
    emit(e, &ev);
    if (!e->connected) return; /* the host stopped or retired us */
  }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  engine *e = h->data;
  char *p = NULL;
  size_t n = 0;
  if (lparW_reader_space(&e->reader, &p, &n) < 0) n = 0; /* libuv reports ENOBUFS */
  *buf = uv_buf_init(p, (unsigned)(n > UINT32_MAX ? UINT32_MAX : n));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  engine *e = s->data;
  if (nread > 0) {
    lparW_reader_commit(&e->reader, (size_t)nread);
    dispatch_frames(e);
  } else if (nread < 0) {
    disconnect(e); /* EOF or error: the EXIT event follows from the pidfd */
  }
}

/* A dead engine's last words are still in the socket: read them first. */
static void drain(engine *e) {
  uv_os_fd_t fd;
  if (!e->connected || uv_fileno((uv_handle_t *)&e->pipe, &fd) != 0) return;
  while (e->connected) {
    char *p;
    size_t n;
    if (lparW_reader_space(&e->reader, &p, &n) < 0) return;
    ssize_t k = read(fd, p, n);
    if (k <= 0) return;
    lparW_reader_commit(&e->reader, (size_t)k);
    dispatch_frames(e);
  }
}

static void on_exit_poll(uv_poll_t *p, int status, int events) {
  (void)status;
  (void)events;
  engine *e = p->data;
  int st = 0;
  pid_t r = waitpid(e->pid, &st, WNOHANG);
  if (r == 0) return; /* spurious */
  uv_poll_stop(p);
  e->alive = 0;
  drain(e);
  disconnect(e);
  lpar_event ev = {.kind = LPAR_EV_EXIT, .exit_status = -1};
  if (r == e->pid && WIFEXITED(st)) ev.exit_status = WEXITSTATUS(st);
  if (r == e->pid && WIFSIGNALED(st)) ev.term_signal = WTERMSIG(st);
  retire(e);
  emit(e, &ev);
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
  env[k++] = dup_string(c->inline_only ? "LPAR_SIDE_FD=-1" : "LPAR_SIDE_FD=4");
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
  return err == 0 ? LPAR_OK : LPAR_ESPAWN;
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

int lpar_cluster_spawn(lpar_cluster *c, int id, int n) {
  if (c->freeing || id < 0 || n < 1 || id >= 1 << 20) return LPAR_EINVAL;
  if (grow_slots(c, id) < 0) return LPAR_ENOMEM;
  if (c->slots[id] && c->slots[id]->alive) return LPAR_EINVAL;
  int sv[2], side[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return LPAR_ESYS;
  if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, side) < 0) {
    close(sv[0]);
    close(sv[1]);
    return LPAR_ESYS;
  }
  /* dup2(fd, fd) would keep close-on-exec set: keep the child's ends above 4. */
  sv[1] = move_above(sv[1], 4);
  side[1] = move_above(side[1], 4);
  char **env = engine_environment(c, id, n);
  pid_t pid = 0;
  int rc = env && sv[1] >= 0 && side[1] >= 0 ? spawn_process(c, sv[1], side[1], env, &pid)
                                             : LPAR_ENOMEM;
  free_env(env);
  if (sv[1] >= 0) close(sv[1]);
  if (side[1] >= 0) close(side[1]);
  if (rc < 0) {
    close(sv[0]);
    close(side[0]);
    return rc;
  }
  int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  engine *e = calloc(1, sizeof *e);
  if (pidfd < 0 || e == NULL) {
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    close(sv[0]);
    close(side[0]);
    if (pidfd >= 0) close(pidfd);
    free(e);
    return pidfd < 0 ? LPAR_ESYS : LPAR_ENOMEM;
  }
  e->c = c;
  e->id = id;
  e->pid = pid;
  e->pidfd = pidfd;
  e->side = side[0];
  e->alive = e->connected = 1;
  lparW_reader_init(&e->reader);
  uv_pipe_init(c->loop, &e->pipe, 0);
  uv_poll_init(c->loop, &e->exit_poll, pidfd);
  e->pipe.data = e->exit_poll.data = e;
  e->open_handles = 2;
  c->engines_open++;
  if (c->slots[id]) retire(c->slots[id]);
  c->slots[id] = e;
  if (uv_pipe_open(&e->pipe, sv[0]) != 0 ||
      uv_read_start((uv_stream_t *)&e->pipe, on_alloc, on_read) != 0 ||
      uv_poll_start(&e->exit_poll, UV_READABLE, on_exit_poll) != 0) {
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    e->alive = 0;
    retire(e);
    return LPAR_ESYS;
  }
  return LPAR_OK;
}

static void on_write(uv_write_t *req, int status) {
  (void)status; /* a failed write shows as the engine's EXIT */
  free(req);
}

int lpar_cluster_send_raw(lpar_cluster *c, int id, const void *bytes, size_t len) {
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  if (!e->connected) return LPAR_EDEAD;
  uv_buf_t b = uv_buf_init((char *)bytes, (unsigned)len);
  int n = uv_try_write((uv_stream_t *)&e->pipe, &b, 1);
  if (n < 0 && n != UV_EAGAIN) return LPAR_EDEAD;
  size_t done = n > 0 ? (size_t)n : 0;
  if (done == len) return LPAR_OK;
  write_req *w = malloc(sizeof *w + (len - done));
  if (w == NULL) return LPAR_ENOMEM;
  memcpy(w->data, (const char *)bytes + done, len - done);
  b = uv_buf_init(w->data, (unsigned)(len - done));
  if (uv_write(&w->req, (uv_stream_t *)&e->pipe, &b, 1, on_write) != 0) {
    free(w);
    return LPAR_EDEAD;
  }
  return LPAR_OK;
}

int lpar_cluster_send(lpar_cluster *c, int id, int type, unsigned flags, uint64_t mid,
                      const void *payload, size_t len) {
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  if (!e->connected) return LPAR_EDEAD;
  if (len > LPAR_MAX_PAYLOAD || len > UINT32_MAX) return LPAR_ETOOBIG;
  char head[LPARW_HEADER_SIZE];
  lparW_pack_header(head, type, flags, mid, len);
  uv_buf_t b[2] = {uv_buf_init(head, sizeof head),
                   uv_buf_init((char *)payload, (unsigned)len)};
  int n = uv_try_write((uv_stream_t *)&e->pipe, b, len ? 2 : 1);
  if (n < 0 && n != UV_EAGAIN) return LPAR_EDEAD;
  size_t done = n > 0 ? (size_t)n : 0, total = sizeof head + len;
  if (done == total) return LPAR_OK;
  /* The socket is full: queue a copy of what is left, in order. */
  write_req *w = malloc(sizeof *w + (total - done));
  if (w == NULL) return LPAR_ENOMEM;
  size_t k = 0;
  if (done < sizeof head) {
    memcpy(w->data, head + done, sizeof head - done);
    k = sizeof head - done;
    done = sizeof head;
  }
  memcpy(w->data + k, (const char *)payload + (done - sizeof head), total - done);
  uv_buf_t rest = uv_buf_init(w->data, (unsigned)(k + total - done));
  if (uv_write(&w->req, (uv_stream_t *)&e->pipe, &rest, 1, on_write) != 0) {
    free(w);
    return LPAR_EDEAD;
  }
  return LPAR_OK;
}

int lpar_cluster_send_fds(lpar_cluster *c, int id, int type, unsigned flags, uint64_t mid,
                          const void *payload, size_t len, const int *fds, int nfds) {
  if (nfds == 0) return lpar_cluster_send(c, id, type, flags, mid, payload, len);
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  if (!e->connected) return LPAR_EDEAD;
  int rc = lparH_send_fds(e->side, fds, nfds);
  if (rc < 0) return LPAR_EDEAD;
  return lpar_cluster_send(c, id, type, flags | LPAR_FLAG_FDS, mid, payload, len);
}

int lpar_cluster_signal(lpar_cluster *c, int id, int sig) {
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  if (!e->alive) return LPAR_EDEAD;
  return kill(e->pid, sig) == 0 ? LPAR_OK : LPAR_ESYS;
}

int lpar_cluster_interrupt(lpar_cluster *c, int id, uint64_t mid) {
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  if (!e->alive) return LPAR_EDEAD;
  union sigval v = {.sival_ptr = (void *)(uintptr_t)mid};
  return sigqueue(e->pid, SIGINT, v) == 0 ? LPAR_OK : LPAR_ESYS;
}

int lpar_cluster_pid(lpar_cluster *c, int id) {
  engine *e = find_engine(c, id);
  if (e == NULL) return LPAR_ENOENGINE;
  return e->alive ? (int)e->pid : LPAR_EDEAD;
}

uint64_t lpar_cluster_bad_messages(const lpar_cluster *c) { return c->bad_messages; }

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

void lpar_cluster_stop(lpar_cluster *c) {
  /* Close every socket first, so all engines see EOF and exit in parallel. */
  for (int i = 0; i < c->nslots; i++) {
    engine *e = c->slots[i];
    if (e && e->connected) {
      e->connected = 0;
      uv_read_stop((uv_stream_t *)&e->pipe);
      uv_os_fd_t fd;
      if (uv_fileno((uv_handle_t *)&e->pipe, &fd) == 0) shutdown(fd, SHUT_RDWR);
    }
  }
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
  if (c->engines_open == 0) cluster_release(c);
}

int lpar_cluster_execute(lpar_cluster *c, int engine, uint64_t id, const char *code,
                         size_t len) {
  return lpar_cluster_send(c, engine, LPAR_MSG_EXECUTE, LPAR_FLAG_TEXT | LPAR_FLAG_RAW, id,
                           code, len);
}
