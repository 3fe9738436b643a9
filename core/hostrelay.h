/*
** hostrelay.h: the relay of a host whose engines joined a standalone
** controller from elsewhere, `lpar engine -n K` (internal, prefix lparJ_).
**
** It owns the host's one link to the controller and its K local engines
** (socketpairs, lpar_cluster), and moves every frame between them in C:
** the route field on the link names an engine by its index, 0 .. K-1,
** both ways. A request for several of its engines comes once, with a route
** list (LPAR_FLAG_ROUTES, wire.h); a large payload (LPARJ_SHM_MIN bytes or
** more) is put once in a memfd, and each engine gets the descriptor
** (LPAR_FLAG_SHM), so the host's engines share one copy. It answers the
** controller's PING itself and takes a link silent for LPARJ_SILENT_MS for
** a controller gone. Lua hears only engines coming up and ending, and the
** link going (lparJ_event); the join itself (a CONTROL exchange) happens on
** the link before the relay takes it over.
*/
#ifndef LPAR_HOSTRELAY_H
#define LPAR_HOSTRELAY_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "lpar.h"
#include "route.h"

#define LPARJ_SILENT_MS 5000     /* nothing heard for this long: the controller is gone */
#define LPARJ_SHM_MIN (64 * 1024) /* payloads this large reach the engines by shared memory */

typedef struct lparJ_relay lparJ_relay;

typedef enum lparJ_event_kind {
  LPARJ_READY = 1,  /* engine `engine` said hello (and the controller was told) */
  LPARJ_EXIT = 2,   /* engine `engine` ended: status, signal (the controller was told) */
  LPARJ_CLOSED = 3  /* the link closed: reason; silent is 1 when it went quiet */
} lparJ_event_kind;

typedef struct lparJ_event {
  lparJ_event_kind kind;
  int engine; /* its id, first + index */
  int status, signal;
  const char *reason;
  int silent;
} lparJ_event;

typedef void (*lparJ_event_cb)(lparJ_relay *j, const lparJ_event *ev, void *ud);

typedef struct lparJ_config {
  int first, count; /* engine ids first .. first + count - 1 */
  int n;            /* the cluster's size, as engines see it in lpar.engine.n */
  const char *host; /* appended to each engine's hello as " host=NAME" */
  lpar_config engines; /* how engines start (its on_event is the relay's) */
  lparJ_event_cb on_event;
  void *ud;
} lparJ_config;

typedef struct lparJ_stats {
  uint64_t requests;     /* requests from the link, each counted once however many engines */
  uint64_t deliveries;   /* frames handed to engines for them */
  uint64_t shared;       /* payloads put in shared memory (once per request) */
  uint64_t bytes_in;     /* payload bytes of those requests, as they came over the link */
  uint64_t bad_messages; /* frames and route-list entries refused */
} lparJ_stats;

/*
** A relay over `link` (a sealed route whose session has started, taken
** from the cluster that joined: lparK_take_link), which it owns from now
** on, even on failure. No engine runs yet. 0, or a negative code with err.
*/
int lparJ_new(uv_loop_t *loop, lparR_route *link, const lparJ_config *cfg, lparJ_relay **out,
              char *err, size_t errlen);
/*
** Start engine `index`. On failure the controller is told it exited with
** status 127, and err says why.
*/
int lparJ_spawn(lparJ_relay *j, int index, char *err, size_t errlen);
void lparJ_get_stats(const lparJ_relay *j, lparJ_stats *out);
/* Close the link and stop the engines; no event after this. Freed from the loop. */
void lparJ_free(lparJ_relay *j);

#endif
