/*
** relay.c: a standalone controller's data plane (see relay.h).
*/
#include "relay.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sodium.h>

#include "link.h"
#include "route.h"
#include "wire.h"

#define CID_BITS 40
#define CID_MASK ((UINT64_C(1) << CID_BITS) - 1)
#define SERIAL_MAX 0xffffffu /* serials fill the id's top 24 bits */
/* Load-balanced requests one client may have waiting here at once. */
#define MAX_WAITING (1 << 16)

typedef enum peer_kind { PEER_CLIENT = 1, PEER_ENGINE = 2 } peer_kind;

/* A load-balanced request waiting for an engine with room, in its client's queue. */
typedef struct waiting {
  struct waiting *next;
  uint64_t id; /* the client's */
  int type;
  unsigned flags;
  unsigned depth; /* it goes to an engine holding fewer requests than this */
  int nfds;
  int *fds;       /* ours: closed once it is sent or dropped */
  size_t len;
  char *payload;  /* fds and payload follow the struct, in its allocation */
} waiting;

typedef struct peer {
  lparY_relay *y;
  lparR_route *route; /* NULL once closed */
  uint32_t serial;
  peer_kind kind;
  int first, count; /* PEER_ENGINE: the engines it relays, first .. first + count - 1 */
  int passes_fds;
  uint64_t heard;   /* PEER_ENGINE: loop time (ms) of its last frame */
  char host[64];    /* PEER_ENGINE: its host, for messages */
  waiting *first_waiting, *last_waiting; /* PEER_CLIENT: its balanced requests not yet sent */
  size_t nwaiting;
  /* PEER_CLIENT, for fair turns: engine seconds its requests took, how long
  ** one takes (a moving mean), and how many are on engines now. */
  double served, per_request;
  uint64_t outstanding;
} peer;

typedef struct yengine {
  lparY_engine_state state;
  int joined;
  peer *via; /* joined: the peer relaying it */
  int index; /* joined: its route field on that peer's link */
  int pid;
  int status, signal;
  char why[112]; /* DEAD and joined: what its host's relay or link said */
  uint64_t in_flight;
  uint64_t last_given; /* the relay's tick when it last got a balanced request */
  int refusing;        /* a send to it failed: its end is on the way */
  char hello[128];
  size_t hello_len;
} yengine;

struct lparY_relay {
  uv_loop_t *loop;
  lpar_cluster *local;
  lparL_server *servers[2];
  int nservers;
  yengine *engines;
  int nengines;
  peer **peers;
  int npeers, cap_peers;
  uint32_t next_serial;
  uint64_t bad_messages;
  size_t nwaiting; /* balanced requests waiting, all clients' */
  int turn;        /* where the next look for a client to serve starts (ties go in turn) */
  uint64_t tick;
  int placing;
  uv_timer_t recheck; /* looks again while requests wait and silent engines were passed over */
  uv_timer_t heartbeat; /* runs while engines are joined */
  int open_timers;
  int heartbeat_on;
  int stopping;
  lparY_event_cb on_event;
  void *ud;
};

static void emit(lparY_relay *y, lparY_event *ev) {
  if (y->on_event && !y->stopping) y->on_event(y, ev, y->ud);
}

static peer *find_peer(const lparY_relay *y, uint32_t serial) {
  for (int i = 0; i < y->npeers; i++)
    if (y->peers[i]->serial == serial) return y->peers[i];
  return NULL;
}

static yengine *engine_slot(lparY_relay *y, int id) {
  if (id < 0 || id >= LPARY_MAX_ENGINES) return NULL;
  if (id >= y->nengines) {
    int n = y->nengines ? y->nengines : 16;
    while (n <= id) n *= 2;
    yengine *e = realloc(y->engines, (size_t)n * sizeof *e);
    if (e == NULL) return NULL;
    memset(e + y->nengines, 0, (size_t)(n - y->nengines) * sizeof *e);
    y->engines = e;
    y->nengines = n;
  }
  return &y->engines[id];
}

static yengine *known_engine(const lparY_relay *y, int id) {
  return id >= 0 && id < y->nengines && y->engines[id].state != LPARY_NONE ? &y->engines[id] : NULL;
}

static void place_waiting(lparY_relay *y);
static void on_recheck(uv_timer_t *t);

/*
** A reply ended one of p's requests: what it cost the engine, from the
** stamps that lead a RESULT's or ERROR's payload (started, completed:
** doubles, CLOCK_REALTIME); a text-mode answer has none and costs nothing.
*/
static void charge(peer *p, const lparW_header *h, const char *payload) {
  if (p->outstanding > 0) p->outstanding--;
  double stamps[2];
  if ((h->flags & LPAR_FLAG_RAW) || h->len < sizeof stamps) return;
  memcpy(stamps, payload, sizeof stamps);
  double took = stamps[1] - stamps[0];
  if (!(took >= 0 && took < 1e6)) return; /* not a duration: a forged or skewed stamp */
  p->served += took;
  p->per_request = p->per_request > 0 ? 0.8 * p->per_request + 0.2 * took : took;
}

