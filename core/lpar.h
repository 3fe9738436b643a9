/*
** lpar.h: the public C API of liblpar.
**
** liblpar starts Lua engines in their own processes and talks to them over
** unix sockets, on a libuv loop that the host owns (the Lua binding passes
** luv's loop, so lpar, luv timers and luv sockets share one loop).
**
** Conventions, as libuv's: functions return 0 or a negative LPAR_E* code and
** lpar_strerror(code) names it; handles are opaque and owned by the caller.
** SIGPIPE is set to be ignored (unless the host set its own handler), so a
** peer that dies shows as a failed write, not as the death of the host.
*/
#ifndef LPAR_H
#define LPAR_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#define LPAR_VERSION "0.1.0"

/* Error codes (all negative). */
#define LPAR_OK 0
#define LPAR_ENOMEM (-1)      /* out of memory */
#define LPAR_EINVAL (-2)      /* invalid argument */
#define LPAR_EBADMSG (-3)     /* malformed message or encoding */
#define LPAR_ETOOBIG (-4)     /* message larger than LPAR_MAX_PAYLOAD */
#define LPAR_EDEPTH (-5)      /* value nested too deeply */
#define LPAR_EUNSENDABLE (-6) /* value that cannot be sent */
#define LPAR_ESPAWN (-7)      /* engine process could not be started */
#define LPAR_EDEAD (-8)       /* engine is not running */
#define LPAR_ENOENGINE (-9)   /* no engine with that id */
#define LPAR_ESYS (-10)       /* system call failed (see errno) */
#define LPAR_ECLOSED (-11)    /* cluster stopped */
#define LPAR_EAUTH (-12)      /* message failed authentication */

const char *lpar_strerror(int code);

/* Message types on the wire. */
enum lpar_msg_type {
  LPAR_MSG_HELLO = 1,   /* engine -> controller: (id, pid), the engine is ready */
  LPAR_MSG_EXECUTE = 2, /* controller -> engine: (code) */
  LPAR_MSG_APPLY = 3,   /* controller -> engine: (f, args...) */
  LPAR_MSG_PUSH = 4,    /* controller -> engine: (table of globals) */
  LPAR_MSG_PULL = 5,    /* controller -> engine: (names...) */
  LPAR_MSG_RESULT = 6,  /* engine -> controller: (started, completed, values...) */
  LPAR_MSG_ERROR = 7,   /* engine -> controller: (started, completed, error) */
  LPAR_MSG_STDOUT = 8,  /* engine -> controller: raw text */
  LPAR_MSG_STDERR = 9,  /* engine -> controller: raw text */
  LPAR_MSG_DISPLAY = 10, /* engine -> controller: (mime type, data, metadata) */
  /* Only on a standalone controller's socket (route = the engine): */
  LPAR_MSG_EXIT = 11,    /* controller -> client: raw "status signal", the engine ended */
  LPAR_MSG_CONTROL = 12, /* either way: (operation, args...) and its answer, same id */
  LPAR_MSG_MAX_ = 13
};

/*
** Message flags. LPAR_FLAG_TEXT asks an engine to answer in plain text: a
** RESULT carries tostring() of the values joined by tabs, an ERROR the
** message and traceback. It is how a C host with no Lua reads results.
*/
#define LPAR_FLAG_TEXT 0x1u
#define LPAR_FLAG_RAW 0x2u /* payload is raw bytes, not an encoded tuple */
#define LPAR_FLAG_FDS 0x4u /* descriptors (shared memory) came before it on the side socket */

#define LPAR_MAX_PAYLOAD ((uint64_t)1 << 30)

/* A cluster of local engines driven from one libuv loop. */
typedef struct lpar_cluster lpar_cluster;

typedef enum lpar_event_kind {
  LPAR_EV_READY = 1,   /* engine said hello */
  LPAR_EV_MESSAGE = 2, /* engine sent a message */
  LPAR_EV_EXIT = 3,    /* engine process ended */
  LPAR_EV_BAD_MESSAGE = 4 /* engine sent a malformed frame; connection closed */
} lpar_event_kind;

