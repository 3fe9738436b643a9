/*
** link.h: routes over sockets that others could reach, a standalone
** controller's unix socket and TCP: listening and connecting (internal,
** prefix lparL_). Every link is a sealed route (route.h, auth.h).
**
** A server caps the connections that have not authenticated yet, in all
** (LPARL_MAX_STRANGERS) and, on TCP, per source address (IPv4 address or
** IPv6 /64, LPARL_MAX_STRANGERS_PER_SOURCE): past a cap, the oldest of that
** source (or of the source holding most) is cut off to make room, so idle
** strangers cannot keep a real client out and one source cannot take every
** place. The unix socket has the total cap only: it is mode 0600 in a 0700
** directory, so its every peer is the cluster's own user (or root), the
** same source as the real client, and a per-uid cap would equal the total.
** It cuts off a peer whose first frame has not opened within its auth
** timeout, so strangers cannot hold connections open.
**
** Out of descriptors (accept fails with EMFILE or ENFILE), it cuts off a
** stranger to make room; with none, it takes the connection with a spare
** descriptor held back for this and writes the client a notice saying so
** (route.h, LPARR_NOTICE_MAGIC) instead of leaving it unanswered; with not
** even that, it pauses accepting for LPARL_RETRY_MS rather than spin.
*/
#ifndef LPAR_LINK_H
#define LPAR_LINK_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "route.h"

#define LPARL_AUTH_TIMEOUT_MS 10000 /* a peer silent this long after connecting is cut off */
#define LPARL_MAX_STRANGERS 64      /* connections not yet authenticated, at most */
#define LPARL_MAX_STRANGERS_PER_SOURCE 16 /* of them from one TCP source */
#define LPARL_RETRY_MS 100          /* accepting paused this long when nothing can be taken */

typedef struct lparL_server lparL_server;

/* A new connection, before anything is read from it: set its handlers here. */
typedef void (*lparL_accept_cb)(lparL_server *s, lparR_route *r, void *ud);

/*
** Listen on a unix socket at `path` (made mode 0600), or on TCP when `path`
** is NULL (`ip`, `port`; port 0 picks one). 0, or a negative code with `err`
** filled.
*/
int lparL_listen(uv_loop_t *loop, const char *path, const char *ip, int port,
                 const unsigned char key[LPARA_KEY_BYTES], lparL_accept_cb on_accept, void *ud,
                 lparL_server **out, char *err, size_t errlen);
/* The TCP port listened on (0 for a unix socket). */
int lparL_server_port(const lparL_server *s);
/* Frames refused (and peers timed out), and peers cut off for it. */
uint64_t lparL_server_refused(const lparL_server *s);
uint64_t lparL_server_disconnected(const lparL_server *s);
/* Connections answered "out of file descriptors" and closed. */
uint64_t lparL_server_no_fds(const lparL_server *s);
/* Stop listening; the server is freed once its last connection is. */
void lparL_server_close(lparL_server *s);

/*
** Connect to a controller: at a unix socket `path`, or over TCP at `host`
** (a numeric IPv4 or IPv6 address, or "localhost") and `port`. The route
** comes back at once and frames may be sent on it; a TCP connection is
** made in the background, and a failure closes the route with the reason.
** Never blocks. 0, or a negative code with `err` filled.
*/
int lparL_connect(uv_loop_t *loop, const char *path, const char *host, int port,
                  const unsigned char key[LPARA_KEY_BYTES], const lparR_handlers *handlers,
                  void *ud, lparR_route **out, char *err, size_t errlen);

#endif