/* What p's requests have cost the engines, counting those on engines now at the mean. */
static double service(const peer *p) { return p->served + (double)p->outstanding * p->per_request; }

/* ---- telling clients of engines ---- */

static void send_state(peer *p, int id, const yengine *e) {
  if (p->route == NULL || p->kind != PEER_CLIENT) return;
  if (e->state == LPARY_READY) {
    unsigned flags = LPAR_FLAG_RAW | (e->joined ? LPAR_FLAG_INLINE : 0);
    lparR_send(p->route, LPAR_MSG_HELLO, flags, (unsigned)id, 0, e->hello, e->hello_len, NULL, 0);
  } else if (e->state == LPARY_DEAD) {
    char text[160];
    int n = snprintf(text, sizeof text, e->why[0] ? "%d %d %s" : "%d %d", e->status, e->signal,
                     e->why);
    lparR_send(p->route, LPAR_MSG_EXIT, LPAR_FLAG_RAW, (unsigned)id, 0, text, (size_t)n, NULL, 0);
  }
}

static void tell_clients(lparY_relay *y, int id) {
  for (int i = 0; i < y->npeers; i++) send_state(y->peers[i], id, &y->engines[id]);
}

static void engine_ready(lparY_relay *y, int id, const char *hello, size_t len, int pid) {
  yengine *e = engine_slot(y, id);
  if (e == NULL) return;
  e->state = LPARY_READY;
  e->refusing = 0;
  e->pid = pid;
  e->hello_len = len < sizeof e->hello ? len : sizeof e->hello;
  memcpy(e->hello, hello, e->hello_len);
  tell_clients(y, id);
  lparY_event ev = {.kind = LPARY_ENGINE_READY, .engine = id};
  emit(y, &ev);
  place_waiting(y);
}

static void engine_exit(lparY_relay *y, int id, int status, int signal, const char *why) {
  yengine *e = known_engine(y, id);
  if (e == NULL || e->state == LPARY_DEAD) return;
  e->state = LPARY_DEAD;
  e->status = status;
  e->signal = signal;
  snprintf(e->why, sizeof e->why, "%s", why ? why : "");
  e->in_flight = 0;
  e->via = NULL;
  /* Its requests will not end with a reply: no client counts more on engines than there are. */
  uint64_t on_engines = 0;
  for (int i = 0; i < y->nengines; i++) on_engines += y->engines[i].in_flight;
  for (int i = 0; i < y->npeers; i++)
    if (y->peers[i]->outstanding > on_engines) y->peers[i]->outstanding = on_engines;
  tell_clients(y, id);
  lparY_event ev = {.kind = LPARY_ENGINE_EXIT, .engine = id, .status = status, .signal = signal};
  emit(y, &ev);
}

/* ---- replies: engine -> client ---- */

static int is_reply(int type) {
  return (type >= LPAR_MSG_RESULT && type <= LPAR_MSG_DISPLAY) || type == LPAR_MSG_STARTED;
}

static void reply(lparY_relay *y, int id, const lparW_header *h, const char *payload, int *fds,
                  int nfds) {
  yengine *e = known_engine(y, id);
  if (e == NULL) return;
  int ended = h->type == LPAR_MSG_RESULT || h->type == LPAR_MSG_ERROR;
  if (ended && e->in_flight > 0) e->in_flight--;
  peer *p = find_peer(y, (uint32_t)(h->id >> CID_BITS));
  if (ended && p != NULL) charge(p, h, payload);
  if (p != NULL && p->route != NULL) { /* else its client left: the task ran all the same */
    unsigned flags = h->flags & ~(unsigned)(LPAR_FLAG_ROUTES | LPAR_FLAG_SHM);
    lparR_send(p->route, h->type, flags, (unsigned)id, h->id & CID_MASK, payload, (size_t)h->len,
               fds, p->passes_fds ? nfds : 0);
  }
  if (ended) place_waiting(y); /* the engine has room again */
}

static void on_local_event(lpar_cluster *c, const lpar_event *ev, void *ud) {
  (void)c;
  lparY_relay *y = ud;
  switch (ev->kind) {
  case LPAR_EV_READY: engine_ready(y, ev->engine, ev->payload, ev->len, ev->pid); break;
  case LPAR_EV_EXIT: engine_exit(y, ev->engine, ev->exit_status, ev->term_signal, NULL); break;
  case LPAR_EV_BAD_MESSAGE: y->bad_messages++; break;
  case LPAR_EV_MESSAGE: {
    if (!is_reply(ev->type)) {
      y->bad_messages++;
      return;
    }
    lparW_header h = {.type = ev->type, .flags = ev->flags, .id = ev->id, .len = ev->len};
    reply(y, ev->engine, &h, ev->payload, ev->fds, ev->nfds);
    break;
  }
  default: break;
  }
}

