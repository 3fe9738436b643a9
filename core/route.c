/*
** route.c: one connection that carries frames (see route.h).
**
** The socket is ours, non-blocking, watched with a uv_poll: lpar reads and
** writes it itself (recvmsg, sendmsg) rather than through a uv_stream,
** because descriptors must travel with the frame they belong to, and
** libuv's streams drop ancillary data. Writes use MSG_NOSIGNAL, so a peer
** that is gone is a failed write, never a SIGPIPE.
*/
#include "route.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <sodium.h>

#include "lpar.h"
#include "shm.h"

#define FD_BATCHES 32       /* descriptor batches received ahead of their frames */
#define SMALL_FRAME 4096    /* frames up to this are written from the stack when they can */
/*
** A sealed payload goes in segments of this many bytes, each with its own
** tag: the sender writes the first segments while it seals the next, and
** the receiver opens each as it comes, so sealing, the network and opening
** overlap instead of taking turns.
*/
#define SEGMENT (128 * 1024)
/* A corked route gathers small frames into chunks of at least this many bytes. */
#define CORK_CHUNK (16 * 1024)

/* A frame (or raw bytes) waiting for the socket. */
typedef struct chunk {
  struct chunk *next;
  size_t len, off;  /* bytes in data; bytes written */
  size_t cap;       /* bytes data has room for (a corked route appends frames) */
  size_t ready;     /* bytes that may be written (a frame being sealed has fewer than len) */
  int unsealed;     /* a frame to seal once the session starts */
  int nfds;         /* descriptors that go with the first byte (duplicates, ours) */
  int fds[LPARH_MAX_FDS];
  char data[];
} chunk;

typedef struct fd_batch {
  int n;
  int fds[LPARH_MAX_FDS];
} fd_batch;

struct lparR_route {
  lparR_kind kind;
  int fd, side;
  uv_poll_t poll;
  uv_timer_t auth_timer;
  int timer_inited;
  int open_handles;
  int events; /* what the poll watches now */
  int closing, refused_close;
  char reason[200];
  int sealed, session, authenticated;
  int dispatching;         /* inside dispatch: a failed write closes after it */
  int corked;              /* frames wait in the queue until lparR_uncork */
  uint64_t bytes_sent;     /* frames sent, as they take the wire (headers and tags too) */
  char write_failed[200];  /* why the last write failed, while dispatching */
  size_t opened; /* segments of the frame at the reader's front opened so far */
  lparA_channel chan;
  lparW_reader reader;
  chunk *head, *tail;
  fd_batch *batches; /* LPARR_UNIX: a ring of FD_BATCHES */
  int batch_first, batch_count;
  lparR_owner *owner;
  lparR_route *older, *newer; /* in the owner's list of open strangers */
  int listed;
  lparR_source source;
  lparR_handlers handlers;
  void *ud;
};

static void unlist_stranger(lparR_route *r) {
  if (!r->listed) return;
  lparR_owner *o = r->owner;
  if (r->older) r->older->newer = r->newer; else o->oldest = r->newer;
  if (r->newer) r->newer->older = r->older; else o->newest = r->older;
  r->older = r->newer = NULL;
  r->listed = 0;
  o->open_strangers--;
}

void lparR_ignore_sigpipe(void) {
  struct sigaction old;
  if (sigaction(SIGPIPE, NULL, &old) == 0 && old.sa_handler == SIG_DFL &&
      !(old.sa_flags & SA_SIGINFO))
    signal(SIGPIPE, SIG_IGN);
}

static void close_fds(int *fds, int n) {
  for (int i = 0; i < n; i++)
    if (fds[i] >= 0) close(fds[i]);
}

/* ---- closing ---- */

static void free_chunks(lparR_route *r) {
  for (chunk *c = r->head, *next; c; c = next) {
    next = c->next;
    close_fds(c->fds, c->nfds);
    free(c);
  }
  r->head = r->tail = NULL;
}

static void on_handle_closed(uv_handle_t *h) {
  lparR_route *r = h->data;
  if (--r->open_handles > 0) return;
  if (r->handlers.on_close)
    r->handlers.on_close(r, r->reason[0] ? r->reason : "closed", r->refused_close, r->ud);
  lparR_owner *o = r->owner;
  if (o) {
    if (r->sealed && !r->authenticated) o->strangers--;
    if (--o->routes == 0 && o->release) o->release(o);
  }
  for (int i = 0; r->batches && i < r->batch_count; i++) {
    fd_batch *b = &r->batches[(r->batch_first + i) % FD_BATCHES];
    close_fds(b->fds, b->n);
  }
  free(r->batches);
  lparW_reader_free(&r->reader);
  sodium_memzero(&r->chan, sizeof r->chan);
  free(r);
}

