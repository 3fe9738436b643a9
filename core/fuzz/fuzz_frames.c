/*
** fuzz_frames.c: libFuzzer target for what a stranger can send a
** standalone controller: bytes into the routed frame reader, each frame
** then checked against its authentication trailer, as core/link.c does.
** The first input byte picks how the stream is split into reads, so frames
** straddle read boundaries. Nothing may crash, read out of bounds or accept
** a frame whose MAC does not match.
*/
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "auth.h"
#include "lpar.h"
#include "wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  size_t step = (size_t)data[0] * 7 + 1;
  data++, size--;
  static const unsigned char key[LPARA_KEY_BYTES] = "a fixed key, not any cluster's";
  static const unsigned char nonce[LPARA_NONCE_BYTES] = "a fixed nonce!!";
  lparA_channel chan;
  lparA_init(&chan, key, LPARA_CONTROLLER);
  lparA_set_session(&chan, nonce, nonce);
  lparW_reader r;
  lparW_reader_init(&r);
  r.routed = 1;
  r.trailer = LPARA_TRAILER_BYTES;
  r.max_len = 65536;
  int dead = 0;
  for (size_t off = 0; off < size && !dead; off += step) {
    size_t k = size - off < step ? size - off : step;
    char *p;
    size_t room;
    if (lparW_reader_space(&r, &p, &room) < 0 || room < k) break;
    memcpy(p, data + off, k);
    lparW_reader_commit(&r, k);
    for (;;) {
      lparW_header h;
      const char *payload, *why;
      int rc = lparW_reader_next(&r, &h, &payload, &why);
      if (rc == 0) break;
      if (rc < 0) {
        dead = 1; /* the link would cut the peer off here */
        break;
      }
      if (h.len > r.max_len) __builtin_trap();
      if (lparA_verify(&chan, payload - LPARW_HEADER_SIZE, LPARW_HEADER_SIZE + (size_t)h.len,
                       (const unsigned char *)payload + h.len, &why) == LPAR_OK)
        __builtin_trap(); /* a forged MAC passed: impossible without the key */
      dead = 1;
      break;
    }
  }
  lparW_reader_free(&r);
  return 0;
}