/* ---- requests: client -> engine ---- */

static void refuse_request(peer *p, int id, const yengine *e) {
  yengine gone = {.state = LPARY_DEAD, .status = -1};
  send_state(p, id, e && e->state == LPARY_DEAD ? e : &gone);
}

/* A request's flags as they go on: what only lpar sets is cleared. */
static unsigned request_flags(const peer *p, const lparW_header *h) {
  unsigned flags = h->flags & ~(unsigned)(LPAR_FLAG_FDS | LPAR_FLAG_ROUTES | LPAR_FLAG_SHM);
  return p->passes_fds ? flags : flags | LPAR_FLAG_INLINE;
}

/* Send a client's request on to ready engine `id`, under the relay's id `gid`. */
static int forward(lparY_relay *y, int id, yengine *e, int type, unsigned flags, uint64_t gid,
                   const char *payload, size_t len, const int *fds, int nfds) {
  int rc;
  if (e->joined) {
    /* Its link is read by a relay that sends matrices inline. */
    rc = e->via && e->via->route ? lparR_send(e->via->route, type, flags | LPAR_FLAG_INLINE,
                                              (unsigned)e->index, gid, payload, len, NULL, 0)
                                 : LPAR_EDEAD;
  } else {
    rc = lpar_cluster_send_fds(y->local, id, type, flags, gid, payload, len, fds, nfds);
  }
  if (rc == LPAR_OK) e->in_flight++;
  return rc;
}

static void request(lparY_relay *y, peer *p, const lparW_header *h, const char *payload, int *fds,
                    int nfds) {
  int id = (int)h->route;
  yengine *e = known_engine(y, id);
  if (e == NULL || e->state != LPARY_READY || h->id > CID_MASK) {
    if (h->id > CID_MASK) y->bad_messages++;
    refuse_request(p, id, e); /* the client thought it was up: tell it how it ended */
    return;
  }
  uint64_t gid = (uint64_t)p->serial << CID_BITS | h->id;
  int rc = forward(y, id, e, h->type, request_flags(p, h), gid, payload, (size_t)h->len, fds, nfds);
  if (rc == LPAR_OK) p->outstanding++;
  /* A dying engine: its socket closed before its exit was seen. Its EXIT,
  ** with the real status and signal, follows and fails the request. */
  if (rc < 0 && !(rc == LPAR_EDEAD && e->state == LPARY_READY)) refuse_request(p, id, e);
}

/* ---- load-balanced requests: scheduled here, for every client at once ---- */

/*
** A request for LPAR_ANY_ENGINE + depth waits in its client's queue until
** some ready engine holds fewer than `depth` requests (counting every
** client's, load-balanced or not); then it goes to the least loaded of
** them (the one given a balanced request longest ago, on a tie), and its
** client is told where with PLACED. Clients share the engines' time (see
** place_waiting), so two clients mapping at once each get half of it,
** however many requests each has waiting and however big. A request
** carrying descriptors goes only to a local engine.
*/

/* Is local engine `id` silent past its heartbeats (stopped, or wedged in a C call)? */
static int silent(const lparY_relay *y, int id) {
  int beat = lpar_cluster_heartbeat_ms(y->local, id);
  int64_t limit = (int64_t)LPAR_NOT_RESPONDING_BEATS * beat;
  return beat > 0 && lpar_cluster_silence_ms(y->local, id) > limit;
}

/*
** The engine a request of `depth` (with descriptors or not) may go to now,
** or -1; *passed is set when a silent engine with room was passed over.
*/
static int least_loaded(const lparY_relay *y, unsigned depth, int has_fds, int *passed) {
  int best = -1;
  for (int id = 0; id < y->nengines; id++) {
    const yengine *e = &y->engines[id];
    if (e->state != LPARY_READY || e->refusing || e->in_flight >= depth) continue;
    if (e->joined && (has_fds || e->via == NULL || e->via->route == NULL)) continue;
    const yengine *b = best >= 0 ? &y->engines[best] : NULL;
    if (b != NULL && (e->in_flight > b->in_flight ||
                      (e->in_flight == b->in_flight && e->last_given >= b->last_given)))
      continue;
    /* Its silence is asked only of an engine that would be chosen: it reads the clock. */
    if (!e->joined && silent(y, id)) {
      *passed = 1;
      continue;
    }
    best = id;
  }
  return best;
}

static void free_waiting(waiting *w) {
  for (int i = 0; i < w->nfds; i++) close(w->fds[i]);
  free(w);
}

/* Tell the client where its request `id` went (LPAR_ANY_ENGINE: nowhere, withdrawn). */
static void tell_placed(peer *p, unsigned engine, uint64_t id) {
  if (p->route) lparR_send(p->route, LPAR_MSG_PLACED, LPAR_FLAG_RAW, engine, id, "", 0, NULL, 0);
}