/* Stop reading and writing now; the peer sees EOF at once. */
static void close_route(lparR_route *r, const char *reason, int refused) {
  if (r->closing) return;
  r->closing = 1;
  unlist_stranger(r);
  r->refused_close = refused;
  if (reason) snprintf(r->reason, sizeof r->reason, "%s", reason);
  if (refused && r->owner) r->owner->disconnected++;
  free_chunks(r);
  uv_close((uv_handle_t *)&r->poll, on_handle_closed);
  if (r->timer_inited) uv_close((uv_handle_t *)&r->auth_timer, on_handle_closed);
  close(r->fd);
  r->fd = -1;
  if (r->side >= 0) close(r->side);
  r->side = -1;
}

void lparR_close(lparR_route *r, const char *reason) { close_route(r, reason, 0); }

static void refuse(lparR_route *r, const char *what, const char *why) {
  if (r->owner) r->owner->refused++;
  char reason[sizeof r->reason];
  if (r->sealed)
    snprintf(reason, sizeof reason, "%s: %s", what, why);
  else /* an engine's socket: only malformed frames can be refused */
    snprintf(reason, sizeof reason, "%s", why);
  close_route(r, reason, 1);
}

/* ---- writing ---- */

/*
** A write failed: the peer is gone. What it sent before it went is still
** to be read (a forged frame must still be refused and counted, a dead
** engine's last words delivered), so inside dispatch the route closes only
** once the frames already read are handled.
*/
static int peek_notice(lparR_route *r, char *why, size_t n);

static void write_failed(lparR_route *r, int err) {
  char why[sizeof r->reason];
  /* A controller that refused us with a notice then closed: say what it said. */
  if (!peek_notice(r, why, sizeof why)) snprintf(why, sizeof why, "connection lost (%s)", strerror(err));
  if (!r->dispatching) {
    close_route(r, why, 0);
    return;
  }
  if (!r->write_failed[0]) snprintf(r->write_failed, sizeof r->write_failed, "%s", why);
  free_chunks(r);
}

static void update_poll(lparR_route *r);

/* sendmsg with the descriptors (if any) on the first byte. Bytes written, or -errno. */
static ssize_t send_pieces(lparR_route *r, struct iovec *iov, int niov, const int *fds, int nfds) {
  union {
    char buf[CMSG_SPACE(sizeof(int) * LPARH_MAX_FDS)];
    struct cmsghdr align;
  } ctl;
  struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
  if (nfds > 0) {
    m.msg_control = ctl.buf;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
  }
  for (;;) {
    ssize_t k = sendmsg(r->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k >= 0) return k;
    if (errno == EINTR) continue;
    return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;
  }
}

static chunk *chunk_with_room(size_t len, size_t cap) {
  chunk *c = malloc(sizeof *c + cap);
  if (c == NULL) return NULL;
  c->next = NULL;
  c->len = len;
  c->cap = cap;
  c->off = 0;
  c->ready = len;
  c->unsealed = 0;
  c->nfds = 0;
  return c;
}

static chunk *chunk_new(size_t len) { return chunk_with_room(len, len); }

/* Keep duplicates of the caller's descriptors in c (they must wait). */
static int chunk_keep_fds(chunk *c, const int *fds, int nfds) {
  for (int i = 0; i < nfds; i++) {
    c->fds[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 0);
    if (c->fds[i] < 0) {
      close_fds(c->fds, i);
      return LPAR_ESYS;
    }
    c->nfds = i + 1;
  }
  return LPAR_OK;
}

static void enqueue(lparR_route *r, chunk *c) {
  if (r->tail)
    r->tail->next = c;
  else
    r->head = c;
  r->tail = c;
  if (!r->corked) update_poll(r); /* lparR_uncork writes or polls */
}

/* Write queued chunks until the socket is full or one waits for the session. */
static void flush(lparR_route *r) {
  while (r->head && !r->head->unsealed && !r->closing) {
    chunk *c = r->head;
    if (c->off == c->ready) break; /* the rest is still being sealed */
    struct iovec iov = {c->data + c->off, c->ready - c->off};
    ssize_t k = send_pieces(r, &iov, 1, c->fds, c->off == 0 ? c->nfds : 0);
    if (k < 0) {
      write_failed(r, (int)-k);
      return;
    }
    if (k > 0 && c->off == 0) { /* the descriptors went with the first byte */
      close_fds(c->fds, c->nfds);
      c->nfds = 0;
    }
    c->off += (size_t)k;
    if (c->off < c->ready) break; /* the socket is full */
    if (c->off < c->len) break;
    r->head = c->next;
    if (r->head == NULL) r->tail = NULL;
    free(c);
  }
  update_poll(r);
}

