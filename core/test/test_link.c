/*
** test_link.c: links end to end, a forked controller echoing frames to
** this process over its unix socket and over TCP. A sealed frame comes back
** intact with its route and id, in order, with a memfd passed along on the
** unix socket; the bytes on the wire never hold the payload; a stranger's
** frame, a replayed one, an oversized unauthenticated one and silence past
** the time to authenticate each end their connection and are counted;
** connecting to nobody is a clear error, at once (unix) or from the loop (TCP).
*/
#define _GNU_SOURCE /* memfd_create, memmem */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#include "check.h"
#include "link.h"
#include "lpar.h"

#define STOP_ID 999

/* ---- the controller side, in the child ---- */

static lparL_server *servers[2];
static int refused_at_stop = -1, cut_at_stop = -1; /* read before the servers are freed */

static void echo_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds,
                       int nfds, void *ud) {
  (void)ud;
  if (h->id == STOP_ID) {
    refused_at_stop = (int)(lparL_server_refused(servers[0]) + lparL_server_refused(servers[1]));
    cut_at_stop =
        (int)(lparL_server_disconnected(servers[0]) + lparL_server_disconnected(servers[1]));
    lparL_server_close(servers[0]);
    lparL_server_close(servers[1]);
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

static int run_controller(const char *path, const unsigned char *key, int port_pipe) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char err[256];
  if (lparL_listen(&loop, path, NULL, 0, key, on_accept, NULL, &servers[0], err, sizeof err) != 0 ||
      lparL_listen(&loop, NULL, "127.0.0.1", 0, key, on_accept, NULL, &servers[1], err,
                   sizeof err) != 0) {
    fprintf(stderr, "listen: %s\n", err);
    return 100;
  }
  int port = lparL_server_port(servers[1]);
  if (write(port_pipe, &port, sizeof port) != sizeof port) return 102;
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
  int port = 0;
  CHECK(read(pp[0], &port, sizeof port) == sizeof port && port > 0);
  struct stat st;
  CHECK(stat(path, &st) == 0);
  CHECKF((st.st_mode & 0777) == 0600, "socket mode %o", (unsigned)(st.st_mode & 0777));

  uv_loop_t loop;
  uv_loop_init(&loop);
  seen s;
  check_echo(&loop, path, 0, key);
  check_echo(&loop, NULL, port, key);

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
  int status = 0;
  waitpid(child, &status, 0);
  CHECKF(WIFEXITED(status) && WEXITSTATUS(status) == 4, "controller status %d", status);

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
  rmdir(dir);
  return check_report();
}
