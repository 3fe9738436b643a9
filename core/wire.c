/*
** wire.c: message framing.
*/
#include "wire.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "lpar.h"

static void put_u32(char *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (char)(v >> (8 * i));
}

static void put_u64(char *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (char)(v >> (8 * i));
}

static uint32_t get_u32(const char *p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; i--) v = (v << 8) | (unsigned char)p[i];
  return v;
}

static uint64_t get_u64(const char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | (unsigned char)p[i];
  return v;
}

void lparW_pack_routed(char out[LPARW_HEADER_SIZE], int type, unsigned flags, unsigned route,
                       uint64_t id, uint64_t len) {
  put_u32(out, LPARW_MAGIC);
  out[4] = (char)type;
  out[5] = (char)flags;
  out[6] = (char)(route & 0xff);
  out[7] = (char)((route >> 8) & 0xff);
  put_u64(out + 8, id);
  put_u64(out + 16, len);
}

void lparW_pack_header(char out[LPARW_HEADER_SIZE], int type, unsigned flags,
                       uint64_t id, uint64_t len) {
  lparW_pack_routed(out, type, flags, 0, id, len);
}

int lparW_parse_routed(const char in[LPARW_HEADER_SIZE], lparW_header *h, uint64_t max_len,
                       const char **reason) {
  if (get_u32(in) != LPARW_MAGIC) {
    *reason = "bad magic (not an lpar frame)";
    return LPAR_EBADMSG;
  }
  h->type = (unsigned char)in[4];
  h->flags = (unsigned char)in[5];
  h->id = get_u64(in + 8);
  h->len = get_u64(in + 16);
  if (h->type < LPAR_MSG_HELLO || h->type >= LPAR_MSG_MAX_) {
    *reason = "unknown message type";
    return LPAR_EBADMSG;
  }
  if (h->flags & ~(unsigned)(LPAR_FLAG_TEXT | LPAR_FLAG_RAW | LPAR_FLAG_FDS | LPAR_FLAG_INLINE |
                             LPAR_FLAG_ROUTES | LPAR_FLAG_SHM | LPAR_FLAG_DEADLINE)) {
    *reason = "unknown flags";
    return LPAR_EBADMSG;
  }
  h->route = (unsigned char)in[6] | ((unsigned)(unsigned char)in[7] << 8);
  if (h->len > max_len) {
    *reason = max_len == LPAR_MAX_PAYLOAD ? "bad length (larger than the 1 GiB limit)"
                                          : "bad length (too large before authentication)";
    return LPAR_EBADMSG;
  }
  return LPAR_OK;
}

int lparW_parse_header(const char in[LPARW_HEADER_SIZE], lparW_header *h,
                       const char **reason) {
  int rc = lparW_parse_routed(in, h, LPAR_MAX_PAYLOAD, reason);
  if (rc == LPAR_OK && h->route != 0) {
    *reason = "reserved bytes not zero";
    return LPAR_EBADMSG;
  }
  return rc;
}

void lparW_reader_init(lparW_reader *r) {
  lparB_init(&r->buf);
  r->pos = 0;
  r->routed = 0;
  r->trailer = 0;
  r->segment = 0;
  r->max_len = LPAR_MAX_PAYLOAD;
}

size_t lparW_segments(uint64_t len, size_t segment) {
  if (segment == 0 || len == 0) return 1;
  return (size_t)((len + segment - 1) / segment);
}

size_t lparW_wire_size(const lparW_reader *r, uint64_t len) {
  return LPARW_HEADER_SIZE + (size_t)len + lparW_segments(len, r->segment) * r->trailer;
}

void lparW_reader_free(lparW_reader *r) {
  lparB_free(&r->buf);
  r->pos = 0;
}

/* Bytes still missing from the frame that starts at r->pos, if known. */
static size_t frame_missing(const lparW_reader *r) {
  size_t have = r->buf.len - r->pos;
  if (have < LPARW_HEADER_SIZE) return 0;
  uint64_t len = get_u64(r->buf.data + r->pos + 16);
  if (len > r->max_len) return 0; /* reported by _next */
  size_t total = lparW_wire_size(r, len);
  return total > have ? total - have : 0;
}

int lparW_reader_space(lparW_reader *r, char **p, size_t *n) {
  /* Move the unconsumed tail to the front so the buffer does not creep. */
  if (r->pos > 0) {
    size_t rest = r->buf.len - r->pos;
    memmove(r->buf.data, r->buf.data + r->pos, rest);
    r->buf.len = rest;
    r->pos = 0;
  }
  size_t want = frame_missing(r);
  if (want < 65536) want = 65536;
  int rc = lparB_reserve(&r->buf, want);
  if (rc < 0) return rc;
  *p = r->buf.data + r->buf.len;
  *n = r->buf.cap - r->buf.len;
  return LPAR_OK;
}

void lparW_reader_commit(lparW_reader *r, size_t n) { r->buf.len += n; }

