/*
** test_link.c: links end to end, a forked controller echoing frames to
** this process over its unix socket and over TCP. A sealed frame comes back
** intact with its route and id, in order, with a memfd passed along on the
** unix socket; the bytes on the wire never hold the payload; a stranger's
** frame, a replayed one, an oversized unauthenticated one and silence past
** the time to authenticate each end their connection and are counted;
** idle strangers are capped per source address (a flood from one address
** cuts off its own, not another's) and in total; a controller out of file
** descriptors does not spin and answers a client with a notice it shows;
** connecting to nobody is a clear error, at once (unix) or from the loop (TCP).
*/
#define _GNU_SOURCE /* memfd_create, memmem */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#include "check.h"
#include "link.h"
#include "lpar.h"

#define STOP_ID 999

/* ---- the controller side, in the child ---- */

static lparL_server *servers[3]; /* unix, TCP, TCP keeping the default time to authenticate */
static int refused_at_stop = -1, cut_at_stop = -1; /* read before the servers are freed */

static void echo_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds,
                       int nfds, void *ud) {
  (void)ud;
  if (h->id == STOP_ID) {
    if (servers[1]) { /* the first controller: its unix and short-timeout TCP servers */
      refused_at_stop = (int)(lparL_server_refused(servers[0]) + lparL_server_refused(servers[1]));
      cut_at_stop =
          (int)(lparL_server_disconnected(servers[0]) + lparL_server_disconnected(servers[1]));
    }
    for (int i = 0; i < 3; i++)
      if (servers[i]) lparL_server_close(servers[i]);
    lparR_close(r, NULL);
    return;
  }
  lparR_send(r, h->type, h->flags, h->route, h->id, payload, (size_t)h->len, fds, nfds);
}

static const lparR_handlers echo = {echo_frame, NULL, NULL, NULL};

static void on_accept(lparL_server *s, lparR_route *r, void *ud) {
  (void)s, (void)ud;
  lparR_set_handlers(r, &echo, NULL);
  lparR_set_auth_timeout(r, 300);
}

static void on_accept_patient(lparL_server *s, lparR_route *r, void *ud) {
  (void)s, (void)ud;
  lparR_set_handlers(r, &echo, NULL);
}

static int run_controller(const char *path, const unsigned char *key, int port_pipe) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char err[256];
  if (lparL_listen(&loop, path, NULL, 0, key, on_accept, NULL, &servers[0], err, sizeof err) != 0 ||
      lparL_listen(&loop, NULL, "127.0.0.1", 0, key, on_accept, NULL, &servers[1], err,
                   sizeof err) != 0 ||
      lparL_listen(&loop, NULL, "127.0.0.1", 0, key, on_accept_patient, NULL, &servers[2], err,
                   sizeof err) != 0) {
    fprintf(stderr, "listen: %s\n", err);
    return 100;
  }
  int ports[2] = {lparL_server_port(servers[1]), lparL_server_port(servers[2])};
  if (write(port_pipe, ports, sizeof ports) != sizeof ports) return 102;
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return refused_at_stop == cut_at_stop ? refused_at_stop : 101;
}

/* ---- the client side ---- */

typedef struct seen {
  int frames, closed, refused;
  lparW_header h;
  char payload[64];
  char fd_text[16];
  char reason[200];
} seen;

static void got_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds,
                      int nfds, void *ud) {
  (void)r;
  seen *s = ud;
  s->frames++;
  s->h = *h;
  size_t n = h->len < sizeof s->payload - 1 ? (size_t)h->len : sizeof s->payload - 1;
  memcpy(s->payload, payload, n);
  s->payload[n] = 0;
  s->fd_text[0] = 0;
  if (nfds == 1 && pread(fds[0], s->fd_text, sizeof s->fd_text - 1, 0) < 0) s->fd_text[0] = 0;
}