/*
** The pieces copied to the end of the queue: into the last chunk when it
** has room, else into a new one of at least CORK_CHUNK bytes. 1 when they
** started a chunk, 0 when they joined one, or an error.
*/
static int append_to_queue(lparR_route *r, struct iovec *iov, int niov, size_t total, const int *fds,
                           int nfds) {
  chunk *c = r->tail;
  int started = 0;
  /* Descriptors go with their own frame's first byte: such a frame starts a chunk. */
  if (c == NULL || nfds > 0 || c->unsealed || c->ready < c->len || c->cap - c->len < total) {
    c = chunk_with_room(0, total > CORK_CHUNK ? total : CORK_CHUNK);
    if (c == NULL) return LPAR_ENOMEM;
    if (nfds > 0 && chunk_keep_fds(c, fds, nfds) < 0) {
      free(c);
      return LPAR_ESYS;
    }
    enqueue(r, c);
    started = 1;
  }
  for (int i = 0; i < niov; i++) {
    memcpy(c->data + c->len, iov[i].iov_base, iov[i].iov_len);
    c->len += iov[i].iov_len;
  }
  c->ready = c->len;
  return started;
}

static int cork_append(lparR_route *r, struct iovec *iov, int niov, size_t total, const int *fds,
                       int nfds) {
  int rc = append_to_queue(r, iov, niov, total, fds, nfds);
  if (rc < 0) return rc;
  if (r->head != r->tail) flush(r); /* a whole chunk is gathered: no use holding it */
  return LPAR_OK;
}

/*
** Write the pieces now if nothing waits before them, then queue what is
** left as one chunk (the descriptors with it if none of it went).
*/
static int write_or_queue(lparR_route *r, struct iovec *iov, int niov, const int *fds, int nfds) {
  size_t total = 0, done = 0;
  for (int i = 0; i < niov; i++) total += iov[i].iov_len;
  if (r->corked) return cork_append(r, iov, niov, total, fds, nfds);
  /*
  ** Behind frames already waiting for the socket, a small one joins the
  ** last of them: a backlog of small requests then goes out in a few
  ** writes of CORK_CHUNK bytes, not in one write each. Nothing waits
  ** longer for it: the socket takes nothing before what is queued.
  */
  if (r->head != NULL && total <= CORK_CHUNK) {
    int rc = append_to_queue(r, iov, niov, total, fds, nfds);
    return rc < 0 ? rc : LPAR_OK;
  }
  if (r->head == NULL) {
    ssize_t k = send_pieces(r, iov, niov, fds, nfds);
    if (k < 0) {
      write_failed(r, (int)-k);
      return LPAR_EDEAD;
    }
    done = (size_t)k;
    if (done == total) return LPAR_OK;
  }
  chunk *c = chunk_new(total - done);
  if (c == NULL) return LPAR_ENOMEM;
  if (done == 0 && nfds > 0 && chunk_keep_fds(c, fds, nfds) < 0) {
    free(c);
    return LPAR_ESYS;
  }
  size_t k = 0, skip = done;
  for (int i = 0; i < niov; i++) {
    size_t take = iov[i].iov_len;
    if (skip >= take) {
      skip -= take;
      continue;
    }
    memcpy(c->data + k, (char *)iov[i].iov_base + skip, take - skip);
    k += take - skip;
    skip = 0;
  }
  enqueue(r, c);
  return LPAR_OK;
}

static int check_send(const lparR_route *r, unsigned route, size_t len, int nfds) {
  if (r->closing || r->write_failed[0]) return LPAR_EDEAD;
  if (len > LPAR_MAX_PAYLOAD) return LPAR_ETOOBIG;
  if (nfds < 0 || nfds > LPARH_MAX_FDS) return LPAR_EINVAL;
  if (r->kind == LPARR_TCP && nfds > 0) return LPAR_EINVAL;
  if (r->kind == LPARR_ENGINE && route != 0) return LPAR_EINVAL;
  if (route > LPARR_MAX_ROUTE) return LPAR_EINVAL;
  return LPAR_OK;
}

/* Where segment k of a sealed payload starts on the wire, header included. */
static size_t segment_at(size_t k) { return LPARW_HEADER_SIZE + k * (SEGMENT + LPARA_TAG_BYTES); }

static size_t segment_len(size_t len, size_t k) {
  size_t rest = len - k * SEGMENT;
  return rest < SEGMENT ? rest : SEGMENT;
}

static size_t sealed_size(size_t len) {
  return LPARW_HEADER_SIZE + len + lparW_segments(len, SEGMENT) * LPARA_TAG_BYTES;
}

