/*
** lpar.h: the public C API of liblpar.
**
** liblpar drives Lua engines, each a Lua 5.4 state in its own process. A
** host reaches them through one kind of handle, an lpar_cluster, whether
** the engines are its own children (lpar_cluster_new) or run behind a
** standalone controller, on this host or another (lpar_cluster_connect):
** the same calls send to engine i, and the same events come back. A host
** with no loop of its own uses the synchronous layer at the end of this
** file instead (lpar_session_*): start or connect, run code, read the answer.
** Build with `pkg-config --cflags --libs lpar`.
**
** Threading and the loop. Everything runs on a libuv loop that the host owns
** and runs; liblpar starts no thread. Every call must be made on the thread
** that runs that loop, and events are delivered from inside uv_run. No call
** blocks on the network: a connection is made in the background, and what
** is sent before it is up waits in order. (lpar_cluster_stop is the one
** call that waits, at most 200 ms, for local engines to exit. The
** lpar_session_* calls run a private loop of their own and do wait.)
**
** Errors. Functions return 0 (LPAR_OK) or a negative LPAR_E* code;
** lpar_strerror(code) names the code and lpar_cluster_errmsg(c) says what
** the last failed call on c was about, as sqlite3_errmsg does.
**
** Ownership. A handle is the host's from its constructor until
** lpar_cluster_free. Payloads passed to a send are copied or written before
** the call returns; descriptors passed to a send stay the caller's. Event
** payloads are valid during the callback only.
**
** Signals. liblpar never raises SIGPIPE on its sockets (it writes with
** MSG_NOSIGNAL) and changes no signal disposition.
*/
#ifndef LPAR_H
#define LPAR_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#define LPAR_VERSION "0.1.0"

/*
** Visibility. liblpar.so exports the functions marked LPAR_API and nothing
** else (it is built with -fvisibility=hidden).
*/
#if defined(__GNUC__)
#define LPAR_API __attribute__((visibility("default")))
#else
#define LPAR_API
#endif

/* Error codes (all negative). */
#define LPAR_OK 0
#define LPAR_ENOMEM (-1)      /* out of memory */
#define LPAR_EINVAL (-2)      /* invalid argument */
#define LPAR_EBADMSG (-3)     /* malformed message or encoding */
#define LPAR_ETOOBIG (-4)     /* message larger than LPAR_MAX_PAYLOAD */
#define LPAR_EDEPTH (-5)      /* value nested too deeply */
#define LPAR_EUNSENDABLE (-6) /* value that cannot be sent (descriptors over TCP) */
#define LPAR_ESPAWN (-7)      /* engine process could not be started */
#define LPAR_EDEAD (-8)       /* engine is not running, or its link is gone */
#define LPAR_ENOENGINE (-9)   /* no engine with that id */
#define LPAR_ESYS (-10)       /* system call failed (lpar_cluster_errmsg says which) */
#define LPAR_ECLOSED (-11)    /* cluster stopped */
#define LPAR_EAUTH (-12)      /* message failed authentication */
#define LPAR_EREMOTE (-13)    /* the code run on an engine raised an error (lpar_session_run) */
#define LPAR_ETIMEDOUT (-14)  /* engines were not ready in time (lpar_session_start/connect) */

/* The name of an error code: "engine is not running". Never NULL. */
LPAR_API const char *lpar_strerror(int code);