static void got_closed(lparR_route *r, const char *reason, int refused, void *ud) {
  (void)r;
  seen *s = ud;
  s->closed = 1;
  s->refused = refused;
  snprintf(s->reason, sizeof s->reason, "%s", reason);
}

static const lparR_handlers client = {got_frame, got_closed, NULL, NULL};

static void run_until(uv_loop_t *loop, int *flag, int want) {
  for (int i = 0; i < 3000 && *flag < want; i++) {
    uv_run(loop, UV_RUN_NOWAIT);
    usleep(1000);
  }
}

static lparR_route *connect_to(uv_loop_t *loop, const char *path, int port,
                               const unsigned char *key, seen *s) {
  lparR_route *r = NULL;
  char err[256];
  memset(s, 0, sizeof *s);
  int rc = lparL_connect(loop, path, path ? NULL : "127.0.0.1", port, key, &client, s, &r, err,
                         sizeof err);
  CHECKF(rc == LPAR_OK, "connect: %s", err);
  return r;
}

static void wait_session(uv_loop_t *loop, lparR_route *r) {
  for (int i = 0; i < 3000 && !lparR_session_started(r); i++) {
    uv_run(loop, UV_RUN_NOWAIT);
    usleep(1000);
  }
}

/* Frames sent before the session starts wait, then arrive in order. */
static void check_echo(uv_loop_t *loop, const char *path, int port, const unsigned char *key) {
  seen s;
  lparR_route *r = connect_to(loop, path, port, key, &s);
  CHECK(lparR_send(r, LPAR_MSG_EXECUTE, 0, 513, 77, "x = 1", 5, NULL, 0) == LPAR_OK);
  CHECK(lparR_send(r, LPAR_MSG_PULL, 0, 2, 78, "x", 1, NULL, 0) == LPAR_OK);
  run_until(loop, &s.frames, 2);
  CHECKF(s.frames == 2 && s.h.route == 2 && s.h.id == 78 && strcmp(s.payload, "x") == 0,
         "%d frames, last id %llu", s.frames, (unsigned long long)s.h.id);
  /* A large frame, sealed whole, queued past what the socket takes at once. */
  size_t big = 8 << 20;
  char *data = malloc(big);
  memset(data, 'q', big);
  CHECK(lparR_send(r, LPAR_MSG_PUSH, 0, 1, 79, data, big, NULL, 0) == LPAR_OK);
  free(data);
  run_until(loop, &s.frames, 3);
  CHECK(s.frames == 3 && s.h.len == big && s.payload[0] == 'q');
  if (path) { /* a memfd travels with its frame, there and back */
    int fd = memfd_create("lpar-test", MFD_CLOEXEC);
    CHECK(fd >= 0 && write(fd, "shared bytes", 12) == 12);
    CHECK(lparR_send(r, LPAR_MSG_PUSH, 0, 3, 80, "m", 1, &fd, 1) == LPAR_OK);
    close(fd);
    run_until(loop, &s.frames, 4);
    CHECKF(s.frames == 4 && (s.h.flags & LPAR_FLAG_FDS) && strcmp(s.fd_text, "shared bytes") == 0,
           "fd text '%s'", s.fd_text);
  } else {
    int fd = 0;
    CHECK(lparR_send(r, LPAR_MSG_PUSH, 0, 3, 80, "m", 1, &fd, 1) == LPAR_EINVAL);
  }
  CHECKF(strcmp(lparR_cipher(r), "AES-256-GCM") == 0 || strcmp(lparR_cipher(r), "XChaCha20-Poly1305") == 0,
         "cipher %s", lparR_cipher(r));
  CHECK(lparR_send(r, LPAR_MSG_EXECUTE, 0, LPARR_MAX_ROUTE + 1, 1, "", 0, NULL, 0) == LPAR_EINVAL);
  lparR_close(r, NULL);
  run_until(loop, &s.closed, 1);
  CHECK(s.closed && !s.refused);
}

/* ---- caps on strangers ---- */