/* Send p's first waiting request to an engine with room: 1, or 0 when none has. */
static int place_one(lparY_relay *y, peer *p, int *passed) {
  waiting *w = p->first_waiting;
  uint64_t gid = (uint64_t)p->serial << CID_BITS | w->id;
  for (int id; (id = least_loaded(y, w->depth, w->nfds > 0, passed)) >= 0;) {
    yengine *e = &y->engines[id];
    if (forward(y, id, e, w->type, w->flags, gid, w->payload, w->len, w->fds, w->nfds) < 0) {
      /* Dying (its EXIT follows) or unable to take it: left out until it says hello again. */
      e->refusing = 1;
      continue;
    }
    e->last_given = ++y->tick;
    p->outstanding++;
    p->first_waiting = w->next;
    if (p->first_waiting == NULL) p->last_waiting = NULL;
    p->nwaiting--;
    y->nwaiting--;
    tell_placed(p, (unsigned)id, w->id);
    free_waiting(w);
    return 1;
  }
  return 0;
}

/* The client with requests waiting whose requests have cost the engines least, or -1. */
static int next_client(const lparY_relay *y) {
  int best = -1;
  for (int k = 0; k < y->npeers; k++) {
    int i = (y->turn + k) % y->npeers;
    const peer *p = y->peers[i];
    if (p->first_waiting != NULL && (best < 0 || service(p) < service(y->peers[best]))) best = i;
  }
  return best;
}

/*
** Give engines with room the waiting requests: first those of the client
** whose requests have cost the engines least, so clients share the engines'
** time, not their number of requests (a batch of 64 tiny tasks is one
** request). A client whose first request finds no room keeps its place:
** the next engine to free is its, so a request that needs an idle engine
** (depth 1) is not passed over for ever by others that take less.
*/
static void place_waiting(lparY_relay *y) {
  if (y->placing || y->stopping) return;
  y->placing = 1; /* a failed send may close a route, whose handler comes back here */
  int passed = 0;
  for (int i; y->nwaiting > 0 && (i = next_client(y)) >= 0;) {
    if (!place_one(y, y->peers[i], &passed)) break;
    y->turn = i + 1;
  }
  /* A silent engine that speaks again sends no reply to wake us: look again soon. */
  if (y->nwaiting > 0 && passed && !uv_is_active((uv_handle_t *)&y->recheck))
    uv_timer_start(&y->recheck, on_recheck, 2 * LPAR_HEARTBEAT_MS, 0);
  y->placing = 0;
}

static void on_recheck(uv_timer_t *t) { place_waiting(t->data); }

/*
** A client that starts waiting again starts level with those waiting now:
** what it did not use while it had nothing to run is not a credit to
** spend on them later.
*/
static void catch_up(const lparY_relay *y, peer *p) {
  int first = 1;
  double least = 0;
  for (int i = 0; i < y->npeers; i++) {
    const peer *q = y->peers[i];
    if (q == p || q->first_waiting == NULL) continue;
    if (first || service(q) < least) least = service(q);
    first = 0;
  }
  if (!first && service(p) < least) p->served += least - service(p);
}

/* A client's request for any engine: into its queue, then placed if an engine has room. */
static void request_any(lparY_relay *y, peer *p, const lparW_header *h, const char *payload,
                        int *fds, int nfds) {
  if (h->id > CID_MASK) {
    y->bad_messages++;
    return;
  }
  if (p->nwaiting >= MAX_WAITING) {
    char why[96];
    snprintf(why, sizeof why, "the client had more than %d load-balanced requests waiting",
             MAX_WAITING);
    lparR_close(p->route, why);
    return;
  }
  waiting *w = malloc(sizeof *w + sizeof(int) * (size_t)nfds + (size_t)h->len);
  if (w == NULL) {
    lparR_close(p->route, "the controller is out of memory");
    return;
  }
  unsigned depth = h->route - LPAR_ANY_ENGINE;
  *w = (waiting){.id = h->id, .type = h->type, .flags = request_flags(p, h),
                 .depth = depth ? depth : 1, .nfds = nfds, .fds = (int *)(w + 1),
                 .len = (size_t)h->len};
  for (int i = 0; i < nfds; i++) {
    w->fds[i] = fds[i];
    fds[i] = -1; /* kept: the route closes the others after this callback */
  }
  w->payload = (char *)(w->fds + nfds);
  memcpy(w->payload, payload, (size_t)h->len);
  if (p->nwaiting == 0) catch_up(y, p);
  if (p->last_waiting)
    p->last_waiting->next = w;
  else
    p->first_waiting = w;
  p->last_waiting = w;
  p->nwaiting++;
  y->nwaiting++;
  place_waiting(y);
}