/* Seal segment k of the frame in `wire` (its plaintext is `plain`, or in place). */
static void seal_segment(lparR_route *r, char *wire, size_t len, size_t k, const char *plain) {
  char *at = wire + segment_at(k);
  size_t n = segment_len(len, k);
  lparA_seal(&r->chan, wire, LPARW_HEADER_SIZE, plain ? plain : at, n, at, (unsigned char *)at + n);
}

/* Bytes [from, from + n) of the payload `pre` then `payload`, copied to dst. */
static void gather(char *dst, const char *pre, size_t prelen, const char *payload, size_t from,
                   size_t n) {
  if (from < prelen) {
    size_t k = prelen - from < n ? prelen - from : n;
    memcpy(dst, pre + from, k);
    dst += k;
    from += k;
    n -= k;
  }
  if (n > 0) memcpy(dst, payload + (from - prelen), n);
}

/*
** Queue a large sealed frame and write it as it is sealed: each segment may
** go out while the next is being sealed. Before the session starts, the
** plaintext waits in place instead, to be sealed by seal_waiting. The
** payload is `pre` then `payload` (a route list before a request).
*/
static int send_sealed(lparR_route *r, const char head[LPARW_HEADER_SIZE], const char *pre,
                       size_t prelen, const char *payload, size_t len, const int *fds, int nfds) {
  chunk *c = chunk_new(sealed_size(len));
  if (c == NULL) return LPAR_ENOMEM;
  if (nfds > 0 && chunk_keep_fds(c, fds, nfds) < 0) {
    free(c);
    return LPAR_ESYS;
  }
  memcpy(c->data, head, LPARW_HEADER_SIZE);
  size_t nseg = lparW_segments(len, SEGMENT);
  if (!r->session) {
    for (size_t k = 0; k < nseg; k++)
      gather(c->data + segment_at(k), pre, prelen, payload, k * SEGMENT, segment_len(len, k));
    c->unsealed = 1;
    c->ready = 0;
    enqueue(r, c);
    return LPAR_OK;
  }
  c->ready = LPARW_HEADER_SIZE;
  enqueue(r, c);
  for (size_t k = 0; k < nseg; k++) {
    const char *plain = NULL; /* a segment that holds some of `pre` is gathered and sealed in place */
    if (k * SEGMENT >= prelen)
      plain = payload + (k * SEGMENT - prelen);
    else
      gather(c->data + segment_at(k), pre, prelen, payload, k * SEGMENT, segment_len(len, k));
    seal_segment(r, c->data, len, k, plain);
    c->ready = k + 1 == nseg ? c->len : segment_at(k + 1);
    if (k + 1 == nseg) break;
    if (r->head == c) flush(r); /* what is sealed goes while the rest is sealed */
    if (r->closing) return LPAR_EDEAD;
  }
  if (r->head == c) flush(r); /* may free c */
  return r->closing ? LPAR_EDEAD : LPAR_OK;
}

int lparR_send2(lparR_route *r, int type, unsigned flags, unsigned route, uint64_t id,
                const void *pre, size_t prelen, const void *payload, size_t len, const int *fds,
                int nfds) {
  if (len > LPAR_MAX_PAYLOAD || prelen > LPAR_MAX_PAYLOAD - len) return LPAR_ETOOBIG;
  size_t total = prelen + len;
  int rc = check_send(r, route, total, nfds);
  if (rc < 0) return rc;
  flags = nfds > 0 ? (flags | LPAR_FLAG_FDS) : (flags & ~LPAR_FLAG_FDS);
  char head[LPARW_HEADER_SIZE];
  lparW_pack_routed(head, type, flags, route, id, total);
  if (r->kind == LPARR_ENGINE) {
    /* Descriptors first, on the side socket: the engine reads them after the frame. */
    if (nfds > 0 && (r->side < 0 || lparH_send_fds(r->side, fds, nfds) < 0)) return LPAR_EDEAD;
    r->bytes_sent += LPARW_HEADER_SIZE + total;
    struct iovec iov[3] = {{head, sizeof head}};
    int niov = 1;
    if (prelen) iov[niov++] = (struct iovec){(void *)pre, prelen};
    if (len) iov[niov++] = (struct iovec){(void *)payload, len};
    return write_or_queue(r, iov, niov, NULL, 0);
  }
  r->bytes_sent += sealed_size(total);
  if (r->session && (r->head == NULL || r->corked) && total <= SMALL_FRAME) {
    char plain[SMALL_FRAME], body[SMALL_FRAME + LPARA_TAG_BYTES];
    const char *p = payload;
    if (prelen) {
      gather(plain, pre, prelen, payload, 0, total);
      p = plain;
    }
    lparA_seal(&r->chan, head, sizeof head, p, total, body, (unsigned char *)body + total);
    struct iovec iov[2] = {{head, sizeof head}, {body, total + LPARA_TAG_BYTES}};
    return write_or_queue(r, iov, 2, fds, nfds);
  }
  return send_sealed(r, head, pre, prelen, payload, total, fds, nfds);
}

