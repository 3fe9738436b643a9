/*
** link.h: routes over sockets that others could reach, a standalone
** controller's unix socket and TCP: listening and connecting (internal,
** prefix lparL_). Every link is a sealed route (route.h, auth.h).
**
** A server caps the connections that have not authenticated yet
** (LPARL_MAX_STRANGERS; past it, the oldest is cut off to make room, so
** idle strangers cannot keep a real client out) and cuts off a peer whose
** first frame has not opened within its auth timeout, so strangers cannot
** starve real clients or hold connections open.
*/
#ifndef LPAR_LINK_H
#define LPAR_LINK_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "route.h"

#define LPARL_AUTH_TIMEOUT_MS 10000 /* a peer silent this long after connecting is cut off */
#define LPARL_MAX_STRANGERS 64      /* connections not yet authenticated, at most */

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
