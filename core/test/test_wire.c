/*
** test_wire.c: framing. Headers round-trip, every malformed header is named,
** and the incremental reader assembles frames from any split of the stream.
*/
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "lpar.h"
#include "wire.h"

static void test_header_round_trip(void) {
  char h[LPARW_HEADER_SIZE];
  lparW_pack_header(h, LPAR_MSG_APPLY, LPAR_FLAG_TEXT, 0x1122334455667788ull, 99);
  lparW_header out;
  const char *why = NULL;
  CHECK(lparW_parse_header(h, &out, &why) == LPAR_OK);
  CHECK(out.type == LPAR_MSG_APPLY && out.flags == LPAR_FLAG_TEXT);
  CHECK(out.id == 0x1122334455667788ull && out.len == 99);
}

static void expect_bad(char *h, const char *reason) {
  lparW_header out;
  const char *why = NULL;
  CHECK(lparW_parse_header(h, &out, &why) == LPAR_EBADMSG);
  CHECKF(why && strstr(why, reason), "reason '%s' does not say '%s'", why ? why : "", reason);
}

static void test_bad_headers(void) {
  char h[LPARW_HEADER_SIZE];
  lparW_pack_header(h, LPAR_MSG_EXECUTE, 0, 1, 0);
  h[0] ^= 1;
  expect_bad(h, "bad magic");
  lparW_pack_header(h, LPAR_MSG_EXECUTE, 0, 1, 0);
  h[4] = 0x7f;
  expect_bad(h, "unknown message type");
  h[4] = 0;
  expect_bad(h, "unknown message type");
  lparW_pack_header(h, LPAR_MSG_EXECUTE, 0x80, 1, 0);
  expect_bad(h, "unknown flags");
  lparW_pack_header(h, LPAR_MSG_EXECUTE, 0, 1, 0);
  h[6] = 1;
  expect_bad(h, "reserved");
  lparW_pack_header(h, LPAR_MSG_EXECUTE, 0, 1, LPAR_MAX_PAYLOAD + 1);
  expect_bad(h, "bad length");
}

/* Controller sockets: a route in the header, a trailer after each payload. */
static void test_routed(void) {
  char h[LPARW_HEADER_SIZE];
  lparW_pack_routed(h, LPAR_MSG_CONTROL, 0, 513, 7, 5);
  lparW_header out;
  const char *why = NULL;
  CHECK(lparW_parse_routed(h, &out, LPAR_MAX_PAYLOAD, &why) == LPAR_OK);
  CHECK(out.route == 513 && out.type == LPAR_MSG_CONTROL && out.id == 7 && out.len == 5);
  CHECK(lparW_parse_routed(h, &out, 4, &why) == LPAR_EBADMSG);
  CHECK(why && strstr(why, "before authentication"));
  expect_bad(h, "reserved"); /* an engine's socket takes no route */

  char stream[2 * (LPARW_HEADER_SIZE + 5 + 3)];
  for (int i = 0; i < 2; i++) {
    char *f = stream + i * (LPARW_HEADER_SIZE + 8);
    lparW_pack_routed(f, LPAR_MSG_RESULT, 0, (unsigned)i + 1, (uint64_t)i, 5);
    memcpy(f + LPARW_HEADER_SIZE, "abcde", 5);
    memcpy(f + LPARW_HEADER_SIZE + 5, "TRL", 3);
  }
  lparW_reader r;
  lparW_reader_init(&r);
  r.routed = 1;
  r.trailer = 3;
  char *p;
  size_t room;
  CHECK(lparW_reader_space(&r, &p, &room) == LPAR_OK);
  memcpy(p, stream, sizeof stream - 1); /* the last trailer byte is missing */
  lparW_reader_commit(&r, sizeof stream - 1);
  const char *payload;
  CHECK(lparW_reader_next(&r, &out, &payload, &why) == 1);
  CHECK(out.route == 1 && memcmp(payload, "abcde", 5) == 0 && memcmp(payload + 5, "TRL", 3) == 0);
  CHECK(lparW_reader_next(&r, &out, &payload, &why) == 0);
  CHECK(lparW_reader_space(&r, &p, &room) == LPAR_OK);
  *p = 'L';
  lparW_reader_commit(&r, 1);
  CHECK(lparW_reader_next(&r, &out, &payload, &why) == 1 && out.route == 2);
  lparW_reader_free(&r);
}

