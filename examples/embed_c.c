/*
** embed_c.c: drive lpar engines from a C program with no Lua of its own.
**
** Starts 4 engines on a libuv loop, asks each for a value computed in Lua,
** prints the answers and one remote error, then stops the cluster.
**   ./build/examples/embed_c
*/
#include <stdio.h>
#include <string.h>

#include <uv.h>

#include "lpar.h"

#define ENGINES 4

typedef struct state {
  int ready, answers, failures;
  uv_timer_t deadline;
} state;

static void on_event(lpar_cluster *c, const lpar_event *ev, void *ud) {
  state *s = ud;
  if (ev->kind == LPAR_EV_READY && ++s->ready == ENGINES) {
    for (int i = 0; i < ENGINES; i++) {
      const char *code = "return lpar.engine.id, _VERSION, 6 * 7";
      lpar_cluster_execute(c, i, (uint64_t)i + 1, code, strlen(code));
    }
    const char *bad = "error('no such thing')";
    lpar_cluster_execute(c, 0, 99, bad, strlen(bad));
  } else if (ev->kind == LPAR_EV_MESSAGE && ev->type == LPAR_MSG_RESULT) {
    printf("engine %d answered request %llu: %.*s\n", ev->engine, (unsigned long long)ev->id,
           (int)ev->len, ev->payload);
    s->answers++;
  } else if (ev->kind == LPAR_EV_MESSAGE && ev->type == LPAR_MSG_ERROR) {
    int line = (int)(strchr(ev->payload, '\n') ? strchr(ev->payload, '\n') - ev->payload
                                               : (long)ev->len);
    printf("engine %d failed request %llu: %.*s\n", ev->engine, (unsigned long long)ev->id,
           line, ev->payload);
    s->failures++;
  } else if (ev->kind == LPAR_EV_EXIT) {
    printf("engine %d exited unexpectedly\n", ev->engine);
  }
  if (s->answers == ENGINES && s->failures == 1) uv_stop(uv_handle_get_loop((uv_handle_t *)&s->deadline));
}

static void on_deadline(uv_timer_t *t) { uv_stop(uv_handle_get_loop((uv_handle_t *)t)); }

int main(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  state s = {0};
  uv_timer_init(&loop, &s.deadline);
  uv_timer_start(&s.deadline, on_deadline, 10000, 0);

  lpar_cluster *c;
  lpar_config cfg = {.on_event = on_event, .ud = &s};
  int rc = lpar_cluster_new(&loop, &cfg, &c);
  for (int i = 0; rc == LPAR_OK && i < ENGINES; i++) rc = lpar_cluster_spawn(c, i, ENGINES);
  if (rc != LPAR_OK) {
    fprintf(stderr, "cannot start engines: %s\n", lpar_strerror(rc));
    return 1;
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  lpar_cluster_free(c);
  uv_close((uv_handle_t *)&s.deadline, NULL);
  uv_run(&loop, UV_RUN_DEFAULT); /* let libuv close the handles */
  uv_loop_close(&loop);
  int ok = s.answers == ENGINES && s.failures == 1;
  printf("%s: %d answers, %d expected error\n", ok ? "ok" : "FAILED", s.answers, s.failures);
  return ok ? 0 : 1;
}
