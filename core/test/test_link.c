/*
** test_link.c: authenticated links end to end, a forked controller echoing
** frames to this process. A frame signed with the key comes back intact
** with its route and id; a stranger's frame, a replayed one, an oversized
** unauthenticated one and silence past the time to authenticate each end
** their connection and are counted.
*/
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#include "check.h"
#include "link.h"
#include "lpar.h"

#define STOP_ID 999

/* ---- the controller side, in the child ---- */

static lparL_server *server;
static int refused_at_stop = -1, cut_at_stop = -1; /* read before the server is freed */

static void echo_frame(lparL_link *l, const lparW_header *h, const char *payload, void *ud) {
  (void)ud;
  if (h->id == STOP_ID) {
    refused_at_stop = (int)lparL_server_refused(server);
    cut_at_stop = (int)lparL_server_disconnected(server);
    lparL_server_close(server);
    lparL_close(l);
    return;
  }
  lparL_send(l, h->type, h->flags, h->route, h->id, payload, (size_t)h->len);
}

static void echo_closed(lparL_link *l, const char *reason, int refused, void *ud) {
  (void)l, (void)reason, (void)refused, (void)ud;
}

static const lparL_handlers echo = {echo_frame, echo_closed};

static void on_accept(lparL_server *s, lparL_link *l, void *ud) {
  (void)s, (void)ud;
  lparL_set_handlers(l, &echo, NULL);
}

static int run_controller(const char *path, const unsigned char *key) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char err[256];
  if (lparL_listen(&loop, path, NULL, 0, key, on_accept, NULL, &server, err, sizeof err) != 0) {
    fprintf(stderr, "listen: %s\n", err);
    return 100;
  }
  lparL_server_set_auth_timeout(server, 300);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return refused_at_stop == cut_at_stop ? refused_at_stop : 101;
}

/* ---- the client side ---- */

typedef struct seen {
  int frames, closed;
  lparW_header h;
  char payload[64];
} seen;

static void got_frame(lparL_link *l, const lparW_header *h, const char *payload, void *ud) {
  (void)l;
  seen *s = ud;
  s->frames++;
  s->h = *h;
  size_t n = h->len < sizeof s->payload - 1 ? (size_t)h->len : sizeof s->payload - 1;
  memcpy(s->payload, payload, n);
  s->payload[n] = 0;
}

static void got_closed(lparL_link *l, const char *reason, int refused, void *ud) {
  (void)l, (void)reason, (void)refused;
  ((seen *)ud)->closed = 1;
}

static const lparL_handlers client = {got_frame, got_closed};

static void run_until(uv_loop_t *loop, int *flag) {
  for (int i = 0; i < 2000 && !*flag; i++) {
    uv_run(loop, UV_RUN_NOWAIT);
    usleep(1000);
  }
}

static lparL_link *connect_to(uv_loop_t *loop, const char *path, const unsigned char *key,
                              seen *s) {
  lparL_link *l = NULL;
  char err[256];
  memset(s, 0, sizeof *s);
  int rc = lparL_connect(loop, path, NULL, 0, key, &client, s, &l, err, sizeof err);
  CHECKF(rc == LPAR_OK, "connect: %s", err);
  return l;
}

int main(void) {
  char dir[] = "/tmp/lpar-test-link-XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[128];
  snprintf(path, sizeof path, "%s/controller.sock", dir);
  unsigned char key[LPARA_KEY_BYTES], other[LPARA_KEY_BYTES];
  CHECK(lparA_keygen(key) == LPAR_OK && lparA_keygen(other) == LPAR_OK);

  pid_t child = fork();
  if (child == 0) _exit(run_controller(path, key));
  struct stat st;
  for (int i = 0; i < 2000 && stat(path, &st) != 0; i++) usleep(1000);
  CHECKF((st.st_mode & 0777) == 0600, "socket mode %o", (unsigned)(st.st_mode & 0777));

  uv_loop_t loop;
  uv_loop_init(&loop);
  seen s;

  /* A signed frame comes back, route and id intact, and so does a second. */
  lparL_link *l = connect_to(&loop, path, key, &s);
  CHECK(lparL_send(l, LPAR_MSG_EXECUTE, 0, 513, 77, "x = 1", 5) == LPAR_OK);
  run_until(&loop, &s.frames);
  CHECK(s.frames == 1 && s.h.route == 513 && s.h.id == 77 && strcmp(s.payload, "x = 1") == 0);
  CHECK(lparL_send(l, LPAR_MSG_PULL, 0, 2, 78, "x", 1) == LPAR_OK);
  int two = 0;
  for (int i = 0; i < 2000 && s.frames < 2; i++) {
    uv_run(&loop, UV_RUN_NOWAIT);
    usleep(1000);
  }
  two = s.frames == 2;
  CHECK(two && s.h.id == 78 && s.h.type == LPAR_MSG_PULL);
  CHECK(lparL_send(l, LPAR_MSG_EXECUTE, 0, LPARL_MAX_ROUTE + 1, 1, "", 0) == LPAR_EINVAL);
  lparL_close(l);
  run_until(&loop, &s.closed);
  CHECK(s.closed);

  /* Signed with another key: no echo, the connection is cut. */
  l = connect_to(&loop, path, other, &s);
  lparL_send(l, LPAR_MSG_EXECUTE, 0, 0, 1, "evil", 4);
  run_until(&loop, &s.closed);
  CHECK(s.closed && s.frames == 0);

  /* Replayed: the first copy is echoed, the second cuts the connection. */
  l = connect_to(&loop, path, key, &s);
  lparB_buffer b;
  lparB_init(&b);
  CHECK(lparL_sign(l, LPAR_MSG_EXECUTE, 0, 0, 5, "once", 4, &b) == LPAR_OK);
  lparL_send_raw(l, b.data, b.len);
  lparL_send_raw(l, b.data, b.len);
  run_until(&loop, &s.closed);
  CHECK(s.closed && s.frames == 1);

  /* A stranger's large frame is refused before it is read whole. */
  l = connect_to(&loop, path, other, &s);
  size_t big = LPARL_UNAUTHENTICATED_MAX + 1;
  char *junk = calloc(1, big);
  lparL_send(l, LPAR_MSG_EXECUTE, 0, 0, 1, junk, big);
  free(junk);
  run_until(&loop, &s.closed);
  CHECK(s.closed && s.frames == 0);

  /* A peer that says nothing is cut off once the time to authenticate is up. */
  l = connect_to(&loop, path, key, &s);
  run_until(&loop, &s.closed);
  CHECK(s.closed && s.frames == 0);

  /* Stop the controller: it reports 4 refusals, each with its peer cut off. */
  l = connect_to(&loop, path, key, &s);
  lparL_send(l, LPAR_MSG_CONTROL, 0, 0, STOP_ID, "", 0);
  run_until(&loop, &s.closed);
  int status = 0;
  waitpid(child, &status, 0);
  CHECKF(WIFEXITED(status) && WEXITSTATUS(status) == 4, "controller status %d", status);

  /* Nobody listening: a clear error. */
  char err[256] = "";
  lparL_link *none = NULL;
  CHECK(lparL_connect(&loop, path, NULL, 0, key, &client, &s, &none, err, sizeof err) < 0);
  CHECKF(strstr(err, "cannot connect to") != NULL, "error: %s", err);

  uv_run(&loop, UV_RUN_NOWAIT);
  lparB_free(&b);
  uv_loop_close(&loop);
  unlink(path);
  rmdir(dir);
  return check_report();
}