int lparR_send(lparR_route *r, int type, unsigned flags, unsigned route, uint64_t id,
               const void *payload, size_t len, const int *fds, int nfds) {
  return lparR_send2(r, type, flags, route, id, NULL, 0, payload, len, fds, nfds);
}

uint64_t lparR_bytes_sent(const lparR_route *r) { return r->bytes_sent; }

int lparR_send_raw(lparR_route *r, const void *bytes, size_t len) {
  if (r->closing || r->write_failed[0]) return LPAR_EDEAD;
  chunk *c = chunk_new(len);
  if (c == NULL) return LPAR_ENOMEM;
  memcpy(c->data, bytes, len);
  enqueue(r, c);
  if (r->head == c) flush(r);
  return LPAR_OK;
}

int lparR_seal_copy(lparR_route *r, int type, unsigned flags, unsigned route, uint64_t id,
                    const void *payload, size_t len, lparB_buffer *out) {
  int rc = check_send(r, route, len, 0);
  if (rc < 0) return rc;
  if (!r->sealed || !r->session) return LPAR_EINVAL;
  size_t at = out->len, size = sealed_size(len);
  if (lparB_reserve(out, size) < 0) return LPAR_ENOMEM;
  char *p = out->data + at;
  lparW_pack_routed(p, type, flags & ~LPAR_FLAG_FDS, route, id, len);
  for (size_t k = 0; k < lparW_segments(len, SEGMENT); k++)
    seal_segment(r, p, len, k, (const char *)payload + k * SEGMENT);
  out->len += size;
  return LPAR_OK;
}

/* The peer's hello came: seal what waited for it, in order. */
static void seal_waiting(lparR_route *r) {
  for (chunk *c = r->head; c; c = c->next) {
    if (!c->unsealed) continue;
    lparW_header h;
    const char *why;
    lparW_parse_routed(c->data, &h, LPAR_MAX_PAYLOAD, &why); /* ours: it parses */
    for (size_t k = 0; k < lparW_segments(h.len, SEGMENT); k++)
      seal_segment(r, c->data, (size_t)h.len, k, NULL);
    c->unsealed = 0;
    c->ready = c->len;
  }
}

/* ---- reading ---- */

static int take_fds(lparR_route *r, int *fds) {
  switch (r->kind) {
  case LPARR_ENGINE:
    return r->side < 0 ? LPAR_EBADMSG : lparH_recv_fds(r->side, fds, LPARH_MAX_FDS, 0);
  case LPARR_UNIX: {
    if (r->batch_count == 0) return LPAR_EBADMSG;
    fd_batch *b = &r->batches[r->batch_first];
    int n = b->n;
    memcpy(fds, b->fds, sizeof(int) * (size_t)n);
    r->batch_first = (r->batch_first + 1) % FD_BATCHES;
    r->batch_count--;
    return n;
  }
  default:
    return LPAR_EBADMSG;
  }
}

static void authenticated(lparR_route *r) {
  r->authenticated = 1;
  r->reader.max_len = LPAR_MAX_PAYLOAD;
  if (r->timer_inited) uv_timer_stop(&r->auth_timer);
  unlist_stranger(r);
  if (r->owner) r->owner->strangers--;
  if (r->handlers.on_authenticated) r->handlers.on_authenticated(r, r->ud);
}

/*
** Open the segments of the frame at the reader's front that are in, in
** place, and close up the tags between them, so its payload ends up whole
** and contiguous. 0, or -1 once the route is refused. A malformed header is
** left for lparW_reader_next to report.
*/
static int open_segments(lparR_route *r) {
  lparW_reader *rd = &r->reader;
  lparW_header h;
  size_t have;
  const char *why = NULL;
  if (lparW_reader_peek(rd, &h, &have, &why) <= 0) return 0;
  size_t len = (size_t)h.len, nseg = lparW_segments(len, SEGMENT);
  char *frame = rd->buf.data + rd->pos;
  while (r->opened < nseg) {
    size_t k = r->opened, n = segment_len(len, k), at = segment_at(k);
    if (have < at + n + LPARA_TAG_BYTES) break;
    if (lparA_open(&r->chan, frame, LPARW_HEADER_SIZE, frame + at, n,
                   (unsigned char *)frame + at + n, &why) < 0) {
      refuse(r, "message failed authentication", why);
      return -1;
    }
    if (k > 0) memmove(frame + LPARW_HEADER_SIZE + k * SEGMENT, frame + at, n);
    r->opened++;
    if (!r->authenticated) {
      authenticated(r);
      if (r->closing) return -1;
    }
  }
  return 0;
}

