/*
** relay.h: a standalone controller's data plane (internal, prefix lparY_).
**
** The relay owns the controller's local engines, listens for clients (and
** for engines that join from elsewhere) and moves every message between
** them in C: a request goes to its engine under an id of the relay's own,
** serial << 40 | the client's id, so replies find their client with no
** table and several clients never collide; a reply goes back to the client
** under its own id again; descriptors (memfds of matrices) pass through
** untouched, so nothing bulk is copied or hashed here. The controller's
** control operations (connect, status, restart, shutdown, join) stay in
** Lua: CONTROL frames reach it as events, and it answers with lparY_answer.
**
** A request for several engines comes once, with a route list
** (LPAR_FLAG_ROUTES, wire.h): each local engine gets its own frame, and
** the engines behind each host's relay one frame for that host, so a push
** to many engines crosses each host's link once.
**
** Engines behind links that cannot carry descriptors (TCP clients, engines
** joined over a link) get their matrices inline: requests from a TCP client
** are flagged LPAR_FLAG_INLINE so the engine answers inline, and clients are
** told, by the same flag on the engine's HELLO, to send a joined engine its
** matrices inline.
**
** A load-balanced request (for LPAR_ANY_ENGINE + depth) is scheduled here,
** with every client's: it waits in its client's queue for an engine with
** room, clients sharing the engines' time, and the client learns its
** engine from PLACED.
*/
#ifndef LPAR_RELAY_H
#define LPAR_RELAY_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "lpar.h"

#define LPARY_MAX_ENGINES 4096

typedef struct lparY_relay lparY_relay;

typedef enum lparY_event_kind {
  LPARY_ENGINE_READY = 1, /* engine `engine` said hello */
  LPARY_ENGINE_EXIT = 2,  /* engine `engine` ended: status, signal */
  LPARY_CONTROL = 3,      /* peer `peer` sent a CONTROL frame: id, payload */
  LPARY_PEER_CLOSED = 4   /* peer `peer` is gone: reason, refused */
} lparY_event_kind;

typedef struct lparY_event {
  lparY_event_kind kind;
  int engine;
  uint32_t peer;
  uint64_t id;
  const char *payload;
  size_t len;
  int status, signal;
  const char *reason;
  int refused;
} lparY_event;

typedef void (*lparY_event_cb)(lparY_relay *y, const lparY_event *ev, void *ud);

typedef struct lparY_config {
  const char *socket; /* the unix socket to listen on */
  const char *ip;     /* and TCP, when ip is set (port 0 picks one) */
  int port;
  unsigned char key[32];
  lpar_config engines; /* how local engines start (its on_event is the relay's) */
  lparY_event_cb on_event;
  void *ud;
} lparY_config;

typedef enum lparY_engine_state {
  LPARY_NONE = 0,
  LPARY_STARTING = 1,
  LPARY_READY = 2,
  LPARY_DEAD = 3
} lparY_engine_state;

typedef struct lparY_engine_info {
  lparY_engine_state state;
  int joined; /* behind a link, not a child of the controller */
  int pid;
  int status, signal; /* how it ended (DEAD) */
  uint64_t in_flight; /* requests sent, not answered */
  int64_t silent_ms;  /* since a local engine last sent a frame; -1 when not known */
  int heartbeat_ms;   /* a local engine's heartbeat period (0: it sends none) */
  uint64_t link_sent; /* joined: bytes sent so far on its host's link (all its engines') */
} lparY_engine_info;

typedef struct lparY_stats {
  uint64_t refused, disconnected; /* frames refused, peers cut off for it */
  uint64_t no_fds;                /* connections turned away: out of file descriptors */
  uint64_t bad_messages;          /* malformed or misdirected frames dropped */
  uint64_t waiting;                /* load-balanced requests waiting for an engine with room */
  int clients;
  int engines; /* highest engine id + 1 */
} lparY_stats;

/* Listen and get ready; no engine yet. 0, or a negative code with err filled. */
int lparY_new(uv_loop_t *loop, const lparY_config *cfg, lparY_relay **out, char *err,
              size_t errlen);
/* Start local engine `id` of `n` (again, if it is dead). err says why not. */
int lparY_spawn(lparY_relay *y, int id, int n, char *err, size_t errlen);
int lparY_signal(lparY_relay *y, int engine, int sig);
/*
** Peer `peer` is from now on the relay of `count` engines on host `host`
** (a name for messages), engines first .. first + count - 1: the route field
** on its link names one of them by its index, 0 .. count - 1, both ways.
** Its link gets heartbeats (LPAR_MSG_PING) and is closed when silent, its
** engines then ending with a reason naming the host. LPAR_EINVAL when the
** peer is not a client or one of the ids is taken.
*/
int lparY_join(lparY_relay *y, uint32_t peer, int first, int count, const char *host);
/* A CONTROL frame to a peer: the answer to its request `id`. */
int lparY_answer(lparY_relay *y, uint32_t peer, uint64_t id, const void *payload, size_t len);
int lparY_engine(const lparY_relay *y, int engine, lparY_engine_info *out);
void lparY_get_stats(const lparY_relay *y, lparY_stats *out);
int lparY_port(const lparY_relay *y);
/* Stop listening, close every peer, stop the engines; freed from the loop. */
void lparY_free(lparY_relay *y);

#endif
