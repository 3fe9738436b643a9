/*
** test_cluster.c: the C API end to end. Engines start and answer in text,
** a remote error comes back as an ERROR, a killed engine is reported with
** its signal, an engine sent a bad frame drops its connection, and the
** others carry on throughout. A burst of small requests sent faster than an
** engine reads them (they queue behind a full socket, packed together) all
** arrive, whole and in order.
*/
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "check.h"
#include "cluster.h"
#include "lpar.h"

typedef struct seen {
  int ready;
  int results, errors;
  char last_result[256];
  char last_error[256];
  int exits, exit_engine, exit_signal, exit_status;
  int next_in_burst, burst_out_of_order; /* results that should count up from next_in_burst */
} seen;

static void on_event(lpar_cluster *c, const lpar_event *ev, void *ud) {
  (void)c;
  seen *s = ud;
  switch (ev->kind) {
  case LPAR_EV_READY: s->ready++; break;
  case LPAR_EV_MESSAGE: {
    char *dst = ev->type == LPAR_MSG_RESULT ? s->last_result : s->last_error;
    size_t n = ev->len < 255 ? ev->len : 255;
    memcpy(dst, ev->payload, n);
    dst[n] = 0;
    if (ev->type == LPAR_MSG_RESULT) s->results++;
    if (ev->type == LPAR_MSG_RESULT && s->next_in_burst > 0) {
      if (atoi(dst) != s->next_in_burst) s->burst_out_of_order++;
      s->next_in_burst++;
    }
    if (ev->type == LPAR_MSG_ERROR) s->errors++;
    break;
  }
  case LPAR_EV_EXIT:
    s->exits++;
    s->exit_engine = ev->engine;
    s->exit_signal = ev->term_signal;
    s->exit_status = ev->exit_status;
    break;
  default: break;
  }
}

/* Run the loop until *counter reaches want, or 5 s. */
static int run_until(uv_loop_t *loop, int *counter, int want) {
  uint64_t deadline = uv_now(loop) + 5000;
  while (*counter < want && uv_now(loop) < deadline) {
    uv_run(loop, UV_RUN_NOWAIT);
    uv_sleep(1);
    uv_update_time(loop);
  }
  return *counter >= want;
}

int main(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  seen s = {0};
  lpar_cluster *c = NULL;
  lpar_config cfg = {.on_event = on_event, .ud = &s};
  CHECK(lpar_cluster_new(&loop, &cfg, &c) == LPAR_OK);
  for (int i = 0; i < 3; i++) CHECK(lpar_cluster_spawn(c, i, 3) == LPAR_OK);
  CHECK(run_until(&loop, &s.ready, 3));

  const char *code = "return lpar.engine.id + 40, lpar.engine.n";
  CHECK(lpar_cluster_execute(c, 2, 7, code, strlen(code)) == LPAR_OK);
  CHECK(run_until(&loop, &s.results, 1));
  CHECKF(strcmp(s.last_result, "42\t3") == 0, "result '%s'", s.last_result);

  const char *bad = "error('broken')";
  CHECK(lpar_cluster_execute(c, 0, 8, bad, strlen(bad)) == LPAR_OK);
  CHECK(run_until(&loop, &s.errors, 1));
  CHECKF(strstr(s.last_error, "[execute]:1: broken") != NULL, "error '%s'", s.last_error);

  /* SIGKILL engine 1: reported with its signal; the others still answer. */
  CHECK(lpar_cluster_signal(c, 1, SIGKILL) == LPAR_OK);
  CHECK(run_until(&loop, &s.exits, 1));
  CHECK(s.exit_engine == 1 && s.exit_signal == SIGKILL);
  CHECK(lpar_cluster_pid(c, 1) < 0);
  CHECK(lpar_cluster_execute(c, 1, 9, "return 1", 8) < 0);
  CHECK(lpar_cluster_execute(c, 0, 10, "return 'still here'", 19) == LPAR_OK);
  CHECK(run_until(&loop, &s.results, 2));
  CHECK(strcmp(s.last_result, "still here") == 0);

  /* A bad frame makes engine 2 drop its connection and exit with status 3. */
  CHECK(lparK_send_raw(c, 2, "garbage garbage garbage garbage!", 32) == LPAR_OK);
  CHECK(run_until(&loop, &s.exits, 2));
  CHECK(s.exit_engine == 2 && s.exit_status == 3);

  /* A dead engine's id can be spawned again. */
  CHECK(lpar_cluster_spawn(c, 1, 3) == LPAR_OK);
  CHECK(run_until(&loop, &s.ready, 4));
  CHECK(lpar_cluster_execute(c, 1, 11, "return 'back'", 13) == LPAR_OK);
  CHECK(run_until(&loop, &s.results, 3));
  CHECK(strcmp(s.last_result, "back") == 0);

  /* Many more bytes of requests than a socket holds, sent without running the loop. */
  enum { BURST = 20000 };
  int before = s.results;
  s.next_in_burst = 1;
  for (int i = 1; i <= BURST; i++) {
    char req[32];
    int n = snprintf(req, sizeof req, "return %d", i);
    CHECK(lpar_cluster_execute(c, 0, (uint64_t)(100 + i), req, (size_t)n) == LPAR_OK);
  }
  CHECK(run_until(&loop, &s.results, before + BURST));
  CHECKF(s.results == before + BURST && s.burst_out_of_order == 0, "%d of %d results, %d out of order",
         s.results - before, BURST, s.burst_out_of_order);
  s.next_in_burst = 0;

  CHECK(lpar_cluster_spawn(c, -1, 3) == LPAR_EINVAL);
  /* A missing engine executable: the system's reason is kept. */
  lpar_cluster *nowhere = NULL;
  lpar_config bad_cfg = {.engine_path = "/nonexistent/lpar-engine"};
  CHECK(lpar_cluster_new(&loop, &bad_cfg, &nowhere) == LPAR_OK);
  CHECK(lpar_cluster_spawn(nowhere, 0, 1) == LPAR_ESPAWN);
  CHECKF(strcmp(lpar_cluster_errmsg(nowhere),
                "cannot start engine 0 (/nonexistent/lpar-engine): No such file or directory") == 0,
         "errmsg '%s'", lpar_cluster_errmsg(nowhere));
  lpar_cluster_free(nowhere);
  CHECK(lpar_cluster_send(c, 99, LPAR_MSG_EXECUTE, 0, 1, "", 0) == LPAR_ENOENGINE);
  lpar_cluster_free(c);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(uv_loop_close(&loop) == 0);
  return check_report();
}