static int take_notice(lparR_route *r, int at_eof);

/* Hand every whole frame in the reader to the handler. */
static void dispatch_frames(lparR_route *r) {
  lparW_reader *rd = &r->reader;
  if (r->sealed && !r->session) {
    if (rd->buf.len - rd->pos < LPARA_HELLO_BYTES || take_notice(r, 0)) return;
    if (lparA_start(&r->chan, (unsigned char *)rd->buf.data + rd->pos) < 0) {
      refuse(r, "malformed hello", "unknown cipher bits");
      return;
    }
    rd->pos += LPARA_HELLO_BYTES;
    r->session = 1;
    seal_waiting(r);
    flush(r);
  }
  while (!r->closing) {
    lparW_header h;
    const char *payload = NULL, *reason = NULL;
    if (r->sealed && open_segments(r) < 0) return;
    int rc = lparW_reader_next(rd, &h, &payload, &reason);
    if (rc == 0) return;
    if (rc < 0) {
      if (r->sealed) r->chan.dropped++;
      refuse(r, "malformed frame", reason);
      return;
    }
    r->opened = 0; /* every segment of it was opened above */
    int fds[LPARH_MAX_FDS], nfds = 0;
    if (h.flags & LPAR_FLAG_FDS) {
      nfds = take_fds(r, fds);
      if (nfds < 0) {
        refuse(r, "malformed frame", "flagged with descriptors that did not come");
        return;
      }
    }
    if (r->handlers.on_frame) r->handlers.on_frame(r, &h, payload, fds, nfds, r->ud);
    close_fds(fds, nfds);
  }
}

static void dispatch(lparR_route *r) {
  r->dispatching++;
  dispatch_frames(r);
  if (r->handlers.on_dispatched) r->handlers.on_dispatched(r, r->ud);
  if (--r->dispatching == 0 && r->write_failed[0]) close_route(r, r->write_failed, 0);
}