int lparW_reader_next(lparW_reader *r, lparW_header *h, const char **payload,
                      const char **reason) {
  size_t have = r->buf.len - r->pos;
  if (have < LPARW_HEADER_SIZE) return 0;
  int rc = r->routed ? lparW_parse_routed(r->buf.data + r->pos, h, r->max_len, reason)
                      : lparW_parse_header(r->buf.data + r->pos, h, reason);
  if (rc < 0) return rc;
  size_t total = lparW_wire_size(r, h->len);
  if (have < total) return 0;
  *payload = r->buf.data + r->pos + LPARW_HEADER_SIZE;
  r->pos += total;
  if (r->pos == r->buf.len) r->buf.len = r->pos = 0;
  return 1;
}

/* The number after `key` (" pid=") in a HELLO, or `missing`. */
static int hello_field(const char *hello, size_t len, const char *key, int missing) {
  char text[160];
  if (len >= sizeof text) len = sizeof text - 1;
  memcpy(text, hello, len);
  text[len] = 0;
  const char *at = strstr(text, key);
  return at ? atoi(at + strlen(key)) : missing;
}

int lparW_hello_pid(const char *hello, size_t len) { return hello_field(hello, len, " pid=", -1); }

int lparW_hello_heartbeat(const char *hello, size_t len) {
  int ms = hello_field(hello, len, " heartbeat=", LPAR_HEARTBEAT_MS);
  return ms > 0 ? ms : 0;
}

int lparW_reader_peek(lparW_reader *r, lparW_header *h, size_t *have, const char **reason) {
  *have = r->buf.len - r->pos;
  if (*have < LPARW_HEADER_SIZE) return 0;
  int rc = r->routed ? lparW_parse_routed(r->buf.data + r->pos, h, r->max_len, reason)
                      : lparW_parse_header(r->buf.data + r->pos, h, reason);
  return rc < 0 ? rc : 1;
}

void lparW_exit_parse(const char *text, size_t len, int *status, int *signal, char *why,
                      size_t whylen) {
  char buf[192];
  if (len >= sizeof buf) len = sizeof buf - 1;
  memcpy(buf, text, len);
  buf[len] = 0;
  int used = 0;
  *status = -1;
  *signal = 0;
  why[0] = 0;
  if (sscanf(buf, "%d %d%n", status, signal, &used) < 2) {
    *status = -1;
    *signal = 0;
    return;
  }
  if (buf[used] == ' ') snprintf(why, whylen, "%s", buf + used + 1);
}

static unsigned get_u16(const char *p) {
  return (unsigned)(unsigned char)p[0] | (unsigned)(unsigned char)p[1] << 8;
}

static void put_u16(char *p, unsigned v) {
  p[0] = (char)(v & 0xff);
  p[1] = (char)((v >> 8) & 0xff);
}

size_t lparW_fanout_bytes(size_t n) { return 2 + 4 * n; }

int lparW_fanout_parse(const char *payload, uint64_t len, lparW_fanout *f, const char **reason) {
  if (len < 2) {
    *reason = "route list shorter than its count";
    return LPAR_EBADMSG;
  }
  size_t n = get_u16(payload);
  if (n == 0 || n > LPARW_MAX_FANOUT) {
    *reason = n == 0 ? "empty route list" : "route list longer than 4096 engines";
    return LPAR_EBADMSG;
  }
  if (lparW_fanout_bytes(n) > len) {
    *reason = "route list longer than the payload";
    return LPAR_EBADMSG;
  }
  f->n = n;
  f->entries = payload + 2;
  f->body = payload + lparW_fanout_bytes(n);
  f->body_len = (size_t)len - lparW_fanout_bytes(n);
  return LPAR_OK;
}

void lparW_fanout_get(const lparW_fanout *f, size_t i, unsigned *route, unsigned *offset) {
  *route = get_u16(f->entries + 4 * i);
  *offset = get_u16(f->entries + 4 * i + 2);
}

void lparW_fanout_count(char *list, size_t n) { put_u16(list, (unsigned)n); }

void lparW_fanout_put(char *list, size_t i, unsigned route, unsigned offset) {
  put_u16(list + 2 + 4 * i, route);
  put_u16(list + 2 + 4 * i + 2, offset);
}

int lparW_write_all(int fd, const void *p, size_t n) {
  const char *s = p;
  while (n > 0) {
    ssize_t k = send(fd, s, n, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR) continue;
      return LPAR_ESYS;
    }
    s += k;
    n -= (size_t)k;
  }
  return LPAR_OK;
}

int lparW_send(int fd, int type, unsigned flags, uint64_t id, const void *payload,
               size_t len) {
  char head[LPARW_HEADER_SIZE];
  lparW_pack_header(head, type, flags, id, len);
  struct iovec iov[2] = {{head, sizeof head}, {(void *)payload, len}};
  struct msghdr msg = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
  size_t total = sizeof head + len;
  ssize_t k;
  do {
    k = sendmsg(fd, &msg, MSG_NOSIGNAL);
  } while (k < 0 && errno == EINTR);
  if (k < 0) return LPAR_ESYS;
  if ((size_t)k == total) return LPAR_OK;
  /* Partial write (a large payload): finish with plain sends. */
  size_t done = (size_t)k;
  if (done < sizeof head) {
    int rc = lparW_write_all(fd, head + done, sizeof head - done);
    if (rc < 0) return rc;
    done = sizeof head;
  }
  return lparW_write_all(fd, (const char *)payload + (done - sizeof head),
                         total - done);
}
