/*
** test_hostrelay.c: a joined host's relay (hostrelay.c) with real engines,
** driven from a controller's end of its link. Hellos carry the host; one
** request with a route list reaches each engine named, under its own id,
** small ones inline and large ones by one shared memfd; malformed lists
** and entries are refused and counted while the link and the engines carry
** on; PING is answered; a killed engine's EXIT goes up; the link closing
** is an event.
*/
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <uv.h>

#include "check.h"
#include "hostrelay.h"
#include "lpar.h"
#include "route.h"
#include "wire.h"

#define FIRST 10

typedef struct seen {
  int hellos, pings, exits, ready_events, exit_events, closed_events;
  char hello[2][160];
  int results;
  uint64_t result_id[8];
  unsigned result_route[8];
  char result[8][32];
  char exit_text[64];
  unsigned exit_route;
} seen;

static void ctl_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds,
                      int nfds, void *ud) {
  (void)r, (void)fds, (void)nfds;
  seen *s = ud;
  size_t n = (size_t)h->len;
  if (h->type == LPAR_MSG_HELLO && h->route < 2) {
    snprintf(s->hello[h->route], sizeof s->hello[0], "%.*s", (int)n, payload);
    s->hellos++;
  } else if (h->type == LPAR_MSG_PING) {
    s->pings++;
  } else if (h->type == LPAR_MSG_EXIT) {
    snprintf(s->exit_text, sizeof s->exit_text, "%.*s", (int)n, payload);
    s->exit_route = h->route;
    s->exits++;
  } else if (h->type == LPAR_MSG_RESULT && s->results < 8) {
    int i = s->results++;
    s->result_id[i] = h->id;
    s->result_route[i] = h->route;
    snprintf(s->result[i], sizeof s->result[0], "%.*s", (int)(n < 31 ? n : 31), payload);
  }
}

static const lparR_handlers ctl_handlers = {ctl_frame, NULL, NULL, NULL};

static void on_host_event(lparJ_relay *j, const lparJ_event *ev, void *ud) {
  (void)j;
  seen *s = ud;
  if (ev->kind == LPARJ_READY) s->ready_events++;
  if (ev->kind == LPARJ_EXIT) s->exit_events++;
  if (ev->kind == LPARJ_CLOSED) s->closed_events++;
}

static int run_until(uv_loop_t *loop, int *counter, int want) {
  uint64_t deadline = uv_now(loop) + 10000;
  while (*counter < want && uv_now(loop) < deadline) {
    uv_run(loop, UV_RUN_NOWAIT);
    uv_sleep(1);
    uv_update_time(loop);
  }
  return *counter >= want;
}

/* A request from the controller with a route list of (route, offset) pairs. */
static void send_listed(lparR_route *ctl, uint64_t id, const unsigned *routes, size_t n,
                        const char *code, size_t len) {
  char list[2 + 4 * 8];
  lparW_fanout_count(list, n);
  for (size_t i = 0; i < n; i++) lparW_fanout_put(list, i, routes[i], (unsigned)i);
  CHECK(lparR_send2(ctl, LPAR_MSG_EXECUTE, LPAR_FLAG_RAW | LPAR_FLAG_TEXT | LPAR_FLAG_ROUTES, 0, id,
                    list, lparW_fanout_bytes(n), code, len, NULL, 0) == LPAR_OK);
}

static int has_result(const seen *s, uint64_t id, unsigned route, const char *text) {
  for (int i = 0; i < s->results; i++)
    if (s->result_id[i] == id && s->result_route[i] == route && strcmp(s->result[i], text) == 0)
      return 1;
  return 0;
}

static void test_route_lists(uv_loop_t *loop, lparR_route *ctl, lparJ_relay *j, seen *s) {
  const char *code = "return lpar.engine.id";
  unsigned both[2] = {0, 1};
  send_listed(ctl, 100, both, 2, code, strlen(code));
  CHECK(run_until(loop, &s->results, 2));
  CHECK(has_result(s, 100, 0, "10") && has_result(s, 101, 1, "11"));
  lparJ_stats st;
  lparJ_get_stats(j, &st);
  CHECK(st.requests == 1 && st.deliveries == 2 && st.shared == 0);

  /* Large: one memfd for both engines. */
  size_t big = LPARJ_SHM_MIN + 4096;
  char *padded = malloc(big);
  memset(padded, '-', big);
  memcpy(padded, code, strlen(code));
  padded[strlen(code)] = ' ';
  send_listed(ctl, 200, both, 2, padded, big);
  free(padded);
  CHECK(run_until(loop, &s->results, 4));
  CHECK(has_result(s, 200, 0, "10") && has_result(s, 201, 1, "11"));
  lparJ_get_stats(j, &st);
  CHECK(st.requests == 2 && st.deliveries == 4 && st.shared == 1);
  CHECK(st.bytes_in == strlen(code) + big);
  CHECK(st.bad_messages == 0);
}