/* Descriptors that came with the bytes just read: one batch, in order. */
static int keep_batch(lparR_route *r, struct msghdr *m) {
  for (struct cmsghdr *cm = CMSG_FIRSTHDR(m); cm; cm = CMSG_NXTHDR(m, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    int n = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    int *got = (int *)CMSG_DATA(cm);
    if (r->kind != LPARR_UNIX || r->batch_count == FD_BATCHES) {
      close_fds(got, n);
      return -1;
    }
    fd_batch *b = &r->batches[(r->batch_first + r->batch_count) % FD_BATCHES];
    b->n = n;
    memcpy(b->fds, got, sizeof(int) * (size_t)n);
    r->batch_count++;
  }
  return (m->msg_flags & MSG_CTRUNC) ? -1 : 0;
}

/* One read: 1 when bytes came, 0 when there are none now, -1 when closed. */
static int read_some(lparR_route *r) {
  char *p = NULL;
  size_t n = 0;
  if (lparW_reader_space(&r->reader, &p, &n) < 0) {
    close_route(r, "out of memory for an incoming frame", 0);
    return -1;
  }
  union {
    char buf[CMSG_SPACE(sizeof(int) * LPARH_MAX_FDS)];
    struct cmsghdr align;
  } ctl;
  struct iovec iov = {p, n};
  struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                     .msg_controllen = sizeof ctl.buf};
  ssize_t k;
  do k = recvmsg(r->fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  while (k < 0 && errno == EINTR);
  if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
  if (k < 0) {
    char why[160];
    snprintf(why, sizeof why, "connection lost (%s)", strerror(errno));
    close_route(r, why, 0);
    return -1;
  }
  if (m.msg_controllen > 0 && keep_batch(r, &m) < 0) {
    refuse(r, "malformed frame", "descriptors where none may come, or too many");
    return -1;
  }
  if (k == 0) {
    if (r->sealed && !r->session && take_notice(r, 1)) return -1;
    close_route(r, "the peer closed the connection", 0);
    return -1;
  }
  lparW_reader_commit(&r->reader, (size_t)k);
  dispatch(r);
  return r->closing ? -1 : 1;
}

void lparR_cork(lparR_route *r) { r->corked = 1; }

void lparR_uncork(lparR_route *r) {
  if (!r->corked) return;
  r->corked = 0;
  if (r->head) flush(r);
}

int lparR_is_corked(const lparR_route *r) { return r->corked; }

void lparR_drain(lparR_route *r) {
  while (!r->closing && read_some(r) > 0) {
  }
}

static void on_poll(uv_poll_t *p, int status, int events) {
  lparR_route *r = p->data;
  if (r->closing) return;
  if (status < 0) {
    char why[sizeof r->reason];
    if (!peek_notice(r, why, sizeof why))
      snprintf(why, sizeof why, "connection lost (%s)", uv_strerror(status));
    close_route(r, why, 0);
    return;
  }
  if (events & UV_WRITABLE) flush(r);
  if (!r->closing && (events & (UV_READABLE | UV_DISCONNECT))) read_some(r);
}

static void update_poll(lparR_route *r) {
  if (r->closing) return;
  int want = UV_READABLE | UV_DISCONNECT;
  if (r->head && !r->head->unsealed) want |= UV_WRITABLE;
  if (want == r->events) return;
  r->events = want;
  uv_poll_start(&r->poll, want, on_poll);
}

/* ---- opening ---- */

static void on_auth_timeout(uv_timer_t *t) {
  lparR_route *r = t->data;
  char why[64];
  snprintf(why, sizeof why, "nothing that opened within %llu ms",
           (unsigned long long)uv_timer_get_repeat(t));
  refuse(r, "did not authenticate", why);
}

void lparR_set_auth_timeout(lparR_route *r, uint64_t ms) {
  if (r->closing || r->authenticated || !r->sealed) return;
  if (!r->timer_inited) {
    uv_timer_init(r->poll.loop, &r->auth_timer);
    r->auth_timer.data = r;
    r->timer_inited = 1;
    r->open_handles++;
  }
  uv_timer_set_repeat(&r->auth_timer, ms); /* remembered for the message */
  uv_timer_start(&r->auth_timer, on_auth_timeout, ms, 0);
}

int lparR_open(uv_loop_t *loop, lparR_kind kind, int fd, int side, const unsigned char *key,
               lparA_role role, const lparR_handlers *handlers, void *ud, lparR_route **out) {
  lparR_route *r = calloc(1, sizeof *r);
  int sealed = kind != LPARR_ENGINE;
  if (r && kind == LPARR_UNIX) r->batches = calloc(FD_BATCHES, sizeof *r->batches);
  if (r == NULL || (kind == LPARR_UNIX && r->batches == NULL) || (sealed && key == NULL)) {
    if (r) free(r->batches);
    free(r);
    close(fd);
    if (side >= 0) close(side);
    return key == NULL && sealed ? LPAR_EINVAL : LPAR_ENOMEM;
  }
  r->kind = kind;
  r->fd = fd;
  r->side = side;
  r->sealed = sealed;
  lparW_reader_init(&r->reader);
  r->reader.routed = sealed;
  r->reader.trailer = sealed ? LPARA_TAG_BYTES : 0;
  r->reader.segment = sealed ? SEGMENT : 0;
  r->reader.max_len = sealed ? LPARR_STRANGER_MAX : LPAR_MAX_PAYLOAD;
  lparR_set_handlers(r, handlers, ud);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  if (uv_poll_init(loop, &r->poll, fd) != 0) {
    lparW_reader_free(&r->reader);
    free(r->batches);
    free(r);
    close(fd);
    if (side >= 0) close(side);
    return LPAR_ESYS;
  }
  r->poll.data = r;
  r->open_handles = 1;
  update_poll(r);
  if (sealed) {
    lparA_init(&r->chan, key, role, getenv("LPAR_NO_AES") == NULL);
    chunk *c = chunk_new(LPARA_HELLO_BYTES);
    if (c == NULL) {
      lparR_set_handlers(r, NULL, NULL); /* the caller never sees this route */
      close_route(r, "out of memory", 0);
      return LPAR_ENOMEM; /* freed from the loop */
    }
    memcpy(c->data, r->chan.hello, LPARA_HELLO_BYTES);
    enqueue(r, c);
    flush(r);
  }
  *out = r;
  return LPAR_OK;
}

void lparR_set_handlers(lparR_route *r, const lparR_handlers *handlers, void *ud) {
  if (handlers)
    r->handlers = *handlers;
  else
    memset(&r->handlers, 0, sizeof r->handlers);
  r->ud = ud;
}

void lparR_set_owner(lparR_route *r, lparR_owner *o) {
  r->owner = o;
  o->routes++;
  if (r->sealed && !r->authenticated) {
    o->strangers++;
    if (!r->closing) {
      r->older = o->newest;
      if (o->newest) o->newest->newer = r; else o->oldest = r;
      o->newest = r;
      r->listed = 1;
      o->open_strangers++;
    }
  }
}

void lparR_set_source(lparR_route *r, const lparR_source *src) { r->source = *src; }

static int same_source(const lparR_source *a, const lparR_source *b) {
  return a->len == b->len && memcmp(a->bytes, b->bytes, a->len) == 0;
}

int lparR_strangers_from(const lparR_owner *o, const lparR_source *src) {
  int n = 0;
  for (const lparR_route *r = o->oldest; r; r = r->newer) n += same_source(&r->source, src);
  return n;
}

int lparR_evict_oldest_stranger(lparR_owner *o, const lparR_source *src, const char *reason) {
  lparR_route *victim = NULL;
  if (src) {
    for (lparR_route *r = o->oldest; r && !victim; r = r->newer)
      if (same_source(&r->source, src)) victim = r;
  } else { /* the oldest of the biggest source; at most the cap's square of steps */
    int most = 0;
    for (lparR_route *r = o->oldest; r; r = r->newer) {
      int n = lparR_strangers_from(o, &r->source);
      if (n > most) most = n, victim = r;
    }
  }
  if (victim == NULL) return 0;
  o->refused++;
  close_route(victim, reason, 1);
  return 1;
}

void lparR_write_notice(int fd, const char *why) {
  char notice[LPARR_NOTICE_MAX];
  memcpy(notice, LPARR_NOTICE_MAGIC, LPARA_NONCE_BYTES);
  notice[LPARA_NONCE_BYTES] = (char)0xff;
  int n = snprintf(notice + LPARA_HELLO_BYTES, sizeof notice - LPARA_HELLO_BYTES, "%s\n", why);
  size_t len = LPARA_HELLO_BYTES + (n < 0 ? 0 : (size_t)n);
  if (len > sizeof notice) len = sizeof notice;
  ssize_t k;
  do k = send(fd, notice, len, MSG_DONTWAIT | MSG_NOSIGNAL);
  while (k < 0 && errno == EINTR);
}

/*
** Is p[0..have) a notice (LPARR_NOTICE_MAGIC) a client's controller wrote
** instead of its hello? 1 with the reason in why once its line is in (or
** `whole`: no more will come), 0 when it is not one, -1 when it may be but
** its line is not all in yet.
*/
static int parse_notice(const lparR_route *r, const char *p, size_t have, int whole, char *why,
                        size_t n) {
  if (r->chan.role != LPARA_CLIENT || r->session || have < LPARA_HELLO_BYTES ||
      (unsigned char)p[LPARA_NONCE_BYTES] != 0xff || memcmp(p, LPARR_NOTICE_MAGIC, LPARA_NONCE_BYTES) != 0)
    return 0;
  size_t text = have - LPARA_HELLO_BYTES;
  if (text > LPARR_NOTICE_MAX - LPARA_HELLO_BYTES) text = LPARR_NOTICE_MAX - LPARA_HELLO_BYTES;
  const char *start = p + LPARA_HELLO_BYTES, *nl = memchr(start, '\n', text);
  if (nl == NULL && !whole && text < LPARR_NOTICE_MAX - LPARA_HELLO_BYTES) return -1;
  snprintf(why, n, "the controller refused the connection: %.*s",
           (int)(nl ? (size_t)(nl - start) : text), start);
  return 1;
}

/* The notice waiting unread in the socket, if there is one (the peer has
   closed: a write failed or the poll saw an error). 1 with why filled. */
static int peek_notice(lparR_route *r, char *why, size_t n) {
  if (!r->sealed || r->session || r->fd < 0) return 0;
  char buf[LPARR_NOTICE_MAX];
  lparW_reader *rd = &r->reader;
  size_t have = rd->buf.len - rd->pos;
  if (have > sizeof buf) return 0;
  if (have > 0) memcpy(buf, rd->buf.data + rd->pos, have); /* what was read of it already, then the rest */
  ssize_t k = recv(r->fd, buf + have, sizeof buf - have, MSG_PEEK | MSG_DONTWAIT);
  if (k > 0) have += (size_t)k;
  return parse_notice(r, buf, have, 1, why, n) == 1;
}

/*
** A client's controller wrote a notice instead of its hello: close with
** what it says, once its line is in (or at EOF). 1 if this was a notice
** (the route is closed, or waits for the rest of it), else 0.
*/
static int take_notice(lparR_route *r, int at_eof) {
  lparW_reader *rd = &r->reader;
  char why[sizeof r->reason];
  int rc = parse_notice(r, rd->buf.data + rd->pos, rd->buf.len - rd->pos, at_eof, why, sizeof why);
  if (rc == 1) close_route(r, why, 0);
  return rc != 0;
}

int lparR_session_started(const lparR_route *r) { return r->session; }
int lparR_passes_fds(const lparR_route *r) { return r->kind != LPARR_TCP; }
const char *lparR_close_reason(const lparR_route *r) {
  return r->closing ? (r->reason[0] ? r->reason : "closed") : NULL;
}
const char *lparR_cipher(const lparR_route *r) { return lparA_cipher_name(r->chan.cipher); }