/* The client takes back its request `id` if it still waits here (PLACED says so). */
static void withdraw(lparY_relay *y, peer *p, uint64_t id) {
  for (waiting **at = &p->first_waiting, *prev = NULL; *at; prev = *at, at = &(*at)->next) {
    waiting *w = *at;
    if (w->id != id) continue;
    *at = w->next;
    if (p->last_waiting == w) p->last_waiting = prev;
    p->nwaiting--;
    y->nwaiting--;
    free_waiting(w);
    tell_placed(p, LPAR_ANY_ENGINE, id);
    return;
  }
}

static void drop_waiting(lparY_relay *y, peer *p) {
  while (p->first_waiting) {
    waiting *w = p->first_waiting;
    p->first_waiting = w->next;
    free_waiting(w);
    y->nwaiting--;
  }
  p->last_waiting = NULL;
  p->nwaiting = 0;
}

/*
** The entries of a client's route list that go to engines behind the same
** host's relay as entry `at` (joined engines, ready), from `at` on: into
** `sub` as that host's route list (its engines' indices), marked done.
** How many.
*/
static size_t host_entries(lparY_relay *y, const lparW_fanout *f, size_t at, const peer *via,
                           char *done, char *sub) {
  size_t k = 0;
  for (size_t j = at; j < f->n; j++) {
    unsigned route, offset;
    if (done[j]) continue;
    lparW_fanout_get(f, j, &route, &offset);
    yengine *e = known_engine(y, (int)route);
    if (e == NULL || e->state != LPARY_READY || !e->joined || e->via != via) continue;
    lparW_fanout_put(sub, k++, (unsigned)e->index, offset);
    e->in_flight++;
    done[j] = 1;
  }
  lparW_fanout_count(sub, k);
  return k;
}

/*
** One request for several engines (LPAR_FLAG_ROUTES): each local engine
** gets its own frame, sharing the descriptors; the engines behind each
** host's relay get one frame for that host, with their route list, so the
** payload crosses each host's link once. Entry i answers under the
** client's id + its offset, as a request of its own would.
*/
static void request_many(lparY_relay *y, peer *p, const lparW_header *h, const char *payload,
                         int *fds, int nfds) {
  lparW_fanout f;
  const char *why;
  if (lparW_fanout_parse(payload, h->len, &f, &why) < 0 || h->id > CID_MASK - 0xffff) {
    y->bad_messages++; /* a sound header with a malformed list: only it is dropped */
    return;
  }
  char *done = calloc(f.n, 1), *sub = malloc(lparW_fanout_bytes(f.n));
  if (done == NULL || sub == NULL) {
    free(done);
    free(sub);
    for (size_t i = 0; i < f.n; i++) {
      unsigned route, offset;
      lparW_fanout_get(&f, i, &route, &offset);
      refuse_request(p, (int)route, known_engine(y, (int)route));
    }
    return;
  }
  uint64_t gid = (uint64_t)p->serial << CID_BITS | h->id;
  unsigned flags = request_flags(p, h);
  for (size_t i = 0; i < f.n; i++) {
    if (done[i]) continue;
    unsigned route, offset;
    lparW_fanout_get(&f, i, &route, &offset);
    int id = (int)route;
    yengine *e = known_engine(y, id);
    if (e == NULL || e->state != LPARY_READY) {
      done[i] = 1;
      refuse_request(p, id, e); /* the client thought it was up: tell it how it ended */
      continue;
    }
    if (!e->joined) {
      done[i] = 1;
      int rc = lpar_cluster_send_fds(y->local, id, h->type, flags, gid + offset, f.body, f.body_len,
                                     fds, nfds);
      if (rc == LPAR_OK) {
        e->in_flight++;
        p->outstanding++;
      } else if (!(rc == LPAR_EDEAD && e->state == LPARY_READY)) { /* else its EXIT follows */
        refuse_request(p, id, e);
      }
      continue;
    }
    peer *via = e->via;
    if (via == NULL || via->route == NULL) continue; /* its link is closing: its EXIT follows */
    size_t k = host_entries(y, &f, i, via, done, sub);
    p->outstanding += k;
    /* Its link is read by a relay that sends matrices inline. A failed send
    ** closes the link, and the host's engines end with the reason. */
    lparR_send2(via->route, h->type, flags | LPAR_FLAG_INLINE | LPAR_FLAG_ROUTES, 0, gid, sub,
                lparW_fanout_bytes(k), f.body, f.body_len, NULL, 0);
  }
  free(done);
  free(sub);
}

static void interrupt(lparY_relay *y, peer *p, const lparW_header *h) {
  if (h->route >= LPAR_ANY_ENGINE) {
    withdraw(y, p, h->id);
    return;
  }
  yengine *e = known_engine(y, (int)h->route);
  if (e == NULL || e->state != LPARY_READY || h->id > CID_MASK) return;
  uint64_t gid = (uint64_t)p->serial << CID_BITS | h->id;
  if (e->joined) {
    if (e->via && e->via->route)
      lparR_send(e->via->route, LPAR_MSG_INTERRUPT, LPAR_FLAG_RAW, (unsigned)e->index, gid, "", 0,
                 NULL, 0);
  } else {
    lpar_cluster_interrupt(y->local, (int)h->route, gid);
  }
}

