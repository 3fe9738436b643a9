/*
** route.h: one connection that carries frames (internal, prefix lparR_).
**
** Every message lpar sends or receives goes through a route, whatever is at
** the other end: a local engine (a socketpair, private to its parent), a
** standalone controller or its client over a unix socket, or either over
** TCP. A route has one send, one write path (write what the socket takes
** now, queue the rest, in order, with libuv's poll telling when to go on)
** and one way of reporting what arrives.
**
**   kind           frames                     descriptors (shared memory)
**   LPARR_ENGINE   plain, route field 0       on the engine's side socket
**   LPARR_UNIX     sealed (auth.h), routed    in-band, SCM_RIGHTS on the frame's first byte
**   LPARR_TCP      sealed (auth.h), routed    none: matrices travel inline
**
** A sealed route starts with each side sending its hello (auth.h); frames
** sent before the peer's hello has come wait in the queue, unsealed, and
** are sealed in order once it has. Until the peer's first frame opens, its
** frames may be at most LPARR_STRANGER_MAX bytes, so a stranger cannot make
** lpar buffer a gigabyte before anything is checked.
**
** A frame that fails a check (a malformed header, a seal that does not
** open, descriptors that did not come) closes the route: a byte stream
** cannot be resynchronised, and a peer that sends garbage is cut off.
*/
#ifndef LPAR_ROUTE_H
#define LPAR_ROUTE_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "auth.h"
#include "wire.h"

#define LPARR_STRANGER_MAX 65536 /* largest frame before the peer has authenticated */
#define LPARR_MAX_ROUTE 0xffff

typedef enum lparR_kind { LPARR_ENGINE = 1, LPARR_UNIX = 2, LPARR_TCP = 3 } lparR_kind;

typedef struct lparR_route lparR_route;

/*
** Where a connection comes from, as far as caps on strangers go: for TCP
** the peer's IPv4 address or IPv6 /64 (len bytes of them), for a unix
** socket nothing (len 0: every peer is the cluster's own user or root).
*/
typedef struct lparR_source {
  unsigned char len;
  unsigned char bytes[16];
} lparR_source;

/*
** What a controller that cannot take a connection (out of descriptors)
** writes instead of its hello before it closes it: these 16 bytes, a byte
** 0xFF (which no hello has: it would be unknown cipher bits), then why, in
** a line. A client closes its route with that reason.
*/
#define LPARR_NOTICE_MAGIC "lpar: refused:  "
#define LPARR_NOTICE_MAX 256 /* the whole notice, at most */

/*
** What a set of routes shares (a server's accepted connections): counts of
** refusals, and of routes alive and not yet authenticated. `release` is
** called when the last route of an owner that set it is freed.
*/
typedef struct lparR_owner {
  uint64_t refused;      /* frames refused, and peers timed out */
  uint64_t disconnected; /* peers cut off for it */
  int routes, strangers;
  void (*release)(struct lparR_owner *o);
  lparR_route *oldest, *newest; /* open strangers, by age (private) */
  int open_strangers;           /* how many: closing ones no longer count */
} lparR_owner;

typedef struct lparR_handlers {
  /*
  ** One frame, opened if it was sealed. The payload is valid during the
  ** call only. fds[0..nfds) came with it: keep one by setting its slot to
  ** -1; the rest are closed when the call returns.
  */
  void (*on_frame)(lparR_route *r, const lparW_header *h, const char *payload, int *fds, int nfds,
                   void *ud);
  /*
  ** The route closed: the peer hung up, or sent what was refused (`refused`
  ** is 1 then), or lparR_close was called. Called once, from the loop; the
  ** route is freed when it returns.
  */
  void (*on_close)(lparR_route *r, const char *reason, int refused, void *ud);
  /* The first frame of the peer's opened: it holds the key (sealed routes). */
  void (*on_authenticated)(lparR_route *r, void *ud);
  /*
  ** The frames of one read have all been handled (optional): what they
  ** made the owner send, gathered while corked, can go out now.
  */
  void (*on_dispatched)(lparR_route *r, void *ud);
} lparR_handlers;

