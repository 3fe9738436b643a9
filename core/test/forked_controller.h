/*
** forked_controller.h: a real controller (core/relay.c) in a forked child,
** for the C tests that talk to one. It listens on a unix socket in a fresh
** directory, with a random key, starts `engines` local engines, and hands
** its events to the test's `on_event`, whose ud is an int: setting it
** non-zero stops the controller (the child exits 0 after a clean stop).
*/
#ifndef LPAR_FORKED_CONTROLLER_H
#define LPAR_FORKED_CONTROLLER_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>

#include "check.h"
#include "relay.h"

typedef struct forked_controller {
  char dir[64];
  char path[128]; /* its socket */
  unsigned char key[32];
  pid_t pid;
} forked_controller;

static void forked_check_stop(uv_timer_t *t) {
  if (*(int *)t->data) uv_stop(t->loop);
}

static int forked_run(const forked_controller *fc, int engines, lparY_event_cb on_event) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  int stop = 0;
  lparY_config cfg = {.socket = fc->path, .on_event = on_event, .ud = &stop};
  memcpy(cfg.key, fc->key, sizeof cfg.key);
  lparY_relay *y = NULL;
  char err[256];
  int rc = lparY_new(&loop, &cfg, &y, err, sizeof err);
  for (int id = 0; rc == 0 && id < engines; id++) rc = lparY_spawn(y, id, engines, err, sizeof err);
  if (rc != 0) {
    fprintf(stderr, "controller: %s\n", err);
    return 100;
  }
  uv_timer_t t;
  uv_timer_init(&loop, &t);
  t.data = &stop;
  uv_timer_start(&t, forked_check_stop, 5, 5);
  uv_run(&loop, UV_RUN_DEFAULT);
  lparY_free(y);
  uv_close((uv_handle_t *)&t, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  return uv_loop_close(&loop) == 0 ? 0 : 101;
}

/* Fork the controller and wait (up to 5 s) for its socket: 1, or 0 with a failed check. */
__attribute__((unused))
static int forked_start(forked_controller *fc, const char *name, int engines, lparY_event_cb on_event) {
  snprintf(fc->dir, sizeof fc->dir, "/tmp/lpar-test-%s-XXXXXX", name);
  if (!CHECK(mkdtemp(fc->dir) != NULL)) return 0;
  snprintf(fc->path, sizeof fc->path, "%s/controller.sock", fc->dir);
  for (size_t i = 0; i < sizeof fc->key; i++) fc->key[i] = (unsigned char)(rand() & 0xff);
  fc->pid = fork();
  if (fc->pid == 0) _exit(forked_run(fc, engines, on_event));
  struct stat st;
  for (int i = 0; i < 5000 && stat(fc->path, &st) != 0; i++) usleep(1000);
  return CHECKF(stat(fc->path, &st) == 0, "the controller's socket %s never appeared", fc->path);
}

/* Run the loop until *counter reaches want, or 10 s: whether it did. */
__attribute__((unused))
static int run_until(uv_loop_t *loop, int *counter, int want) {
  for (int i = 0; i < 10000 && *counter < want; i++) {
    uv_run(loop, UV_RUN_NOWAIT);
    usleep(1000);
  }
  return *counter >= want;
}

/* Reap it, within 5 s (see check_reap): its wait status, or -1. */
__attribute__((unused))
static int forked_reap(forked_controller *fc) { return check_reap(fc->pid, 5); }

/* Remove its socket and directory. */
__attribute__((unused))
static void forked_cleanup(forked_controller *fc) {
  unlink(fc->path);
  rmdir(fc->dir);
}

#endif