static void client_frame(lparY_relay *y, peer *p, const lparW_header *h, const char *payload,
                         int *fds, int nfds) {
  switch (h->type) {
  case LPAR_MSG_EXECUTE:
  case LPAR_MSG_APPLY:
  case LPAR_MSG_PUSH:
  case LPAR_MSG_PULL:
    if (h->flags & LPAR_FLAG_ROUTES)
      request_many(y, p, h, payload, fds, nfds);
    else if (h->route >= LPAR_ANY_ENGINE)
      request_any(y, p, h, payload, fds, nfds);
    else
      request(y, p, h, payload, fds, nfds);
    break;
  case LPAR_MSG_INTERRUPT: interrupt(y, p, h); break;
  case LPAR_MSG_SIGNAL: {
    char text[16];
    size_t n = h->len < sizeof text - 1 ? (size_t)h->len : sizeof text - 1;
    memcpy(text, payload, n);
    text[n] = 0;
    if (lparY_signal(y, (int)h->route, atoi(text)) < 0) refuse_request(p, (int)h->route,
                                                                       known_engine(y, (int)h->route));
    break;
  }
  case LPAR_MSG_CONTROL: {
    lparY_event ev = {.kind = LPARY_CONTROL, .peer = p->serial, .id = h->id, .payload = payload,
                      .len = (size_t)h->len};
    emit(y, &ev);
    break;
  }
  default: y->bad_messages++; /* an engine's message from a client */
  }
}

/* A host's relay: its engines' hellos, replies and ends, the route field
** naming the engine among those it relays; and its heartbeats. */
static void engine_peer_frame(lparY_relay *y, peer *p, const lparW_header *h, const char *payload,
                              int *fds, int nfds) {
  p->heard = uv_now(y->loop);
  if (h->type == LPAR_MSG_PING) return;
  if (h->type == LPAR_MSG_CONTROL) {
    lparY_event ev = {.kind = LPARY_CONTROL, .peer = p->serial, .id = h->id, .payload = payload,
                      .len = (size_t)h->len};
    emit(y, &ev);
    return;
  }
  int id = p->first + (int)h->route;
  yengine *e = h->route < (unsigned)p->count ? known_engine(y, id) : NULL;
  if (e == NULL || e->via != p) {
    y->bad_messages++; /* not one of its engines (or one already gone) */
    return;
  }
  if (h->type == LPAR_MSG_HELLO) {
    engine_ready(y, id, payload, (size_t)h->len, lparW_hello_pid(payload, (size_t)h->len));
  } else if (h->type == LPAR_MSG_EXIT) {
    int status, sig;
    char why[160];
    lparW_exit_parse(payload, (size_t)h->len, &status, &sig, why, sizeof why);
    engine_exit(y, id, status, sig, why);
  } else if (is_reply(h->type)) {
    reply(y, id, h, payload, fds, nfds);
  } else {
    y->bad_messages++;
  }
}

/* ---- heartbeats on hosts' links ---- */

/*
** A link to another host can go silent without closing: a cable pulled, a
** machine gone, a firewall dropping packets. TCP would notice after minutes.
** So every HEARTBEAT_MS the relay sends each host's relay a PING, which it
** answers; a link with nothing heard for SILENT_MS is closed, and its
** engines' tasks fail, naming the host. Only while engines are joined: an
** idle controller with local engines only never wakes.
*/
#define HEARTBEAT_MS 1000
#define SILENT_MS 3000

static void on_heartbeat(uv_timer_t *t) {
  lparY_relay *y = t->data;
  uint64_t now = uv_now(y->loop);
  int hosts = 0;
  for (int i = 0; i < y->npeers; i++) {
    peer *p = y->peers[i];
    if (p->kind != PEER_ENGINE || p->route == NULL) continue;
    hosts++;
    if (now - p->heard > SILENT_MS) {
      char why[128];
      snprintf(why, sizeof why, "host %s went silent: nothing heard on its link for %d s",
               p->host, SILENT_MS / 1000);
      lparR_close(p->route, why);
    } else {
      lparR_send(p->route, LPAR_MSG_PING, LPAR_FLAG_RAW, 0, 0, "", 0, NULL, 0);
    }
  }
  if (hosts == 0) {
    uv_timer_stop(t);
    y->heartbeat_on = 0;
  }
}

/* ---- peers ---- */

static void peer_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds,
                       int nfds, void *ud) {
  (void)r;
  peer *p = ud;
  if (p->kind == PEER_ENGINE)
    engine_peer_frame(p->y, p, h, payload, fds, nfds);
  else
    client_frame(p->y, p, h, payload, fds, nfds);
}