/* Message types on the wire. */
enum lpar_msg_type {
  LPAR_MSG_HELLO = 1,    /* engine -> host: raw "lpar-engine VERSION id=N pid=P heartbeat=MS" */
  LPAR_MSG_EXECUTE = 2,  /* host -> engine: (code) */
  LPAR_MSG_APPLY = 3,    /* host -> engine: (f, args...) */
  LPAR_MSG_PUSH = 4,     /* host -> engine: (table of globals) */
  LPAR_MSG_PULL = 5,     /* host -> engine: (names...) */
  LPAR_MSG_RESULT = 6,   /* engine -> host: (started, completed, values...) */
  LPAR_MSG_ERROR = 7,    /* engine -> host: (started, completed, error) */
  LPAR_MSG_STDOUT = 8,   /* engine -> host: raw text */
  LPAR_MSG_STDERR = 9,   /* engine -> host: raw text */
  LPAR_MSG_DISPLAY = 10, /* engine -> host: (mime type, data, metadata) */
  /* Only on a controller's link (the route names the engine): */
  LPAR_MSG_EXIT = 11,      /* controller -> client: raw "status signal[ why]", the engine ended */
  LPAR_MSG_CONTROL = 12,   /* either way: (operation, args...) and its answer, same id */
  LPAR_MSG_SIGNAL = 13,    /* client -> controller: raw signal number, for the engine */
  LPAR_MSG_INTERRUPT = 14, /* client -> controller: interrupt request `id` on the engine */
  LPAR_MSG_HEARTBEAT = 15, /* engine -> host: empty, "my Lua is stepping"; never an event */
  LPAR_MSG_PING = 16,      /* controller <-> a host's relay: empty; the link is alive */
  LPAR_MSG_STARTED = 17,   /* engine -> host: empty, request `id` (LPAR_FLAG_DEADLINE) began */
  LPAR_MSG_PLACED = 18,    /* controller -> client: empty, request `id` went to engine `route` */
  LPAR_MSG_MAX_ = 19
};

/*
** Load balancing in the controller. Behind a standalone controller a
** request may leave the engine to it: send it to engine LPAR_ANY_ENGINE +
** depth (depth 1 to 255). The controller schedules such requests from all
** its clients together: each waits there until some ready engine holds
** fewer than `depth` requests, clients sharing the engines' time, and goes
** to the least loaded; a MESSAGE of type PLACED then names that engine (ev->engine) for
** request ev->id, before any of its replies. lpar_cluster_interrupt(c,
** LPAR_ANY_ENGINE, id) withdraws one still waiting, and PLACED then names
** LPAR_ANY_ENGINE; one already placed is interrupted on its engine as any
** request is. A local cluster has no controller: LPAR_ENOENGINE.
*/
#define LPAR_ANY_ENGINE 0xff00

/* An engine's heartbeat period, in milliseconds (LPAR_HEARTBEAT_MS in its
   environment overrides it; 0 turns heartbeats off). */
#define LPAR_HEARTBEAT_MS 100
/* A ready engine silent this many of its heartbeat periods is stopped or
   wedged: "not responding" (load-balanced tasks pass it by). */
#define LPAR_NOT_RESPONDING_BEATS 10


/*
** Message flags. LPAR_FLAG_TEXT asks an engine to answer in plain text: a
** RESULT carries tostring() of the values joined by tabs, an ERROR the
** message and traceback. It is how a C host with no Lua reads results.
*/
#define LPAR_FLAG_TEXT 0x1u
#define LPAR_FLAG_RAW 0x2u    /* payload is raw bytes, not an encoded tuple */
#define LPAR_FLAG_FDS 0x4u    /* descriptors (shared memory) came with it; set by lpar */
#define LPAR_FLAG_INLINE 0x8u /* answer with matrices inline, no descriptors */
/*
** Set by lpar, never by a host: LPAR_FLAG_ROUTES marks one request for
** several engines on a controller's link, its payload led by a route list
** (core/wire.h: each engine gets its own request id, and answers as for a
** request of its own); LPAR_FLAG_SHM marks a frame to a local engine whose
** payload is in shared memory (the last descriptor, a memfd; the frame's
** own payload is its length, u64 little-endian), so a host's relay hands
** one copy of a request to all its engines.
*/
#define LPAR_FLAG_ROUTES 0x10u
#define LPAR_FLAG_SHM 0x20u
/*
** The request has a deadline: its payload starts with 8 bytes, a double of
** CLOCK_REALTIME seconds (the hosts' clocks agree, as NTP keeps them). The
** engine answers STARTED as it begins such a request, or, when the deadline
** has passed while it waited, an ERROR without running it.
*/
#define LPAR_FLAG_DEADLINE 0x40u

