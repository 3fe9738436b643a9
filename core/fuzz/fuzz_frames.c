/*
** fuzz_frames.c: libFuzzer target for what a peer can send a standalone
** controller: bytes written to a real route (route.c) on a unix socket, as
** an accepted connection reads them. The first input byte picks how the
** bytes are split into writes, so frames straddle reads; the second picks
** who is writing:
**   even: a stranger, without the key: the rest goes as it is (a hello,
**         then frames), and no frame may ever be handed over;
**   odd:  a client with the key: the rest is a list of frames, each
**         [type][flags][route u16][len u16][payload], sealed properly, with a
**         byte 0xFF meaning "the next bytes go unsealed"; every frame handed
**         over must be one that was sent, whole; a frame flagged
**         LPAR_FLAG_ROUTES has its route list parsed and walked.
** Nothing may crash, leak or read out of bounds.
*/
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <uv.h>

#include "auth.h"
#include "buffer.h"
#include "lpar.h"
#include "route.h"
#include "wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct state {
  int closed, frames, keyed;
  unsigned routes; /* route-list entries read (kept so the reads are not optimised away) */
  uint64_t sent; /* frames sealed by the keyed client */
} state;

static void on_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds, int nfds,
                     void *ud) {
  (void)r, (void)payload, (void)fds, (void)nfds;
  state *s = ud;
  if (!s->keyed) __builtin_trap(); /* a frame opened without the key: impossible */
  if (++s->frames > (int)s->sent || h->len > 65535) __builtin_trap();
  /* A request for several engines: its route list is read as a relay reads it. */
  lparW_fanout f;
  const char *why;
  if ((h->flags & LPAR_FLAG_ROUTES) && lparW_fanout_parse(payload, h->len, &f, &why) == 0) {
    if (f.n == 0 || f.n > LPARW_MAX_FANOUT || f.body < payload || f.body + f.body_len != payload + h->len)
      __builtin_trap();
    unsigned sum = 0;
    for (size_t i = 0; i < f.n; i++) {
      unsigned route, offset;
      lparW_fanout_get(&f, i, &route, &offset);
      sum += route ^ offset;
    }
    s->routes += sum & 1;
  }
}

static void on_close(lparR_route *r, const char *reason, int refused, void *ud) {
  (void)r, (void)reason, (void)refused;
  ((state *)ud)->closed = 1;
}

static const lparR_handlers handlers = {on_frame, on_close, NULL, NULL};

/* Write n bytes in pieces of `step` (at most 16 pieces), a loop turn after
   each, so the route reads them as they come. Gives up once the route has
   cut us off; never blocks (the route reads only while the loop turns). */
static void put(int fd, uv_loop_t *loop, const void *p, size_t n, size_t step) {
  const uint8_t *b = p;
  if (step < n / 16) step = n / 16; /* at most 16 writes a piece: keep runs fast */
  for (size_t off = 0; off < n; off += step) {
    size_t k = n - off < step ? n - off : step, sent = 0;
    for (int tries = 0; sent < k && tries < 1000; tries++) {
      ssize_t w = send(fd, b + off + sent, k - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0)
        sent += (size_t)w;
      else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
        return;
      uv_run(loop, UV_RUN_NOWAIT);
    }
    if (sent < k) return;
  }
}

/*
** The keyed client's side: its hello, then the input's frames, sealed, as
** one stream written in at most 16 pieces (put), so frames straddle reads
** at the offsets the first byte picks. One stream, not a put per frame:
** that was up to 16 writes and loop turns per frame, and the target ran at
** about a thousand inputs a second once the corpus held many frames.
*/
static void keyed(int fd, uv_loop_t *loop, const unsigned char *key, const uint8_t *data,
                  size_t size, size_t step, state *s) {
  lparA_channel c;
  lparA_init(&c, key, LPARA_CLIENT, data[0] & 1);
  /* The controller's hello went out when its route opened: read it, start the session. */
  unsigned char theirs[LPARA_HELLO_BYTES];
  size_t got = 0;
  for (int i = 0; i < 100 && got < sizeof theirs; i++) {
    ssize_t k = recv(fd, theirs + got, sizeof theirs - got, MSG_DONTWAIT);
    if (k > 0) got += (size_t)k;
    if (got < sizeof theirs) uv_run(loop, UV_RUN_NOWAIT);
  }
  if (got < sizeof theirs || lparA_start(&c, theirs) != 0) return;
  lparB_buffer out;
  lparB_init(&out);
  if (lparB_append(&out, c.hello, LPARA_HELLO_BYTES) < 0) goto done;
  size_t i = 0;
  while (i + 6 <= size) {
    if (data[i] == 0xff) { /* a run of raw bytes */
      size_t n = data[i + 1] < size - i - 2 ? data[i + 1] : size - i - 2;
      if (lparB_append(&out, data + i + 2, n) < 0) goto done;
      i += 2 + n;
      continue;
    }
    size_t len = (size_t)data[i + 4] | (size_t)data[i + 5] << 8;
    if (len > size - i - 6) len = size - i - 6;
    if (lparB_reserve(&out, LPARW_HEADER_SIZE + len + LPARA_TAG_BYTES) < 0) goto done;
    char *frame = out.data + out.len;
    lparW_pack_routed(frame, data[i], data[i + 1], (unsigned)(data[i + 2] | data[i + 3] << 8),
                      s->sent + 1, len);
    lparA_seal(&c, frame, LPARW_HEADER_SIZE, data + i + 6, len, frame + LPARW_HEADER_SIZE,
               (unsigned char *)frame + LPARW_HEADER_SIZE + len);
    out.len += LPARW_HEADER_SIZE + len + LPARA_TAG_BYTES;
    s->sent++;
    i += 6 + len;
  }
  put(fd, loop, out.data, out.len, step);
done:
  lparB_free(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2 || size > 200000) return 0;
  size_t step = (size_t)data[0] * 7 + 1;
  int is_keyed = data[1] & 1;
  data += 2, size -= 2;
  static const unsigned char key[32] = "a fixed key, not any cluster's!";
  static uv_loop_t loop;
  static int loop_ready;
  if (!loop_ready) loop_ready = uv_loop_init(&loop) == 0;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
  state s = {.keyed = is_keyed};
  lparR_route *r = NULL;
  if (lparR_open(&loop, LPARR_UNIX, sv[0], -1, key, LPARA_CONTROLLER, &handlers, &s, &r) != 0) {
    close(sv[1]);
    return 0;
  }
  if (is_keyed && size > 0)
    keyed(sv[1], &loop, key, data, size, step, &s);
  else
    put(sv[1], &loop, data, size, step);
  close(sv[1]); /* EOF: the route closes if nothing else closed it */
  for (int i = 0; i < 1000 && !s.closed; i++) uv_run(&loop, UV_RUN_NOWAIT);
  if (!s.closed) lparR_close(r, NULL);
  while (!s.closed) uv_run(&loop, UV_RUN_NOWAIT);
  uv_run(&loop, UV_RUN_NOWAIT);
  return 0;
}