typedef struct lpar_event {
  lpar_event_kind kind;
  int engine;           /* engine id */
  int type;             /* LPAR_MSG_* (MESSAGE) */
  unsigned flags;       /* LPAR_FLAG_* (MESSAGE) */
  uint64_t id;          /* request id the message answers (MESSAGE) */
  const char *payload;  /* valid during the callback only (MESSAGE) */
  size_t len;
  int exit_status;      /* EXIT: exit code, or -1 when killed by a signal */
  int term_signal;      /* EXIT: signal number, or 0 */
  const char *reason;   /* BAD_MESSAGE: what was wrong */
  int *fds;             /* MESSAGE with LPAR_FLAG_FDS: descriptors, now the callback's to close */
  int nfds;
} lpar_event;

typedef void (*lpar_event_cb)(lpar_cluster *c, const lpar_event *ev, void *ud);

typedef struct lpar_config {
  const char *engine_path;    /* lpar-engine executable; NULL: built-in default */
  const char *const *env;     /* extra "NAME=value" entries, NULL-terminated, or NULL */
  int blas_threads;           /* OPENBLAS_NUM_THREADS for engines; 0 means 1 */
  int inline_only;            /* engines send matrices inline, never as memfds (a
                                 standalone controller relays bytes, not descriptors) */
  lpar_event_cb on_event;
  void *ud;
} lpar_config;

/* Create a cluster on `loop` (no engine yet). */
int lpar_cluster_new(uv_loop_t *loop, const lpar_config *cfg, lpar_cluster **out);

/*
** Spawn engine `id` (0-based) of a cluster of `n`; READY follows once the
** engine has said hello. A dead engine's id may be spawned again.
*/
int lpar_cluster_spawn(lpar_cluster *c, int id, int n);

/* Send one message to an engine. The payload is copied (or written at once). */
int lpar_cluster_send(lpar_cluster *c, int engine, int type, unsigned flags,
                      uint64_t id, const void *payload, size_t len);

/*
** Run `code` on an engine and get the answer as text: a MESSAGE of type
** RESULT (the chunk's return values, tostring'd, joined by tabs) or ERROR
** (message and traceback), with flag LPAR_FLAG_TEXT and the same id.
*/
int lpar_cluster_execute(lpar_cluster *c, int engine, uint64_t id, const char *code,
                         size_t len);

/*
** Send a message with descriptors (memfds of shared matrices) alongside:
** they travel first on the engine's side socket, then the frame, flagged
** LPAR_FLAG_FDS. The caller keeps its own descriptors.
*/
int lpar_cluster_send_fds(lpar_cluster *c, int engine, int type, unsigned flags, uint64_t id,
                          const void *payload, size_t len, const int *fds, int nfds);

/* Send raw bytes on an engine's socket, framing and all: for tests of bad input. */
int lpar_cluster_send_raw(lpar_cluster *c, int engine, const void *bytes, size_t len);

/* Send a signal to an engine's process. */
int lpar_cluster_signal(lpar_cluster *c, int engine, int sig);

/*
** Interrupt request `id` on an engine if it is the one running (SIGINT sent
** with sigqueue, carrying the id); a request already done is left alone.
*/
int lpar_cluster_interrupt(lpar_cluster *c, int engine, uint64_t id);

/* Process id of engine `id`, or a negative code. */
int lpar_cluster_pid(lpar_cluster *c, int engine);

/* Messages dropped as malformed since the cluster started. */
uint64_t lpar_cluster_bad_messages(const lpar_cluster *c);

/*
** Stop every engine: close its socket (an idle engine exits on EOF), give it
** a moment, then SIGKILL and reap. Synchronous; safe from a finalizer.
*/
void lpar_cluster_stop(lpar_cluster *c);

/* Stop, then release the cluster once libuv has closed its handles. */
void lpar_cluster_free(lpar_cluster *c);

/* Default engine path compiled into the library ($LPAR_ENGINE overrides it). */
const char *lpar_default_engine_path(void);

#endif