#define LPAR_MAX_PAYLOAD ((uint64_t)1 << 30)

/* Engines reachable from here, local or behind a controller. */
typedef struct lpar_cluster lpar_cluster;

typedef enum lpar_event_kind {
  LPAR_EV_READY = 1,       /* an engine said hello (again, after a restart) */
  LPAR_EV_MESSAGE = 2,     /* an engine (or the controller: CONTROL) sent a message */
  LPAR_EV_EXIT = 3,        /* an engine's process ended */
  LPAR_EV_BAD_MESSAGE = 4, /* a local engine sent a malformed frame; it is cut off */
  LPAR_EV_CLOSED = 5       /* the link to the controller closed; no engine is reachable */
} lpar_event_kind;

typedef struct lpar_event {
  lpar_event_kind kind;
  int engine;          /* engine id (-1 for CLOSED) */
  int type;            /* LPAR_MSG_* (MESSAGE, READY) */
  unsigned flags;      /* LPAR_FLAG_* (MESSAGE) */
  uint64_t id;         /* request id the message answers (MESSAGE) */
  const char *payload; /* valid during the callback only (MESSAGE, READY: the hello) */
  size_t len;
  int pid;             /* READY: the engine's process id */
  int exit_status;     /* EXIT: exit code, or -1 when killed by a signal; CLOSED: 1 if refused */
  int term_signal;     /* EXIT: signal number, or 0 */
  const char *reason;  /* BAD_MESSAGE, CLOSED: what happened; EXIT: why, or NULL */
  int *fds;            /* MESSAGE with LPAR_FLAG_FDS: descriptors; keep one by setting */
  int nfds;            /* its slot to -1, the rest are closed after the callback */
} lpar_event;

typedef void (*lpar_event_cb)(lpar_cluster *c, const lpar_event *ev, void *ud);

typedef struct lpar_config {
  const char *engine_path; /* lpar-engine executable; NULL: lpar_default_engine_path() */
  const char *const *env;  /* extra "NAME=value" entries, NULL-terminated, or NULL */
  int blas_threads;        /* OPENBLAS_NUM_THREADS for engines; 0 means 1 */
  lpar_event_cb on_event;
  void *ud;
} lpar_config;

/*
** Create a cluster of local engines on `loop` (none started yet). The
** config is copied. 0, or LPAR_EINVAL / LPAR_ENOMEM (*out untouched).
*/
LPAR_API int lpar_cluster_new(uv_loop_t *loop, const lpar_config *cfg, lpar_cluster **out);

/*
** Start local engine `id` (0-based) of a cluster of `n`: it sees
** lpar.engine.id and lpar.engine.n. READY follows once it has said hello,
** or EXIT if it dies first. A dead engine's id may be started again.
** LPAR_ESPAWN keeps the system's reason: lpar_cluster_errmsg gives
** "cannot start engine 0 (/path/lpar-engine): No such file or directory".
*/
LPAR_API int lpar_cluster_spawn(lpar_cluster *c, int id, int n);

typedef struct lpar_connect_config {
  const char *path; /* the controller's unix socket, or NULL for TCP */
  const char *host; /* TCP: a numeric IPv4/IPv6 address or "localhost" */
  int port;
  unsigned char key[32]; /* the cluster's key, from its connection file */
  lpar_event_cb on_event;
  void *ud;
} lpar_connect_config;

/*
** Connect to a standalone controller. Returns at once; the controller then
** reports each engine it has (READY, or EXIT for one that is dead), and
** later engines as they come and go. Every frame on the link is encrypted
** and authenticated with keys derived from `key` (AES-256-GCM or
** XChaCha20-Poly1305). If the controller cannot be reached, or goes, CLOSED
** says why. On failure *out is still set, for lpar_cluster_errmsg, and must
** be freed.
*/
LPAR_API int lpar_cluster_connect(uv_loop_t *loop, const lpar_connect_config *cfg, lpar_cluster **out);

