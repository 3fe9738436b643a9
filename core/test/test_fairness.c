/*
** test_fairness.c: two clients share a controller's engine by its time.
** A forked controller (core/relay.c) has one engine, played here by a
** host's relay on a raw link, so this test says how long each request
** took: client A's requests 10 ms each, client B's 1 ms. Both queue 30
** load-balanced requests of depth 1 before the engine answers any; the
** engine then answers one at a time. The controller places next the
** request of the client whose requests have taken least engine time, so B
** gets about ten requests for each of A's, not one for one.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "check.h"
#include "forked_controller.h"
#include "link.h"
#include "lpar.h"
#include "relay.h"
#include "route.h"

#define STOP_ID 999
#define JOIN_ID 998
#define EACH 30    /* requests each client queues */
#define ANSWERS 23 /* how many the engine answers before the count */

/* ---- the controller, in the child ---- */

static void on_relay_event(lparY_relay *y, const lparY_event *ev, void *ud) {
  if (ev->kind == LPARY_CONTROL && ev->id == STOP_ID) *(int *)ud = 1;
  if (ev->kind == LPARY_CONTROL && ev->id == JOIN_ID && lparY_join(y, ev->peer, 0, 1, "fakehost") != 0)
    *(int *)ud = 2;
}

/* ---- the engine's host, on a raw link: requests kept to answer later ---- */

typedef struct host {
  int requests;   /* received */
  uint64_t ids[2 * EACH];
} host;

static void host_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds,
                       int nfds, void *ud) {
  (void)r, (void)payload, (void)fds, (void)nfds;
  host *hs = ud;
  if (h->type == LPAR_MSG_EXECUTE && hs->requests < 2 * EACH) hs->ids[hs->requests++] = h->id;
}

static void host_closed(lparR_route *r, const char *reason, int refused, void *ud) {
  (void)r, (void)reason, (void)refused, (void)ud;
}

/* ---- the clients ---- */

typedef struct seen {
  int ready, results, placed;
} seen;

static void on_event(lpar_cluster *c, const lpar_event *ev, void *ud) {
  (void)c;
  seen *s = ud;
  if (ev->kind == LPAR_EV_READY) s->ready++;
  if (ev->kind == LPAR_EV_MESSAGE && ev->type == LPAR_MSG_RESULT) s->results++;
  if (ev->kind == LPAR_EV_MESSAGE && ev->type == LPAR_MSG_PLACED) s->placed++;
}

static lpar_cluster *connect_client(uv_loop_t *loop, const char *path, const unsigned char *key,
                                    seen *s) {
  lpar_connect_config cfg = {.path = path, .on_event = on_event, .ud = s};
  memcpy(cfg.key, key, 32);
  lpar_cluster *c = NULL;
  int rc = lpar_cluster_connect(loop, &cfg, &c);
  CHECKF(rc == LPAR_OK, "connect: %s", lpar_cluster_errmsg(c));
  return c;
}

int main(void) {
  forked_controller fc;
  if (!forked_start(&fc, "fairness", 0, on_relay_event)) return check_report();
  const char *path = fc.path;
  const unsigned char *key = fc.key;

  uv_loop_t loop;
  uv_loop_init(&loop);

  /* The host joins first (it is peer 1), then A (2), then B (3). */
  host hs = {0};
  static const lparR_handlers host_handlers = {host_frame, host_closed, NULL, NULL};
  lparR_route *hr = NULL;
  char err[256];
  CHECKF(lparL_connect(&loop, path, NULL, 0, key, &host_handlers, &hs, &hr, err, sizeof err) == 0,
         "host connect: %s", err);
  CHECK(lparR_send(hr, LPAR_MSG_CONTROL, 0, 0, JOIN_ID, "", 0, NULL, 0) == LPAR_OK);
  const char *hello = "lpar-engine test id=0 pid=4242 heartbeat=0";
  CHECK(lparR_send(hr, LPAR_MSG_HELLO, LPAR_FLAG_RAW, 0, 0, hello, strlen(hello), NULL, 0) == 0);

  seen sa = {0}, sb = {0};
  lpar_cluster *a = connect_client(&loop, path, key, &sa);
  CHECK(run_until(&loop, &sa.ready, 1));
  lpar_cluster *b = connect_client(&loop, path, key, &sb);
  CHECK(run_until(&loop, &sb.ready, 1));

  for (int i = 1; i <= EACH; i++) {
    CHECK(lpar_cluster_execute(a, LPAR_ANY_ENGINE + 1, (uint64_t)i, "x", 1) == LPAR_OK);
    CHECK(lpar_cluster_execute(b, LPAR_ANY_ENGINE + 1, (uint64_t)i, "x", 1) == LPAR_OK);
  }
  /* Depth 1: the first goes to the engine at once, the rest wait in the controller. */
  CHECK(run_until(&loop, &hs.requests, 1));
  for (int i = 0; i < 100; i++) { /* a moment for every request to reach the controller */
    uv_run(&loop, UV_RUN_NOWAIT);
    usleep(1000);
  }

  /* The engine answers one at a time: A's took 10 ms, B's 1 ms. */
  int served[4] = {0};
  for (int k = 0; k < ANSWERS; k++) {
    if (!CHECKF(run_until(&loop, &hs.requests, k + 1), "request %d never came", k + 1)) break;
    uint64_t gid = hs.ids[k];
    unsigned client = (unsigned)(gid >> 40);
    if (client < 4) served[client]++;
    char stamps[16];
    double t[2] = {1000.0, 1000.0 + (client == 2 ? 0.010 : 0.001)};
    memcpy(stamps, t, sizeof stamps);
    CHECK(lparR_send(hr, LPAR_MSG_RESULT, 0, 0, gid, stamps, sizeof stamps, NULL, 0) == LPAR_OK);
  }
  CHECKF(served[2] >= 2 && served[2] <= 4 && served[3] >= 19, "A placed %d, B %d of the first %d",
         served[2], served[3], ANSWERS);
  CHECK(run_until(&loop, &sb.results, served[3]));
  CHECK(sa.placed >= served[2] && sb.placed >= served[3]);

  lpar_cluster_send(a, 0, LPAR_MSG_CONTROL, 0, STOP_ID, "", 0);
  int status = forked_reap(&fc);
  CHECKF(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0, "controller status %d", status);
  lpar_cluster_free(a);
  lpar_cluster_free(b);
  lparR_close(hr, NULL);
  for (int i = 0; i < 20; i++) uv_run(&loop, UV_RUN_NOWAIT);
  CHECK(uv_loop_close(&loop) == 0);
  forked_cleanup(&fc);
  return check_report();
}