/* A stream of three frames fed to the reader in chunks of `step` bytes. */
static void test_reader_splits(size_t step) {
  char stream[3 * LPARW_HEADER_SIZE + 64];
  size_t n = 0;
  const char *payloads[3] = {"first", "", "the third payload"};
  for (int i = 0; i < 3; i++) {
    size_t len = strlen(payloads[i]);
    lparW_pack_header(stream + n, LPAR_MSG_RESULT, 0, (uint64_t)i + 10, len);
    n += LPARW_HEADER_SIZE;
    memcpy(stream + n, payloads[i], len);
    n += len;
  }
  lparW_reader r;
  lparW_reader_init(&r);
  int got = 0;
  for (size_t off = 0; off < n; off += step) {
    size_t k = n - off < step ? n - off : step;
    char *p;
    size_t room;
    CHECK(lparW_reader_space(&r, &p, &room) == LPAR_OK && room >= k);
    memcpy(p, stream + off, k);
    lparW_reader_commit(&r, k);
    lparW_header h;
    const char *payload, *why;
    int rc;
    while ((rc = lparW_reader_next(&r, &h, &payload, &why)) == 1) {
      CHECKF(h.id == (uint64_t)got + 10, "frame %d has id %llu", got, (unsigned long long)h.id);
      CHECK(h.len == strlen(payloads[got]) && memcmp(payload, payloads[got], h.len) == 0);
      got++;
    }
    CHECK(rc == 0);
  }
  CHECKF(got == 3, "step %zu: %d frames", step, got);
  lparW_reader_free(&r);
}

/* A frame larger than the reader's default space arrives whole. */
static void test_reader_large_frame(void) {
  size_t len = 3u << 20;
  char *payload = malloc(len);
  for (size_t i = 0; i < len; i++) payload[i] = (char)(i * 7);
  char h[LPARW_HEADER_SIZE];
  lparW_pack_header(h, LPAR_MSG_PUSH, 0, 5, len);
  lparW_reader r;
  lparW_reader_init(&r);
  char *p;
  size_t room;
  lparW_reader_space(&r, &p, &room);
  memcpy(p, h, sizeof h);
  lparW_reader_commit(&r, sizeof h);
  CHECK(lparW_reader_space(&r, &p, &room) == LPAR_OK);
  CHECKF(room >= len, "room %zu for a %zu-byte frame", room, len);
  memcpy(p, payload, len);
  lparW_reader_commit(&r, len);
  lparW_header out;
  const char *data, *why;
  CHECK(lparW_reader_next(&r, &out, &data, &why) == 1);
  CHECK(out.len == len && memcmp(data, payload, len) == 0);
  lparW_reader_free(&r);
  free(payload);
}

static void test_reader_rejects_garbage(void) {
  lparW_reader r;
  lparW_reader_init(&r);
  char *p;
  size_t room;
  lparW_reader_space(&r, &p, &room);
  memcpy(p, "this is not an lpar frame at all", 32);
  lparW_reader_commit(&r, 32);
  lparW_header h;
  const char *payload, *why = NULL;
  CHECK(lparW_reader_next(&r, &h, &payload, &why) == LPAR_EBADMSG);
  CHECK(why && strstr(why, "bad magic"));
  lparW_reader_free(&r);
}