/* Send one message to an engine. The payload is written or copied at once. */
LPAR_API int lpar_cluster_send(lpar_cluster *c, int engine, int type, unsigned flags, uint64_t id,
                      const void *payload, size_t len);

/*
** The same, with descriptors (memfds of shared matrices) alongside; they
** are duplicated if they must wait. Over TCP no descriptor can go:
** LPAR_EUNSENDABLE (see lpar_cluster_passes_fds).
*/
LPAR_API int lpar_cluster_send_fds(lpar_cluster *c, int engine, int type, unsigned flags, uint64_t id,
                          const void *payload, size_t len, const int *fds, int nfds);

/*
** Batch: messages sent between begin and end wait, gathered per engine,
** and go out at the end in as few writes as the sockets allow (one, for a
** burst of small requests to one engine), instead of one write each. Pairs
** nest. While the cluster's event callback runs, sends are batched the same
** way until the frames of that read are handled. End a batch before
** running the loop again: a batched message is not written before.
*/
LPAR_API void lpar_cluster_batch_begin(lpar_cluster *c);
LPAR_API void lpar_cluster_batch_end(lpar_cluster *c);

/*
** One message to several engines: engines[i] gets it under request id
** first_id + i, and answers as for a message of its own. Behind a
** controller it crosses the link once, and the controller sends it once to
** each host whose engines are among them; local engines get one frame
** each, sharing the descriptors. When rcs is not NULL, rcs[i] gets the
** outcome for engines[i]. 0 when it went to every engine, else the first
** failure (LPAR_EINVAL: n < 1, or more than 4096 engines behind a controller).
*/
LPAR_API int lpar_cluster_send_many(lpar_cluster *c, const int *engines, int n, int type,
                                   unsigned flags, uint64_t first_id, const void *payload,
                                   size_t len, const int *fds, int nfds, int *rcs);

/*
** 1 when messages to `engine` can carry descriptors: not over TCP, nor to
** an engine that joined a controller from elsewhere (for LPAR_ANY_ENGINE +
** depth: when no such engine is up).
*/
LPAR_API int lpar_cluster_passes_fds(const lpar_cluster *c, int engine);

/*
** Run `code` on an engine and get the answer as text: a MESSAGE of type
** RESULT (the chunk's return values, tostring'd, joined by tabs) or ERROR
** (message and traceback), with flag LPAR_FLAG_TEXT and the same id.
*/
LPAR_API int lpar_cluster_execute(lpar_cluster *c, int engine, uint64_t id, const char *code, size_t len);

/* Send a signal to an engine's process (through its controller if connected). */
LPAR_API int lpar_cluster_signal(lpar_cluster *c, int engine, int sig);

/*
** Interrupt request `id` on an engine if it is the one running (SIGINT sent
** with sigqueue, carrying the id); a request already done is left alone.
*/
LPAR_API int lpar_cluster_interrupt(lpar_cluster *c, int engine, uint64_t id);

/* Process id of engine `id` (as its hello said), or a negative code. */
LPAR_API int lpar_cluster_pid(lpar_cluster *c, int engine);

/*
** Milliseconds since local engine `id` last sent a frame (a heartbeat, at
** least every LPAR_HEARTBEAT_MS while its Lua runs or it idles: a stopped
** or wedged engine goes silent), or a negative code (not a local engine).
*/
int64_t lpar_cluster_silence_ms(const lpar_cluster *c, int engine);
/*
** The heartbeat period local engine `id` said in its hello, in ms: 0 when
** it sends none (LPAR_HEARTBEAT_MS=0 in its environment), so its silence
** says nothing; or a negative code (not a local engine).
*/
int lpar_cluster_heartbeat_ms(const lpar_cluster *c, int engine);

/* Frames dropped as malformed from local engines since the cluster started. */
LPAR_API uint64_t lpar_cluster_bad_messages(const lpar_cluster *c);