/* A raw TCP connection from address `from` (any 127/8 address is this host). */
static int raw_from(const char *from, int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  inet_pton(AF_INET, from, &a.sin_addr);
  if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0) return -1;
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  a.sin_port = htons((uint16_t)port);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Is the controller still holding this connection (its hello read, no EOF)? */
static int still_open(int fd) {
  char buf[64];
  for (;;) {
    ssize_t k = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (k > 0) continue;
    return k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
}

#define FLOODS 5 /* sources of 40 idle connections each, 127.0.0.2 and .4 to .7 */

/*
** Five sources flood the patient server with 40 idle connections each, and
** one (127.0.0.3) holds 5 between the first flood and the others: each
** flood keeps at most LPARL_MAX_STRANGERS_PER_SOURCE open, the server at
** most LPARL_MAX_STRANGERS, and the small source loses none. A real client
** gets in after it all.
*/
static void check_stranger_caps(uv_loop_t *loop, int port, const unsigned char *key) {
  static const char *floods[FLOODS] = {"127.0.0.2", "127.0.0.4", "127.0.0.5", "127.0.0.6",
                                       "127.0.0.7"};
  int flood[FLOODS][40], few[5], made = 0;
  for (int i = 0; i < 40; i++) made += (flood[0][i] = raw_from(floods[0], port)) >= 0;
  /* Alone, far below the total cap, one source still keeps only its share. */
  seen first;
  lparR_route *r0 = connect_to(loop, NULL, port, key, &first);
  CHECK(lparR_send(r0, LPAR_MSG_EXECUTE, 0, 0, 7, "first", 5, NULL, 0) == LPAR_OK);
  run_until(loop, &first.frames, 1);
  int alone = 0;
  for (int i = 0; i < 40; i++) alone += still_open(flood[0][i]);
  CHECKF(alone == LPARL_MAX_STRANGERS_PER_SOURCE, "one source alone: %d of 40 open", alone);
  lparR_close(r0, NULL);
  run_until(loop, &first.closed, 1);
  for (int i = 0; i < 5; i++) made += (few[i] = raw_from("127.0.0.3", port)) >= 0;
  for (int f = 1; f < FLOODS; f++)
    for (int i = 0; i < 40; i++) made += (flood[f][i] = raw_from(floods[f], port)) >= 0;
  CHECKF(made == 40 * FLOODS + 5, "%d connections made", made);
  /* A real client's echo comes once the server has taken every connection before it. */
  seen s;
  lparR_route *r = connect_to(loop, NULL, port, key, &s);
  CHECK(lparR_send(r, LPAR_MSG_EXECUTE, 0, 0, 7, "after", 5, NULL, 0) == LPAR_OK);
  run_until(loop, &s.frames, 1);
  CHECKF(s.frames == 1 && strcmp(s.payload, "after") == 0, "real client: %d frames, %s", s.frames,
         s.reason);
  int few_open = 0, total = 0;
  for (int i = 0; i < 5; i++) few_open += still_open(few[i]);
  CHECKF(few_open == 5, "%d of the small source's 5 still open", few_open);
  total += few_open;
  for (int f = 0; f < FLOODS; f++) {
    int open_here = 0;
    for (int i = 0; i < 40; i++) open_here += still_open(flood[f][i]);
    CHECKF(open_here > 0 && open_here <= LPARL_MAX_STRANGERS_PER_SOURCE, "%s: %d of 40 open",
           floods[f], open_here);
    total += open_here;
  }
  CHECKF(total <= LPARL_MAX_STRANGERS, "%d strangers open in all", total);
  for (int i = 0; i < 5; i++) close(few[i]);
  for (int f = 0; f < FLOODS; f++)
    for (int i = 0; i < 40; i++) close(flood[f][i]);
  lparR_close(r, NULL);
  run_until(loop, &s.closed, 1);
}

/* ---- out of file descriptors ---- */

/* CPU ticks (user + system) process `pid` has used. */
static long cpu_ticks(pid_t pid) {
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  FILE *f = fopen(path, "r");
  if (f == NULL) return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  char *p = strrchr(buf, ')');
  long utime = 0, stime = 0;
  /* after ") ": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
  if (p == NULL || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %ld %ld", &utime,
                          &stime) != 2)
    return -1;
  return utime + stime;
}

/* A controller allowed a few descriptors more than it has at the start. */
static int run_starved_controller(const char *path, const unsigned char *key, int ready) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char err[256];
  if (lparL_listen(&loop, path, NULL, 0, key, on_accept_patient, NULL, &servers[0], err,
                   sizeof err) != 0)
    return 100;
  servers[1] = servers[2] = NULL;
  int lowest = dup(0);
  close(lowest);
  struct rlimit lim = {(rlim_t)lowest + 4, (rlim_t)lowest + 4};
  if (setrlimit(RLIMIT_NOFILE, &lim) != 0) return 103;
  if (write(ready, "r", 1) != 1) return 102;
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return 0;
}

/*
** Clients that have authenticated fill the controller's descriptor table:
** the next one is told why it cannot stay (not left to time out), the
** controller does not spin meanwhile, and once a client leaves, the next
** gets in.
*/
static void check_out_of_descriptors(const char *path, const unsigned char *key) {
  int pp[2];
  CHECK(pipe(pp) == 0);
  pid_t child = fork();
  if (child == 0) _exit(run_starved_controller(path, key, pp[1]));
  char c;
  CHECK(read(pp[0], &c, 1) == 1);
  close(pp[0]);
  close(pp[1]);
  uv_loop_t loop;
  uv_loop_init(&loop);
  enum { MAX_IN = 16 };
  seen s[MAX_IN + 1];
  lparR_route *in[MAX_IN + 1];
  int n = 0;
  for (; n <= MAX_IN; n++) {
    in[n] = connect_to(&loop, path, 0, key, &s[n]);
    lparR_send(in[n], LPAR_MSG_EXECUTE, 0, 0, 1, "in", 2, NULL, 0); /* refused: may fail at once */
    for (int i = 0; i < 3000 && !s[n].frames && !s[n].closed; i++) {
      uv_run(&loop, UV_RUN_NOWAIT);
      usleep(1000);
    }
    if (!s[n].frames) break;
  }
  CHECKF(n > 0 && n <= MAX_IN && s[n].closed, "%d clients in, the next %s", n,
         s[n].closed ? "refused" : "not refused");
  CHECKF(strstr(s[n].reason, "the controller refused the connection: it is out of file descriptors") != NULL,
         "reason: %s", s[n].reason);
  long before = cpu_ticks(child);
  usleep(500000);
  long spent = cpu_ticks(child) - before;
  CHECKF(before >= 0 && spent < 10, "the starved controller used %ld ticks in 0.5 s idle", spent);
  /* One leaves: the next gets in. */
  lparR_close(in[0], NULL);
  run_until(&loop, &s[0].closed, 1);
  in[n] = connect_to(&loop, path, 0, key, &s[n]);
  CHECK(lparR_send(in[n], LPAR_MSG_EXECUTE, 0, 0, STOP_ID, "", 0, NULL, 0) == LPAR_OK);
  run_until(&loop, &s[n].closed, 1);
  CHECKF(s[n].closed && strstr(s[n].reason, "refused") == NULL, "after one left: %s", s[n].reason);
  for (int i = 1; i < n; i++) lparR_close(in[i], NULL);
  for (int i = 1; i < n; i++) run_until(&loop, &s[i].closed, 1);
  int status = check_reap(child, 5); /* it never heard the stop: fail, not hang */
  CHECKF(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0, "starved controller status %d", status);
  uv_run(&loop, UV_RUN_NOWAIT);
  CHECK(uv_loop_close(&loop) == 0);
  unlink(path);
}

int main(void) {
  char dir[] = "/tmp/lpar-test-link-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[128];
  snprintf(path, sizeof path, "%s/controller.sock", dir);
  unsigned char key[LPARA_KEY_BYTES], other[LPARA_KEY_BYTES];
  CHECK(lparA_keygen(key) == LPAR_OK && lparA_keygen(other) == LPAR_OK);

  int pp[2];
  CHECK(pipe(pp) == 0);
  pid_t child = fork();
  if (child == 0) _exit(run_controller(path, key, pp[1]));
  int ports[2] = {0, 0};
  CHECK(read(pp[0], ports, sizeof ports) == sizeof ports && ports[0] > 0 && ports[1] > 0);
  int port = ports[0];
  struct stat st;
  CHECK(stat(path, &st) == 0);
  CHECKF((st.st_mode & 0777) == 0600, "socket mode %o", (unsigned)(st.st_mode & 0777));

  uv_loop_t loop;
  uv_loop_init(&loop);
  seen s;
  check_echo(&loop, path, 0, key);
  check_echo(&loop, NULL, port, key);
  check_stranger_caps(&loop, ports[1], key);

  /* Sealed with another key: no echo, the connection is cut. */
  lparR_route *r = connect_to(&loop, path, 0, other, &s);
  lparR_send(r, LPAR_MSG_EXECUTE, 0, 0, 1, "evil", 4, NULL, 0);
  run_until(&loop, &s.closed, 1);
  CHECK(s.closed && s.frames == 0);

  /* Replayed: the first copy is echoed, the second cuts the connection. */
  r = connect_to(&loop, NULL, port, key, &s);
  wait_session(&loop, r);
  lparB_buffer b;
  lparB_init(&b);
  CHECK(lparR_seal_copy(r, LPAR_MSG_EXECUTE, 0, 0, 5, "once", 4, &b) == LPAR_OK);
  CHECK(memmem(b.data, b.len, "once", 4) == NULL); /* encrypted on the wire */
  lparR_send_raw(r, b.data, b.len);
  lparR_send_raw(r, b.data, b.len);
  run_until(&loop, &s.closed, 1);
  CHECK(s.closed && s.frames == 1);

  /* A stranger's large frame is refused before it is read whole. */
  r = connect_to(&loop, path, 0, other, &s);
  size_t big = LPARR_STRANGER_MAX + 1;
  char *junk = calloc(1, big);
  lparR_send(r, LPAR_MSG_EXECUTE, 0, 0, 1, junk, big, NULL, 0);
  free(junk);
  run_until(&loop, &s.closed, 1);
  CHECK(s.closed && s.frames == 0);

  /* A peer that says nothing is cut off once the time to authenticate is up. */
  r = connect_to(&loop, path, 0, key, &s);
  run_until(&loop, &s.closed, 1);
  CHECK(s.closed && s.frames == 0);

  /* Stop the controller: it reports 4 refusals, each with its peer cut off. */
  r = connect_to(&loop, path, 0, key, &s);
  lparR_send(r, LPAR_MSG_CONTROL, 0, 0, STOP_ID, "", 0, NULL, 0);
  run_until(&loop, &s.closed, 1);
  int status = check_reap(child, 5);
  CHECKF(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 4, "controller status %d", status);

  /* Nobody listening: a clear error, at once on a unix socket... */
  char err[256] = "";
  lparR_route *none = NULL;
  CHECK(lparL_connect(&loop, path, NULL, 0, key, &client, &s, &none, err, sizeof err) < 0);
  CHECKF(strstr(err, "cannot connect to") != NULL, "error: %s", err);
  /* ...and from the loop over TCP, which never blocks. */
  r = connect_to(&loop, NULL, port, key, &s);
  run_until(&loop, &s.closed, 1);
  CHECKF(s.closed && strstr(s.reason, "refused") != NULL, "reason: %s", s.reason);

  uv_run(&loop, UV_RUN_NOWAIT);
  lparB_free(&b);
  CHECK(uv_loop_close(&loop) == 0);
  unlink(path);
  check_out_of_descriptors(path, key);
  rmdir(dir);
  return check_report();
}