static void test_malformed_lists(uv_loop_t *loop, lparR_route *ctl, lparJ_relay *j, seen *s) {
  const char *code = "return 'after'";
  char frame[64];
  /* No entries; more than 4096; longer than the payload; shorter than its count. */
  lparW_fanout_count(frame, 0);
  CHECK(lparR_send(ctl, LPAR_MSG_EXECUTE, LPAR_FLAG_RAW | LPAR_FLAG_ROUTES, 0, 1, frame, 2, NULL, 0) == 0);
  lparW_fanout_count(frame, LPARW_MAX_FANOUT + 1);
  CHECK(lparR_send(ctl, LPAR_MSG_EXECUTE, LPAR_FLAG_RAW | LPAR_FLAG_ROUTES, 0, 2, frame, 2, NULL, 0) == 0);
  lparW_fanout_count(frame, 3);
  lparW_fanout_put(frame, 0, 0, 0);
  CHECK(lparR_send(ctl, LPAR_MSG_EXECUTE, LPAR_FLAG_RAW | LPAR_FLAG_ROUTES, 0, 3, frame, 6, NULL, 0) == 0);
  CHECK(lparR_send(ctl, LPAR_MSG_EXECUTE, LPAR_FLAG_RAW | LPAR_FLAG_ROUTES, 0, 4, frame, 1, NULL, 0) == 0);
  /* One entry not of this host (index 7 of 2), one good: only the good one runs. */
  unsigned mixed[2] = {7, 1};
  send_listed(ctl, 300, mixed, 2, code, strlen(code));
  CHECK(lparR_send(ctl, LPAR_MSG_PING, LPAR_FLAG_RAW, 0, 0, "", 0, NULL, 0) == 0);
  CHECK(run_until(loop, &s->results, 5));
  CHECK(run_until(loop, &s->pings, 1));
  CHECK(has_result(s, 301, 1, "after"));
  lparJ_stats st;
  lparJ_get_stats(j, &st);
  CHECKF(st.bad_messages == 5, "bad_messages %llu, want 5", (unsigned long long)st.bad_messages);
  CHECK(st.requests == 3);
  /* And the engines still serve. */
  unsigned zero = 0;
  send_listed(ctl, 400, &zero, 1, code, strlen(code));
  CHECK(run_until(loop, &s->results, 6));
  CHECK(has_result(s, 400, 0, "after"));
}

int main(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  lparR_ignore_sigpipe();
  static const unsigned char key[32] = "test key for the host relay....";
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  seen s = {0};
  lparR_route *ctl = NULL, *link = NULL;
  CHECK(lparR_open(&loop, LPARR_UNIX, sv[0], -1, key, LPARA_CONTROLLER, &ctl_handlers, &s, &ctl) == 0);
  CHECK(lparR_open(&loop, LPARR_UNIX, sv[1], -1, key, LPARA_CLIENT, NULL, NULL, &link) == 0);
  lparJ_config cfg = {.first = FIRST, .count = 2, .n = 12, .host = "testhost",
                      .on_event = on_host_event, .ud = &s};
  lparJ_relay *j = NULL;
  char err[256] = "";
  CHECKF(lparJ_new(&loop, link, &cfg, &j, err, sizeof err) == 0, "lparJ_new: %s", err);
  CHECK(lparJ_spawn(j, 0, err, sizeof err) == 0);
  CHECK(lparJ_spawn(j, 1, err, sizeof err) == 0);
  CHECK(lparJ_spawn(j, 2, err, sizeof err) == LPAR_EINVAL && strstr(err, "out of range"));
  CHECK(run_until(&loop, &s.hellos, 2));
  CHECKF(strstr(s.hello[0], " id=10 ") && strstr(s.hello[0], " host=testhost"), "hello 0: %s", s.hello[0]);
  CHECKF(strstr(s.hello[1], " id=11 ") && strstr(s.hello[1], " host=testhost"), "hello 1: %s", s.hello[1]);
  CHECK(s.ready_events == 2);

  test_route_lists(&loop, ctl, j, &s);
  test_malformed_lists(&loop, ctl, j, &s);

  /* SIGKILL to engine index 1: its EXIT goes up with the signal. */
  CHECK(lparR_send(ctl, LPAR_MSG_SIGNAL, LPAR_FLAG_RAW, 1, 0, "9", 1, NULL, 0) == 0);
  CHECK(run_until(&loop, &s.exits, 1));
  CHECKF(s.exit_route == 1 && strcmp(s.exit_text, "-1 9") == 0, "exit %u '%s'", s.exit_route, s.exit_text);
  CHECK(s.exit_events == 1);

  /* The controller goes: the relay hears it as an event. */
  lparR_close(ctl, NULL);
  CHECK(run_until(&loop, &s.closed_events, 1));
  lparJ_free(j);
  for (int i = 0; i < 100; i++) uv_run(&loop, UV_RUN_NOWAIT);
  CHECK(uv_loop_close(&loop) == 0);
  return check_report();
}