/* Blocking send, and a reader over the socket, as the engine does. */
static void test_send_recv(void) {
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  CHECK(lparW_send(sv[0], LPAR_MSG_STDOUT, LPAR_FLAG_RAW, 42, "hello", 5) == LPAR_OK);
  close(sv[0]);
  lparW_reader rd;
  lparW_reader_init(&rd);
  char *space;
  size_t room;
  CHECK(lparW_reader_space(&rd, &space, &room) == LPAR_OK);
  ssize_t k = read(sv[1], space, room);
  CHECK(k == LPARW_HEADER_SIZE + 5);
  lparW_reader_commit(&rd, k > 0 ? (size_t)k : 0);
  lparW_header h;
  const char *payload = NULL, *why = "";
  CHECK(lparW_reader_next(&rd, &h, &payload, &why) == 1);
  CHECK(h.type == LPAR_MSG_STDOUT && h.id == 42 && h.len == 5 && memcmp(payload, "hello", 5) == 0);
  CHECK(lparW_reader_next(&rd, &h, &payload, &why) == 0); /* nothing more buffered */
  CHECK(read(sv[1], space, room) == 0);                      /* EOF */
  close(sv[1]);
  lparW_reader_free(&rd);
}

/* Route lists: what is packed parses back; each malformed list is named. */
static void test_fanout(void) {
  char buf[2 + 4 * 3 + 5];
  lparW_fanout_count(buf, 3);
  for (unsigned i = 0; i < 3; i++) lparW_fanout_put(buf, i, 1000 + i, 7 * i);
  memcpy(buf + lparW_fanout_bytes(3), "hello", 5);
  lparW_fanout f;
  const char *why = NULL;
  CHECK(lparW_fanout_parse(buf, sizeof buf, &f, &why) == LPAR_OK);
  CHECK(f.n == 3 && f.body_len == 5 && memcmp(f.body, "hello", 5) == 0);
  unsigned route, offset;
  lparW_fanout_get(&f, 2, &route, &offset);
  CHECK(route == 1002 && offset == 14);
  CHECK(lparW_fanout_parse(buf, lparW_fanout_bytes(3), &f, &why) == LPAR_OK && f.body_len == 0);
  CHECK(lparW_fanout_parse(buf, lparW_fanout_bytes(3) - 1, &f, &why) == LPAR_EBADMSG &&
        strstr(why, "longer than the payload"));
  CHECK(lparW_fanout_parse(buf, 1, &f, &why) == LPAR_EBADMSG && strstr(why, "shorter than its count"));
  lparW_fanout_count(buf, 0);
  CHECK(lparW_fanout_parse(buf, sizeof buf, &f, &why) == LPAR_EBADMSG && strstr(why, "empty"));
  lparW_fanout_count(buf, LPARW_MAX_FANOUT + 1);
  CHECK(lparW_fanout_parse(buf, sizeof buf, &f, &why) == LPAR_EBADMSG && strstr(why, "4096"));
  /* The flags a route list and a shared payload are marked with are known ones. */
  char h[LPARW_HEADER_SIZE];
  lparW_header out;
  lparW_pack_routed(h, LPAR_MSG_PUSH, LPAR_FLAG_ROUTES | LPAR_FLAG_SHM, 0, 1, 0);
  CHECK(lparW_parse_routed(h, &out, LPAR_MAX_PAYLOAD, &why) == LPAR_OK);
}

int main(void) {
  test_fanout();
  test_header_round_trip();
  test_bad_headers();
  test_routed();
  size_t steps[] = {1, 2, 7, 24, 25, 1000};
  for (size_t i = 0; i < sizeof steps / sizeof *steps; i++) test_reader_splits(steps[i]);
  test_reader_large_frame();
  test_reader_rejects_garbage();
  test_send_recv();
  CHECK(strcmp(lpar_strerror(LPAR_EBADMSG), "malformed message") == 0);
  CHECK(strcmp(lpar_strerror(12345), "unknown error") == 0);
  return check_report();
}
