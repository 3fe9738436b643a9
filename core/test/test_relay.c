/*
** test_relay.c: a controller's data plane end to end, in C. A forked
** controller (core/relay.c) runs two engines; this process connects with the
** public lpar_cluster_connect and sees both engines come up, runs code on
** each and reads the answers as text, gets a remote error back, kills an
** engine through the controller and hears of its death, is told that a
** request for the dead engine cannot go, and hears the link close when the
** controller stops. The other engine answers throughout. Load-balanced
** requests (LPAR_ANY_ENGINE + depth) wait in the controller for an engine
** with room, each placed one is named by a PLACED before its reply, and one
** still waiting can be withdrawn.
**
** Then a host's relay, played here on a raw link, joins with two engines
** (ids 2 and 3, route field 0 and 1 on its link): the client sees them,
** a request for engine 3 reaches the host as index 1 and its reply comes
** back as engine 3's, an EXIT from index 0 is engine 2's death, the host
** is sent heartbeats, and once it falls silent engine 3 ends with a reason
** naming the host.
*/
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#include "check.h"
#include "forked_controller.h"
#include "lpar.h"
#include "link.h"
#include "relay.h"
#include "route.h"

#define STOP_ID 999
#define JOIN_ID 998

/* ---- the controller, in the child ---- */

static void on_relay_event(lparY_relay *y, const lparY_event *ev, void *ud) {
  if (ev->kind == LPARY_CONTROL && ev->id == STOP_ID) *(int *)ud = 1;
  if (ev->kind == LPARY_CONTROL && ev->id == JOIN_ID && lparY_join(y, ev->peer, 2, 2, "testhost") != 0)
    *(int *)ud = 2;
}

/* ---- a host's relay, on a raw link ---- */

typedef struct host {
  int frames, pings, closed;
  lparW_header last; /* the last request */
} host;

static void host_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds,
                       int nfds, void *ud) {
  (void)r, (void)payload, (void)fds, (void)nfds;
  host *hs = ud;
  if (h->type == LPAR_MSG_PING) hs->pings++;
  if (h->type != LPAR_MSG_EXECUTE) return; /* the engines it was told of as a new peer */
  hs->last = *h;
  hs->frames++;
}

static void host_closed(lparR_route *r, const char *reason, int refused, void *ud) {
  (void)r, (void)reason, (void)refused;
  ((host *)ud)->closed = 1;
}

/* ---- the client ---- */

typedef struct seen {
  int ready, results, errors, exits, closed;
  int placed;
  int placed_engine[8];
  uint64_t placed_id[8];
  int results_when_placed[8]; /* results seen before each PLACED */
  int exit_engine, exit_signal;
  char result[128], error[256], why[192];
} seen;

static void on_event(lpar_cluster *c, const lpar_event *ev, void *ud) {
  (void)c;
  seen *s = ud;
  switch (ev->kind) {
  case LPAR_EV_READY: s->ready++; break;
  case LPAR_EV_EXIT:
    s->exits++;
    s->exit_engine = ev->engine;
    s->exit_signal = ev->term_signal;
    snprintf(s->why, sizeof s->why, "%s", ev->reason ? ev->reason : "");
    break;
  case LPAR_EV_CLOSED: s->closed++; break;
  case LPAR_EV_MESSAGE: {
    if (ev->type == LPAR_MSG_PLACED) {
      if (s->placed < 8) {
        s->placed_engine[s->placed] = ev->engine;
        s->placed_id[s->placed] = ev->id;
        s->results_when_placed[s->placed] = s->results;
      }
      s->placed++;
      break;
    }
    char *dst = ev->type == LPAR_MSG_RESULT ? s->result : s->error;
    size_t cap = ev->type == LPAR_MSG_RESULT ? sizeof s->result : sizeof s->error;
    size_t n = ev->len < cap - 1 ? ev->len : cap - 1;
    memcpy(dst, ev->payload, n);
    dst[n] = 0;
    if (ev->type == LPAR_MSG_RESULT) s->results++;
    if (ev->type == LPAR_MSG_ERROR) s->errors++;
    break;
  }
  default: break;
  }
}