static void peer_closed(lparR_route *r, const char *reason, int refused, void *ud) {
  (void)r;
  peer *p = ud;
  lparY_relay *y = p->y;
  p->route = NULL;
  drop_waiting(y, p);
  for (int i = 0; i < y->npeers; i++) {
    if (y->peers[i] == p) {
      y->peers[i] = y->peers[--y->npeers];
      break;
    }
  }
  if (p->kind == PEER_ENGINE) {
    /* Those that did not say how they ended went with the link. */
    char why[160];
    if (strncmp(reason, "host ", 5) == 0)
      snprintf(why, sizeof why, "%s", reason);
    else
      snprintf(why, sizeof why, "the link to host %s closed: %s", p->host, reason);
    for (int i = 0; i < p->count; i++) {
      yengine *e = known_engine(y, p->first + i);
      if (e && e->via == p) engine_exit(y, p->first + i, -1, 0, why);
    }
  }
  lparY_event ev = {.kind = LPARY_PEER_CLOSED, .peer = p->serial, .reason = reason,
                    .refused = refused, .engine = p->kind == PEER_ENGINE ? p->first : -1};
  emit(y, &ev);
  free(p);
}

static const lparR_handlers peer_handlers = {peer_frame, peer_closed, NULL, NULL};

static void on_accept(lparL_server *s, lparR_route *r, void *ud) {
  (void)s;
  lparY_relay *y = ud;
  peer *p = calloc(1, sizeof *p);
  if (p == NULL || y->stopping || (y->npeers == y->cap_peers && y->cap_peers >= 1 << 16)) {
    free(p);
    lparR_close(r, "no room for another peer");
    return;
  }
  if (y->npeers == y->cap_peers) {
    int n = y->cap_peers ? 2 * y->cap_peers : 16;
    peer **ps = realloc(y->peers, (size_t)n * sizeof *ps);
    if (ps == NULL) {
      free(p);
      lparR_close(r, "out of memory");
      return;
    }
    y->peers = ps;
    y->cap_peers = n;
  }
  if (++y->next_serial > SERIAL_MAX) y->next_serial = 1;
  *p = (peer){.y = y, .route = r, .serial = y->next_serial, .kind = PEER_CLIENT,
              .first = -1, .passes_fds = lparR_passes_fds(r)};
  y->peers[y->npeers++] = p;
  lparR_set_handlers(r, &peer_handlers, p);
  /* What it needs to know first, sealed once its hello is in. */
  for (int id = 0; id < y->nengines; id++) send_state(p, id, &y->engines[id]);
}

/* ---- the relay ---- */

/* y goes with the last of its timers: the loop closes them in its own order. */
static void timer_closed(uv_handle_t *h) {
  lparY_relay *y = h->data;
  if (--y->open_timers == 0) free(y);
}

int lparY_new(uv_loop_t *loop, const lparY_config *cfg, lparY_relay **out, char *err,
              size_t errlen) {
  lparY_relay *y = calloc(1, sizeof *y);
  if (y == NULL) return LPAR_ENOMEM;
  y->loop = loop;
  y->on_event = cfg->on_event;
  y->ud = cfg->ud;
  lpar_config ec = cfg->engines;
  ec.on_event = on_local_event;
  ec.ud = y;
  int rc = lpar_cluster_new(loop, &ec, &y->local);
  if (rc < 0) {
    snprintf(err, errlen, "cannot create the engines: %s", lpar_strerror(rc));
    free(y);
    return rc;
  }
  uv_timer_init(loop, &y->heartbeat);
  y->heartbeat.data = y;
  uv_timer_init(loop, &y->recheck);
  y->recheck.data = y;
  y->open_timers = 2;
  rc = lparL_listen(loop, cfg->socket, NULL, 0, cfg->key, on_accept, y, &y->servers[0], err, errlen);
  if (rc == LPAR_OK) y->nservers = 1;
  if (rc == LPAR_OK && cfg->ip) {
    rc = lparL_listen(loop, NULL, cfg->ip, cfg->port, cfg->key, on_accept, y, &y->servers[1], err,
                      errlen);
    if (rc == LPAR_OK) y->nservers = 2;
  }
  if (rc < 0) {
    lparY_free(y);
    return rc;
  }
  *out = y;
  return LPAR_OK;
}

int lparY_spawn(lparY_relay *y, int id, int n, char *err, size_t errlen) {
  yengine *e = engine_slot(y, id);
  if (e == NULL) {
    snprintf(err, errlen, "engine id %d is out of range", id);
    return LPAR_EINVAL;
  }
  int rc = lpar_cluster_spawn(y->local, id, n);
  if (rc < 0) {
    snprintf(err, errlen, "%s", lpar_cluster_errmsg(y->local));
    return rc;
  }
  *e = (yengine){.state = LPARY_STARTING, .pid = lpar_cluster_pid(y->local, id)};
  return LPAR_OK;
}