/*
** A route over the connected stream socket `fd`, which it owns from now on
** (made non-blocking here). `side`: for LPARR_ENGINE, the datagram socket
** for descriptors, or -1; owned too. `key` and `role`: for sealed kinds; the
** hello goes out at once. 0 or LPAR_ENOMEM / LPAR_ESYS (fd closed then).
*/
int lparR_open(uv_loop_t *loop, lparR_kind kind, int fd, int side, const unsigned char *key,
               lparA_role role, const lparR_handlers *handlers, void *ud, lparR_route **out);

void lparR_set_handlers(lparR_route *r, const lparR_handlers *handlers, void *ud);
/* Count this route's refusals in `o` (and keep `o` alive while it is open). */
void lparR_set_owner(lparR_route *r, lparR_owner *o);
/* Where the route's peer is (before lparR_set_owner: strangers are counted by it). */
void lparR_set_source(lparR_route *r, const lparR_source *src);
/* The owner's open routes not yet authenticated from `src`. */
int lparR_strangers_from(const lparR_owner *o, const lparR_source *src);
/*
** Cut off an open route of the owner's that has not authenticated, so a
** newcomer can have its place: the oldest from `src`, or with `src` NULL
** the oldest of the source that holds the most (so one source's flood
** evicts its own, not others'). 1 if there was one. A real peer shows the
** key within milliseconds, so idle strangers cannot keep it out.
*/
int lparR_evict_oldest_stranger(lparR_owner *o, const lparR_source *src, const char *reason);
/*
** Write the notice (LPARR_NOTICE_MAGIC) saying `why` on a connection the
** caller then closes without opening a route on it. Never blocks.
*/
void lparR_write_notice(int fd, const char *why);

/*
** Send one frame: written now as far as the socket takes it, the rest
** copied and queued. `fds` go with it (the caller keeps its own; they are
** duplicated if they must wait). 0, or LPAR_EDEAD (closed), LPAR_ETOOBIG,
** LPAR_EINVAL (descriptors on TCP, a route field on an engine socket).
*/
int lparR_send(lparR_route *r, int type, unsigned flags, unsigned route, uint64_t id,
               const void *payload, size_t len, const int *fds, int nfds);
/*
** The same with the payload in two pieces, `pre` then `payload` (a route
** list before a request), sent as one frame without joining them first.
*/
int lparR_send2(lparR_route *r, int type, unsigned flags, unsigned route, uint64_t id,
                const void *pre, size_t prelen, const void *payload, size_t len, const int *fds,
                int nfds);
/* Bytes of the frames sent so far, as they take the wire (headers and tags too). */
uint64_t lparR_bytes_sent(const lparR_route *r);
/* Bytes as they are, queued in order with the frames: for tests of bad input. */
int lparR_send_raw(lparR_route *r, const void *bytes, size_t len);
/*
** The next frame as lparR_send would write it (sealed, consuming a
** sequence number), appended to `out` instead: how tests forge replays.
*/
int lparR_seal_copy(lparR_route *r, int type, unsigned flags, unsigned route, uint64_t id,
                    const void *payload, size_t len, lparB_buffer *out);

/*
** Cork: frames sent from now on wait in the queue, gathered into few
** chunks, until lparR_uncork writes them with as few system calls as the
** socket allows; a full chunk of them is written at once. Only for what
** is sent within one callback: a corked route is not watched for writing,
** so it must be uncorked before the loop runs again.
*/
void lparR_cork(lparR_route *r);
void lparR_uncork(lparR_route *r);
int lparR_is_corked(const lparR_route *r);

/* Read and dispatch what is in the socket now: a dead peer's last words. */
void lparR_drain(lparR_route *r);
/* Close: nothing more is read or written; on_close follows from the loop. */
void lparR_close(lparR_route *r, const char *reason);

/* Start a timer: a peer not authenticated within `ms` is cut off (refused). */
void lparR_set_auth_timeout(lparR_route *r, uint64_t ms);

/* Both hellos are in: frames are sealed as they are sent. */
int lparR_session_started(const lparR_route *r);
int lparR_passes_fds(const lparR_route *r);
/* "AES-256-GCM", "XChaCha20-Poly1305", or "none" (engines, or before the hello). */
const char *lparR_cipher(const lparR_route *r);
/* Why the route closed, once lparR_close or the peer closed it (its on_close
   comes from the loop later); NULL while it is open. */
const char *lparR_close_reason(const lparR_route *r);

/* Ignore SIGPIPE unless the host handles it: a dead peer is a failed write. */
void lparR_ignore_sigpipe(void);

#endif
