/*
** fuzz_frames.c: libFuzzer target for what a stranger can send a standalone
** controller: bytes written to a real route (route.c) on a unix socket, as
** an accepted connection reads them: a hello, then sealed frames, with
** descriptors flagged or not. The first input byte picks how the bytes are
** split into writes, so frames straddle reads. Nothing may crash, leak, read
** out of bounds, or hand over a frame: without the key nothing opens.
*/
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <uv.h>

#include "lpar.h"
#include "route.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void on_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds, int nfds,
                     void *ud) {
  (void)r, (void)h, (void)payload, (void)fds, (void)nfds, (void)ud;
  __builtin_trap(); /* a frame opened without the key: impossible */
}

static void on_close(lparR_route *r, const char *reason, int refused, void *ud) {
  (void)r, (void)reason, (void)refused;
  *(int *)ud = 1;
}

static const lparR_handlers handlers = {on_frame, on_close, NULL};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1 || size > 200000) return 0;
  size_t step = (size_t)data[0] * 7 + 1;
  data++, size--;
  static const unsigned char key[32] = "a fixed key, not any cluster's!";
  static uv_loop_t loop;
  static int loop_ready;
  if (!loop_ready) loop_ready = uv_loop_init(&loop) == 0;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
  int closed = 0;
  lparR_route *r = NULL;
  if (lparR_open(&loop, LPARR_UNIX, sv[0], -1, key, LPARA_CONTROLLER, &handlers, &closed, &r) != 0) {
    close(sv[1]);
    return 0;
  }
  for (size_t off = 0; off < size && !closed; off += step) {
    size_t k = size - off < step ? size - off : step;
    if (write(sv[1], data + off, k) != (ssize_t)k) break;
    uv_run(&loop, UV_RUN_NOWAIT);
  }
  close(sv[1]); /* EOF: the route closes if nothing else closed it */
  for (int i = 0; i < 1000 && !closed; i++) uv_run(&loop, UV_RUN_NOWAIT);
  if (!closed) lparR_close(r, NULL);
  while (!closed) uv_run(&loop, UV_RUN_NOWAIT);
  uv_run(&loop, UV_RUN_NOWAIT);
  return 0;
}