int lparY_signal(lparY_relay *y, int id, int sig) {
  yengine *e = known_engine(y, id);
  if (e == NULL) return LPAR_ENOENGINE;
  if (e->state == LPARY_DEAD) return LPAR_EDEAD;
  if (!e->joined) return lpar_cluster_signal(y->local, id, sig);
  if (e->via == NULL || e->via->route == NULL) return LPAR_EDEAD;
  char text[16];
  int n = snprintf(text, sizeof text, "%d", sig);
  return lparR_send(e->via->route, LPAR_MSG_SIGNAL, LPAR_FLAG_RAW, (unsigned)e->index, 0, text,
                    (size_t)n, NULL, 0);
}

int lparY_join(lparY_relay *y, uint32_t serial, int first, int count, const char *host) {
  peer *p = find_peer(y, serial);
  if (p == NULL || p->kind != PEER_CLIENT || count < 1 || first < 0 ||
      count > LPARY_MAX_ENGINES || first > LPARY_MAX_ENGINES - count)
    return LPAR_EINVAL;
  for (int i = 0; i < count; i++) {
    yengine *e = engine_slot(y, first + i);
    if (e == NULL || (e->state != LPARY_NONE && e->state != LPARY_DEAD)) return LPAR_EINVAL;
  }
  p->kind = PEER_ENGINE;
  p->first = first;
  p->count = count;
  p->heard = uv_now(y->loop);
  snprintf(p->host, sizeof p->host, "%s", host && host[0] ? host : "?");
  for (int i = 0; i < count; i++)
    y->engines[first + i] =
        (yengine){.state = LPARY_STARTING, .joined = 1, .via = p, .index = i, .pid = -1};
  if (!y->heartbeat_on) {
    uv_timer_start(&y->heartbeat, on_heartbeat, HEARTBEAT_MS, HEARTBEAT_MS);
    y->heartbeat_on = 1;
  }
  return LPAR_OK;
}

int lparY_answer(lparY_relay *y, uint32_t serial, uint64_t id, const void *payload, size_t len) {
  peer *p = find_peer(y, serial);
  if (p == NULL || p->route == NULL) return LPAR_EDEAD;
  return lparR_send(p->route, LPAR_MSG_CONTROL, 0, 0, id, payload, len, NULL, 0);
}

int lparY_engine(const lparY_relay *y, int id, lparY_engine_info *out) {
  const yengine *e = known_engine(y, id);
  if (e == NULL) return LPAR_ENOENGINE;
  *out = (lparY_engine_info){.state = e->state, .joined = e->joined, .pid = e->pid,
                             .status = e->status, .signal = e->signal, .in_flight = e->in_flight,
                             .silent_ms = -1};
  if (e->joined && e->via && e->via->route) out->link_sent = lparR_bytes_sent(e->via->route);
  if (!e->joined && e->state == LPARY_READY) {
    int64_t ms = lpar_cluster_silence_ms(y->local, id);
    if (ms >= 0) out->silent_ms = ms;
    int beat = lpar_cluster_heartbeat_ms(y->local, id);
    out->heartbeat_ms = beat > 0 ? beat : 0;
  }
  return LPAR_OK;
}

void lparY_get_stats(const lparY_relay *y, lparY_stats *out) {
  memset(out, 0, sizeof *out);
  for (int i = 0; i < y->nservers; i++) {
    out->refused += lparL_server_refused(y->servers[i]);
    out->disconnected += lparL_server_disconnected(y->servers[i]);
    out->no_fds += lparL_server_no_fds(y->servers[i]);
  }
  out->bad_messages = y->bad_messages + lpar_cluster_bad_messages(y->local);
  for (int i = 0; i < y->npeers; i++) out->clients += y->peers[i]->kind == PEER_CLIENT;
  out->waiting = y->nwaiting;
  for (int i = 0; i < y->nengines; i++)
    if (y->engines[i].state != LPARY_NONE) out->engines = i + 1;
}

int lparY_port(const lparY_relay *y) {
  return y->nservers > 1 ? lparL_server_port(y->servers[1]) : 0;
}

void lparY_free(lparY_relay *y) {
  if (y == NULL) return;
  y->stopping = 1;
  for (int i = 0; i < y->nservers; i++) lparL_server_close(y->servers[i]);
  /* Peers free themselves as their routes close; none may call back into y after this. */
  for (int i = 0; i < y->npeers; i++) {
    peer *p = y->peers[i];
    if (p->route) {
      lparR_set_handlers(p->route, NULL, NULL);
      lparR_close(p->route, "the controller stopped");
    }
    drop_waiting(y, p);
    free(p);
  }
  free(y->peers);
  lpar_cluster_free(y->local);
  free(y->engines);
  /* The timers are closed from the loop; y goes with the last. */
  uv_close((uv_handle_t *)&y->recheck, timer_closed);
  uv_close((uv_handle_t *)&y->heartbeat, timer_closed);
}
