/*
** link.h: authenticated connections to a standalone controller (internal,
** prefix lparL_).
**
** A link is a stream socket (unix or TCP) carrying routed frames (wire.h),
** each followed by an authentication trailer (auth.h). When a link opens,
** each side sends 16 random bytes, its half of the session; every frame
** after that is signed for this session only.
**
** A frame that fails (a malformed header, a bad MAC, a replayed sequence
** number) is dropped and counted, and the peer is disconnected: nothing it
** sent after that is read. Until a peer's first frame passes, frames are
** limited to LPARL_UNAUTHENTICATED_MAX bytes, so a stranger cannot make the
** controller buffer a gigabyte before it is checked; and a peer whose first
** frame has not passed within LPARL_AUTH_TIMEOUT_MS is cut off, so strangers
** cannot hold connections open.
*/
#ifndef LPAR_LINK_H
#define LPAR_LINK_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "auth.h"
#include "wire.h"

#define LPARL_UNAUTHENTICATED_MAX 65536
#define LPARL_MAX_ROUTE 0xffff
#define LPARL_AUTH_TIMEOUT_MS 10000 /* a peer silent this long after connecting is cut off */

typedef struct lparL_link lparL_link;
typedef struct lparL_server lparL_server;

typedef struct lparL_handlers {
  /* One authenticated frame; the payload is valid during the call only. */
  void (*on_frame)(lparL_link *l, const lparW_header *h, const char *payload, void *ud);
  /*
  ** The link closed: `reason` says why (the peer hung up, or what it sent
  ** that was refused; `refused` is 1 then). The link is freed after this
  ** returns; do not use it again.
  */
  void (*on_close)(lparL_link *l, const char *reason, int refused, void *ud);
} lparL_handlers;

typedef void (*lparL_accept_cb)(lparL_server *s, lparL_link *l, void *ud);

/*
** Listen on a unix socket at `path` (made mode 0600), or on TCP when `path`
** is NULL (`ip`, `port`; port 0 picks one). Each new connection is handed to
** `on_accept` before anything is read from it; give it handlers with
** lparL_set_handlers there. 0, or a negative code with `err` filled.
*/
int lparL_listen(uv_loop_t *loop, const char *path, const char *ip, int port,
                 const unsigned char key[LPARA_KEY_BYTES], lparL_accept_cb on_accept, void *ud,
                 lparL_server **out, char *err, size_t errlen);
/* How long a new peer has to authenticate (default LPARL_AUTH_TIMEOUT_MS). */
void lparL_server_set_auth_timeout(lparL_server *s, int ms);
/* The TCP port listened on (0 for a unix socket). */
int lparL_server_port(const lparL_server *s);
/* Frames refused and peers disconnected for it, since the server started. */
uint64_t lparL_server_refused(const lparL_server *s);
uint64_t lparL_server_disconnected(const lparL_server *s);
/* Stop listening (open links stay) and free the server once closed: read its
** counts before. */
void lparL_server_close(lparL_server *s);

/*
** Connect to a controller: at a unix socket `path`, or at `host`:`port` over
** TCP when `path` is NULL. The connection and the exchange of nonces are
** made before this returns (a few seconds at most).
*/
int lparL_connect(uv_loop_t *loop, const char *path, const char *host, int port,
                  const unsigned char key[LPARA_KEY_BYTES], const lparL_handlers *handlers,
                  void *ud, lparL_link **out, char *err, size_t errlen);

void lparL_set_handlers(lparL_link *l, const lparL_handlers *handlers, void *ud);

/* Sign and send one frame; the payload is copied. */
int lparL_send(lparL_link *l, int type, unsigned flags, unsigned route, uint64_t id,
               const void *payload, size_t len);
/*
** The bytes lparL_send would write (frame and trailer, consuming a sequence
** number), appended to `out` instead: with lparL_send_raw, how tests make
** altered and replayed messages.
*/
int lparL_sign(lparL_link *l, int type, unsigned flags, unsigned route, uint64_t id,
               const void *payload, size_t len, lparB_buffer *out);
/* Send bytes as they are, no framing or signature: for tests of forged input. */
int lparL_send_raw(lparL_link *l, const void *bytes, size_t len);

/* Close the link; on_close follows from the loop with reason "closed". */
void lparL_close(lparL_link *l);

/* Ignore SIGPIPE unless the host handles it (listen and connect call this). */
void lparL_ignore_sigpipe(void);

/* Frames this link refused (0 or 1: a refusal disconnects). */
uint64_t lparL_refused(const lparL_link *l);

#endif