int main(void) {
  forked_controller fc;
  if (!forked_start(&fc, "relay", 2, on_relay_event)) return check_report();
  const char *path = fc.path;
  const unsigned char *key = fc.key;

  uv_loop_t loop;
  uv_loop_init(&loop);
  seen s = {0};
  lpar_connect_config cfg = {.path = path, .on_event = on_event, .ud = &s};
  memcpy(cfg.key, key, sizeof cfg.key);
  lpar_cluster *c = NULL;
  int rc = lpar_cluster_connect(&loop, &cfg, &c);
  CHECKF(rc == LPAR_OK, "connect: %s", lpar_cluster_errmsg(c));
  CHECK(run_until(&loop, &s.ready, 2));
  CHECK(strcmp(lpar_cluster_cipher(c), "AES-256-GCM") == 0 ||
        strcmp(lpar_cluster_cipher(c), "XChaCha20-Poly1305") == 0);
  CHECK(lpar_cluster_pid(c, 1) > 0);

  const char *code = "return lpar.engine.id + 40, lpar.engine.n";
  CHECK(lpar_cluster_execute(c, 1, 7, code, strlen(code)) == LPAR_OK);
  CHECK(run_until(&loop, &s.results, 1));
  CHECKF(strcmp(s.result, "41\t2") == 0, "result '%s'", s.result);
  const char *bad = "error('broken')";
  CHECK(lpar_cluster_execute(c, 0, 8, bad, strlen(bad)) == LPAR_OK);
  CHECK(run_until(&loop, &s.errors, 1));
  CHECKF(strstr(s.error, "broken") != NULL, "error '%s'", s.error);

  /* SIGKILL engine 0 through the controller: its death is reported. */
  CHECK(lpar_cluster_signal(c, 0, SIGKILL) == LPAR_OK);
  CHECK(run_until(&loop, &s.exits, 1));
  CHECK(s.exit_engine == 0 && s.exit_signal == SIGKILL);
  CHECK(lpar_cluster_pid(c, 0) == LPAR_EDEAD);
  /* A request for it cannot go: the controller says so, with its exit again. */
  CHECK(lpar_cluster_execute(c, 0, 9, "return 1", 8) == LPAR_OK);
  CHECK(run_until(&loop, &s.exits, 2));
  CHECK(s.exit_engine == 0);
  /* The other one answers. */
  CHECK(lpar_cluster_execute(c, 1, 10, "return 'still here'", 19) == LPAR_OK);
  CHECK(run_until(&loop, &s.results, 2));
  CHECK(strcmp(s.result, "still here") == 0);

  /* Load-balanced, depth 1: the slow one goes to engine 1 (0 is dead), the
  ** next waits for it to finish, and a third is withdrawn while it waits. */
  const char *slow = "local t = os.clock() while os.clock() - t < 0.3 do end return 'slow'";
  CHECK(lpar_cluster_execute(c, LPAR_ANY_ENGINE + 1, 20, slow, strlen(slow)) == LPAR_OK);
  CHECK(lpar_cluster_execute(c, LPAR_ANY_ENGINE + 1, 21, "return 'next'", 13) == LPAR_OK);
  CHECK(lpar_cluster_execute(c, LPAR_ANY_ENGINE + 1, 22, "return 'never'", 14) == LPAR_OK);
  CHECK(run_until(&loop, &s.placed, 1));
  CHECK(s.placed_engine[0] == 1 && s.placed_id[0] == 20);
  CHECK(lpar_cluster_interrupt(c, LPAR_ANY_ENGINE, 22) == LPAR_OK);
  CHECK(run_until(&loop, &s.placed, 2));
  CHECKF(s.placed_engine[1] == LPAR_ANY_ENGINE && s.placed_id[1] == 22, "engine %d, id %llu",
         s.placed_engine[1], (unsigned long long)s.placed_id[1]);
  CHECK(run_until(&loop, &s.results, 4));
  CHECK(s.placed == 3 && s.placed_engine[2] == 1 && s.placed_id[2] == 21);
  CHECK(s.results_when_placed[2] == 3); /* placed only once the slow one was done */
  CHECK(strcmp(s.result, "next") == 0);
  /* Withdrawing one already placed changes nothing; nothing else comes. */
  CHECK(lpar_cluster_interrupt(c, LPAR_ANY_ENGINE, 21) == LPAR_OK);
  CHECK(lpar_cluster_execute(c, 1, 23, "return 'after'", 14) == LPAR_OK);
  CHECK(run_until(&loop, &s.results, 5));
  CHECK(s.placed == 3 && strcmp(s.result, "after") == 0);
  /* Descriptors cannot go to... nothing: a send to a link is fine without them. */
  CHECK(lpar_cluster_passes_fds(c, 1) == 1);

  /* A host joins with two engines, 2 and 3, over one link. */
  host hs = {0};
  static const lparR_handlers host_handlers = {host_frame, host_closed, NULL, NULL};
  lparR_route *hr = NULL;
  char err[256];
  CHECKF(lparL_connect(&loop, path, NULL, 0, key, &host_handlers, &hs, &hr, err, sizeof err) == 0,
         "host connect: %s", err);
  CHECK(lparR_send(hr, LPAR_MSG_CONTROL, 0, 0, JOIN_ID, "", 0, NULL, 0) == LPAR_OK);
  const char *hello2 = "lpar-engine test id=2 pid=4242", *hello3 = "lpar-engine test id=3 pid=4343";
  CHECK(lparR_send(hr, LPAR_MSG_HELLO, LPAR_FLAG_RAW, 0, 0, hello2, strlen(hello2), NULL, 0) == 0);
  CHECK(lparR_send(hr, LPAR_MSG_HELLO, LPAR_FLAG_RAW, 1, 0, hello3, strlen(hello3), NULL, 0) == 0);
  CHECK(run_until(&loop, &s.ready, 4));
  CHECK(lpar_cluster_pid(c, 2) == 4242 && lpar_cluster_pid(c, 3) == 4343);
  CHECK(lpar_cluster_passes_fds(c, 3) == 0); /* joined: matrices go inline */
  /* A request for engine 3 reaches the host as index 1; its reply is engine 3's. */
  CHECK(lpar_cluster_execute(c, 3, 12, "return 3", 8) == LPAR_OK);
  CHECK(run_until(&loop, &hs.frames, 1));
  CHECK(hs.last.type == LPAR_MSG_EXECUTE && hs.last.route == 1);
  CHECK((hs.last.flags & LPAR_FLAG_INLINE) != 0);
  CHECK(lparR_send(hr, LPAR_MSG_RESULT, LPAR_FLAG_RAW, 1, hs.last.id, "from 3", 6, NULL, 0) == 0);
  CHECK(run_until(&loop, &s.results, 6));
  CHECK(strcmp(s.result, "from 3") == 0);
  /* Index 0 dies on its host: engine 2 is dead, engine 3 is not. */
  CHECK(lparR_send(hr, LPAR_MSG_EXIT, LPAR_FLAG_RAW, 0, 0, "-1 9", 4, NULL, 0) == LPAR_OK);
  CHECK(run_until(&loop, &s.exits, 3));
  CHECK(s.exit_engine == 2 && s.exit_signal == 9);
  CHECK(lpar_cluster_pid(c, 3) == 4343);
  /* The controller keeps the link alive; when the host falls silent, its
  ** remaining engine ends, the reason naming the host. */
  CHECK(run_until(&loop, &hs.pings, 1));
  CHECK(run_until(&loop, &s.exits, 4));
  CHECKF(s.exit_engine == 3 && strstr(s.why, "testhost went silent") != NULL, "engine %d: '%s'",
         s.exit_engine, s.why);
  CHECK(run_until(&loop, &hs.closed, 1));
  hr = NULL; /* freed as it closed */

  /* The controller stops: the link closes, and the client hears it. */
  CHECK(lpar_cluster_send(c, 0, LPAR_MSG_CONTROL, 0, STOP_ID, "", 0) == LPAR_OK);
  CHECK(run_until(&loop, &s.closed, 1));
  int status = forked_reap(&fc);
  CHECKF(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0, "controller status %d", status);
  CHECK(lpar_cluster_execute(c, 1, 11, "return 1", 8) == LPAR_EDEAD);
  lpar_cluster_free(c);

  /* Nobody listening: a clear error, and a handle to free. */
  c = NULL;
  CHECK(lpar_cluster_connect(&loop, &cfg, &c) < 0);
  CHECKF(strstr(lpar_cluster_errmsg(c), "cannot connect to") != NULL, "errmsg %s",
         lpar_cluster_errmsg(c));
  lpar_cluster_free(c);

  uv_run(&loop, UV_RUN_NOWAIT);
  CHECK(uv_loop_close(&loop) == 0);
  forked_cleanup(&fc);
  return check_report();
}