/* The link's cipher ("AES-256-GCM", "XChaCha20-Poly1305"), or "none". */
LPAR_API const char *lpar_cluster_cipher(const lpar_cluster *c);

/* What the last failed call on c was about. Never NULL, even for a NULL c. */
LPAR_API const char *lpar_cluster_errmsg(const lpar_cluster *c);

/*
** Stop: close every socket (an idle engine exits on EOF), wait up to 200 ms,
** then SIGKILL and reap local engines; close the link of a connected one.
** No event is reported after lpar_cluster_free.
*/
LPAR_API void lpar_cluster_stop(lpar_cluster *c);

/* Stop, then release the cluster once libuv has closed its handles (run the loop). */
LPAR_API void lpar_cluster_free(lpar_cluster *c);

/*
** The engine executable used when lpar_config names none: $LPAR_ENGINE, else
** the one of this copy of lpar (the build tree's, or PREFIX/libexec/lpar/
** for an installed liblpar). The string is valid until the next call.
*/
LPAR_API const char *lpar_default_engine_path(void);

/*
** The synchronous layer: for a host with no event loop of its own. A
** session owns a private libuv loop and a cluster on it, and each call
** runs that loop until its answer is in. What engines print is written to
** the host's stdout and stderr as it arrives. A whole host:
**
**   lpar_session *s;
**   char *out;
**   if (lpar_session_start(2, &s) != LPAR_OK) {     // or lpar_session_connect("default", &s)
**     fprintf(stderr, "%s\n", lpar_session_errmsg(s));
**     return 1;
**   }
**   int rc = lpar_session_run(s, 1, "return lpar.engine.id, 6 * 7", &out);
**   printf("%s: %s\n", rc == LPAR_OK ? "result" : "error", out ? out : lpar_session_errmsg(s));
**   free(out);
**   lpar_session_close(s);
**
** Build it with `cc host.c $(pkg-config --cflags --libs lpar)`.
*/
typedef struct lpar_session lpar_session;

/*
** Start `n` local engines (ids 0 to n-1) and wait, at most 10 s, until all
** are ready. *out is set even on failure, for lpar_session_errmsg, and
** must be closed. LPAR_ESPAWN (an engine could not start or died at once),
** LPAR_ETIMEDOUT, LPAR_EINVAL (n < 1), LPAR_ENOMEM (*out NULL).
*/
LPAR_API int lpar_session_start(int n, lpar_session **out);

/*
** Connect to a running standalone cluster (`lpar cluster start`): `where`
** is a profile name (its connection file is $LPAR_DIR/profile_NAME/
** connection.json, default ~/.lpar/...), or the path of a connection file
** if it holds a '/'; NULL means "default". Waits, at most 10 s, until the
** controller has reported its engines. *out is set as for lpar_session_start.
*/
LPAR_API int lpar_session_connect(const char *where, lpar_session **out);

/* Engines that said they were ready. */
LPAR_API int lpar_session_engines(const lpar_session *s);

/*
** Run Lua `code` on engine `engine` (its globals persist between calls) and
** wait for the answer. LPAR_OK: *result is the chunk's return values, by
** tostring, joined by tabs ("" for none). LPAR_EREMOTE: *result is the
** error's message and remote traceback. Either way *result is the caller's
** to free(). Otherwise *result is NULL and the code says what went wrong:
** LPAR_EDEAD (the engine died meanwhile: lpar_session_errmsg names the
** signal or status), LPAR_ENOENGINE, LPAR_ECLOSED. No time limit.
*/
LPAR_API int lpar_session_run(lpar_session *s, int engine, const char *code, char **result);

/* What the last failed call on s was about. Never NULL. */
LPAR_API const char *lpar_session_errmsg(const lpar_session *s);

/* Stop the engines started (or the link opened) and free the session. NULL is a no-op. */
LPAR_API void lpar_session_close(lpar_session *s);

#endif
