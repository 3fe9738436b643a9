/*
** mpi.c: lpar.mpi, MPI between engines (internal prefix lparI_, or static).
**
** Engines started by the MPI launcher (`lpar cluster start --launcher mpi`)
** are MPI ranks: each lpar-engine is the child of its rank's `lpar engine
** --rank` process, inherits the rank's environment, and loads this module
** when it starts (LPAR_MPI=1), because MPI_Init waits for every rank of the
** job: loaded by one task on one engine it would wait for the others.
**
** Messages. A value travels as one MPI message: a fixed head (its kind and
** shape, or the number itself) followed by its payload, described by a
** struct datatype over absolute addresses, so a matrix goes straight from
** its storage (even a strided view) and lands straight in a fresh storage or
** in a view the caller passes. Other Lua values go through lpar's encoding,
** data only: MPI's transports authenticate nobody, so no bytecode is loaded
** from them. A receive is a matched probe (MPI_Improbe) then MPI_Mrecv: the
** size is known before anything is allocated, and waiting posts nothing.
**
** Waiting. Every wait polls (MPI_Test or MPI_Improbe, spinning briefly, then
** yielding, then sleeping 100 us) and calls a no-op through lua_pcall between
** polls: the engine's SIGINT and SIGALRM handlers set a Lua hook, which then
** runs, sending heartbeats or raising "interrupted" (engines/interrupt.c).
** Interrupted, a probe has posted nothing; a send is cancelled when MPI can
** (OpenMPI cannot take back a send: it stays pending, its buffers kept, and
** is delivered if the peer ever receives it). A collective cannot be
** cancelled at all (MPI-3 5.12): its request is kept with its buffers, and
** the communicator is marked out of step, because its ranks now disagree on
** how many collectives they ran; its collectives raise until every rank
** calls comm:reset(), which makes a fresh one from a spare duplicate that
** no user operation ever touches.
*/
#include <limits.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mpi.h>

#include <lauxlib.h>
#include <lua.h>

#include "buffer.h"
#include "lpar.h"
#include "matrix.h"
#include "serialize.h"

#define COMM_METATABLE "lpar.mpi.comm"
#define REQUEST_METATABLE "lpar.mpi.request"

/* The registry key of the module's state. */
static const char STATE_KEY = 0;

enum { K_FLOAT = 1, K_INT = 2, K_MATRIX = 3, K_VALUE = 4, K_NIL = 5 };

/* What precedes every payload. */
typedef struct head {
  int64_t kind;
  int64_t rows, cols; /* K_MATRIX; K_VALUE: rows = encoded bytes */
  double num;
  int64_t inum;
} head;

/*
** Memory an operation owns: storages (a matrix's, or raw bytes) and one
** malloc'd block. A hold is a userdata, so a Lua error frees it with the
** stack; when MPI may still use it, an orphan takes its contents over.
*/
#define HOLD_METATABLE "lpar.mpi.hold"
typedef struct hold {
  lparM_storage *st[3];
  void *mem;
} hold;

/* A request MPI still holds memory for, though nobody waits for it any more. */
typedef struct orphan {
  MPI_Request req;
  MPI_Datatype type; /* to free, or MPI_DATATYPE_NULL */
  hold h;
} orphan;

/* The module's state: one per process, as MPI is. */
typedef struct state {
  orphan *orphans;
  size_t norphans, cap;
} state;

typedef struct comm {
  MPI_Comm comm;  /* what operations use */
  MPI_Comm spare; /* only comm:reset() and split use it, so it stays in step */
  int rank, size;
  const char *stale; /* the interrupted collective that put comm out of step, or NULL */
  state *S;
} comm;

/* A value packed to send: the head, then a matrix's elements or encoded bytes. */
typedef struct packed {
  head h;
  lparM_storage *st; /* retained while the message may be in flight */
  const void *data;
  MPI_Datatype dtype; /* of the payload: MPI_DOUBLE, a vector type, or MPI_BYTE */
  int dcount;
  int own_dtype;
  lparB_buffer buf;
} packed;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int noop(lua_State *L) {
  (void)L;
  return 0;
}

/* Whether an interrupt came: a call runs the hook the engine's signal set. */
static int interrupted(lua_State *L) {
  lua_pushcfunction(L, noop);
  if (lua_pcall(L, 0, 0, 0) == LUA_OK) return 0;
  lua_pop(L, 1);
  return 1;
}

/*
** Between two polls: spin for 20 us, then yield for up to 20 ms (ranks that
** share cores get them, and a collective of a few ms loses nothing to a
** sleep), then sleep 100 us at a time.
*/
static void backoff(double started) {
  double t = now() - started;
  if (t < 20e-6) return;
  if (t < 20e-3) {
    sched_yield();
    return;
  }
  struct timespec ts = {0, 100000};
  nanosleep(&ts, NULL);
}

/* Wait for *r: 0 once done, 1 when interrupted first (*r still pending). */
static int poll_wait(lua_State *L, MPI_Request *r, MPI_Status *st) {
  double t0 = now();
  for (unsigned i = 0;; i++) {
    int flag = 0;
    MPI_Test(r, &flag, st ? st : MPI_STATUS_IGNORE);
    if (flag) return 0;
    if ((i & 15) == 15 && interrupted(L)) return 1;
    backoff(t0);
  }
}

static void hold_clear(hold *h) {
  for (int i = 0; i < 3; i++) lparM_storage_release(h->st[i]);
  free(h->mem);
  memset(h, 0, sizeof *h);
}

static int hold_gc(lua_State *L) {
  hold_clear(luaL_checkudata(L, 1, HOLD_METATABLE));
  return 0;
}

static hold *new_hold(lua_State *L) {
  hold *h = lua_newuserdatauv(L, sizeof *h, 0);
  memset(h, 0, sizeof *h);
  luaL_setmetatable(L, HOLD_METATABLE);
  return h;
}

/* A storage of at least `bytes` bytes, put in slot i of h. */
static void *hold_bytes(lua_State *L, hold *h, int i, size_t bytes) {
  lparM_storage *s = lparM_storage_new(bytes / sizeof(double) + 1);
  if (s == NULL) luaL_error(L, "lpar.mpi: out of memory (%zu bytes)", bytes);
  h->st[i] = s;
  return s->data;
}

/* A successful operation lets go of its memory now, not when the GC gets to the hold. */
static int done(hold *k, int nresults) {
  hold_clear(k);
  return nresults;
}

static void orphan_free(orphan *o) {
  if (o->type != MPI_DATATYPE_NULL) MPI_Type_free(&o->type);
  hold_clear(&o->h);
}

/* Let go of the orphans that have completed. */
static void reap(state *S) {
  size_t j = 0;
  for (size_t i = 0; i < S->norphans; i++) {
    int flag = 0;
    MPI_Test(&S->orphans[i].req, &flag, MPI_STATUS_IGNORE);
    if (flag)
      orphan_free(&S->orphans[i]);
    else
      S->orphans[j++] = S->orphans[i];
  }
  S->norphans = j;
}

/* Keep o until MPI is done with it; if even that fails, its memory leaks. */
static void adopt(state *S, orphan o) {
  if (S->norphans == S->cap) {
    size_t cap = S->cap ? 2 * S->cap : 8;
    orphan *p = realloc(S->orphans, cap * sizeof *p);
    if (p == NULL) return;
    S->orphans = p;
    S->cap = cap;
  }
  S->orphans[S->norphans++] = o;
}

static comm *check_comm(lua_State *L, int idx) {
  comm *c = luaL_checkudata(L, idx, COMM_METATABLE);
  if (c->comm == MPI_COMM_NULL) luaL_error(L, "lpar.mpi: use of a freed communicator");
  reap(c->S);
  return c;
}

/* A rank argument: nil means any (when `any` is allowed), else 0 .. size-1. */
static int check_rank(lua_State *L, comm *c, int idx, const char *what, int any) {
  if (any && lua_isnoneornil(L, idx)) return MPI_ANY_SOURCE;
  lua_Integer r = luaL_checkinteger(L, idx);
  if (r < 0 || r >= c->size)
    luaL_error(L, "lpar.mpi: %s %I is not a rank of this communicator (0..%d)", what, r, c->size - 1);
  return (int)r;
}

static int check_tag(lua_State *L, int idx, int any) {
  if (lua_isnoneornil(L, idx)) return any ? MPI_ANY_TAG : 0;
  lua_Integer t = luaL_checkinteger(L, idx);
  if (t < 0 || t > 32767) luaL_error(L, "lpar.mpi: tag %I is out of range (0..32767)", t);
  return (int)t;
}

/* ---- packing values ---------------------------------------------------- */

static void packed_free(packed *p) {
  if (p->own_dtype) MPI_Type_free(&p->dtype);
  p->own_dtype = 0;
  lparM_storage_release(p->st);
  p->st = NULL;
  lparB_free(&p->buf);
}

/* A matrix's elements as (data, datatype, count): a vector type for a strided view. */
static void matrix_payload(lua_State *L, const lparM_matrix *m, packed *p) {
  size_t n = m->rows * m->cols;
  if (n > INT_MAX || m->rows > INT_MAX || m->stride > INT_MAX)
    luaL_error(L, "lpar.mpi: a %zux%zu matrix is more than one MPI message can hold", m->rows,
               m->cols);
  p->data = n ? lparM_at(m, 0, 0) : m->st->data;
  if (lparM_contiguous(m) || n == 0) {
    p->dtype = MPI_DOUBLE;
    p->dcount = (int)n;
  } else {
    MPI_Type_vector((int)m->rows, (int)m->cols, (int)m->stride, MPI_DOUBLE, &p->dtype);
    MPI_Type_commit(&p->dtype);
    p->own_dtype = 1;
    p->dcount = 1;
  }
}

/* Pack the value at idx: a number in the head, a matrix as its elements, the rest encoded. */
static void pack(lua_State *L, int idx, packed *p, const char *root) {
  memset(p, 0, sizeof *p);
  lparB_init(&p->buf);
  p->dtype = MPI_BYTE;
  p->data = p->buf.data;
  lparM_matrix *m = lparM_test(L, idx);
  if (lua_isinteger(L, idx)) {
    p->h.kind = K_INT;
    p->h.inum = (int64_t)lua_tointeger(L, idx);
  } else if (lua_type(L, idx) == LUA_TNUMBER) {
    p->h.kind = K_FLOAT;
    p->h.num = lua_tonumber(L, idx);
  } else if (lua_isnoneornil(L, idx)) {
    p->h.kind = K_NIL;
  } else if (m) {
    p->h.kind = K_MATRIX;
    p->h.rows = (int64_t)m->rows;
    p->h.cols = (int64_t)m->cols;
    matrix_payload(L, m, p);
    p->st = m->st;
    lparM_storage_retain(p->st);
  } else {
    char err[512];
    if (lparS_encode(L, idx, 1, root, &p->buf, err, sizeof err) < 0) {
      lparB_free(&p->buf);
      luaL_error(L, "lpar.mpi: %s", err);
    }
    if (p->buf.len > INT_MAX) {
      lparB_free(&p->buf);
      luaL_error(L, "lpar.mpi: %s is %zu bytes encoded, more than one MPI message can hold", root,
                 p->buf.len);
    }
    p->h.kind = K_VALUE;
    p->h.rows = (int64_t)p->buf.len;
    p->data = p->buf.data;
    p->dcount = (int)p->buf.len;
  }
}

/* Decode `len` encoded bytes and push the one value; raises on bad bytes. */
static void push_decoded(lua_State *L, const void *data, size_t len, const char *what) {
  char err[512];
  int count = 0;
  if (lparS_decode(L, data, len, 0, &count, err, sizeof err) < 0)
    luaL_error(L, "lpar.mpi: %s: %s (functions do not travel over MPI: data only)", what, err);
  if (count != 1) {
    lua_pop(L, count);
    luaL_error(L, "lpar.mpi: %s: expected one value, the message held %d", what, count);
  }
}

/* Struct datatype over absolute addresses: the head, then the payload. */
static MPI_Datatype message_type(const head *h, const void *data, MPI_Datatype dtype, int dcount) {
  MPI_Aint at[2];
  int len[2] = {(int)sizeof *h, dcount};
  MPI_Datatype types[2] = {MPI_BYTE, dtype};
  MPI_Get_address(h, &at[0]);
  MPI_Get_address(data ? data : h, &at[1]);
  MPI_Datatype t;
  MPI_Type_create_struct(dcount > 0 ? 2 : 1, len, at, types, &t);
  MPI_Type_commit(&t);
  return t;
}

/* ---- point to point ---------------------------------------------------- */

typedef struct request {
  MPI_Request req;
  int recv; /* an irecv: nothing posted yet, a probe on each test */
  comm *c;
  int src, tag;
  int into; /* registry ref of the matrix to receive into, or LUA_NOREF */
  int result; /* registry ref of the received value, once done */
  int rsrc, rtag;
  int done;
  /* an isend's buffers */
  packed p;
  head h;
  MPI_Datatype type;
  int comm_ref; /* keeps the communicator alive */
} request;

static void post_send(lua_State *L, comm *c, int idx, int dest, int tag, request *q) {
  pack(L, idx, &q->p, "value");
  q->h = q->p.h;
  q->type = message_type(&q->h, q->p.data, q->p.dtype, q->p.dcount);
  int rc = MPI_Isend(MPI_BOTTOM, 1, q->type, dest, tag, c->comm, &q->req);
  if (rc != MPI_SUCCESS) {
    MPI_Type_free(&q->type);
    packed_free(&q->p);
    luaL_error(L, "lpar.mpi: send to rank %d failed (MPI error %d)", dest, rc);
  }
}

static void finish_send(request *q) {
  if (q->type != MPI_DATATYPE_NULL) MPI_Type_free(&q->type);
  packed_free(&q->p);
  q->done = 1;
}

/* Hand a pending send to the orphans (its buffers stay until MPI lets go). */
static void abandon_send(request *q) {
  if (q->req == MPI_REQUEST_NULL) { /* it had completed */
    finish_send(q);
    return;
  }
  MPI_Cancel(&q->req);
  orphan o = {.req = q->req, .type = q->type, .h = {.st = {q->p.st}, .mem = q->p.buf.data}};
  q->p.st = NULL;
  q->p.buf.data = NULL;
  q->p.buf.len = q->p.buf.cap = 0;
  q->type = MPI_DATATYPE_NULL;
  if (q->p.own_dtype) MPI_Type_free(&q->p.dtype); /* the struct type holds its own */
  q->p.own_dtype = 0;
  adopt(q->c->S, o);
  q->req = MPI_REQUEST_NULL;
  q->done = 1;
}

/* Push the value a head describes, its payload in s (bytes of it). */
static void push_head_value(lua_State *L, const head *h, lparM_storage *s, size_t bytes, int from,
                            const char *what) {
  switch (h->kind) {
  case K_FLOAT: lua_pushnumber(L, h->num); return;
  case K_INT: lua_pushinteger(L, (lua_Integer)h->inum); return;
  case K_NIL: lua_pushnil(L); return;
  case K_MATRIX:
    if (h->rows < 0 || h->cols < 0 || (size_t)h->rows * (size_t)h->cols * sizeof(double) != bytes)
      luaL_error(L, "lpar.mpi: %s: a malformed matrix message from rank %d", what, from);
    lparM_push(L, s, (size_t)h->rows, (size_t)h->cols);
    return;
  case K_VALUE:
    if (h->rows < 0 || (size_t)h->rows != bytes)
      luaL_error(L, "lpar.mpi: %s: a malformed message from rank %d", what, from);
    push_decoded(L, s->data, bytes, what);
    return;
  default: luaL_error(L, "lpar.mpi: %s: a message of unknown kind from rank %d", what, from);
  }
}

/*
** Receive the matched message into the matrix at `into` (0: none) or a fresh
** value, and push it. The message is consumed even when it does not fit.
*/
static void receive_matched(lua_State *L, MPI_Message *msg, MPI_Status *st, int into) {
  int bytes = 0;
  MPI_Get_count(st, MPI_BYTE, &bytes);
  if (bytes < (int)sizeof(head)) {
    MPI_Mrecv(NULL, 0, MPI_BYTE, msg, MPI_STATUS_IGNORE);
    luaL_error(L, "lpar.mpi: a message of %d bytes from rank %d is not from lpar.mpi", bytes,
               st->MPI_SOURCE);
  }
  size_t payload = (size_t)bytes - sizeof(head);
  head h;
  lparM_matrix *m = into ? lparM_check(L, into) : NULL;
  if (m && payload == m->rows * m->cols * sizeof(double)) {
    if (lparM_will_write(m->st) < 0) luaL_error(L, "lpar.mpi: out of memory");
    packed p = {.dtype = MPI_BYTE};
    lparB_init(&p.buf);
    matrix_payload(L, m, &p);
    MPI_Datatype t = message_type(&h, p.data, p.dtype, p.dcount);
    MPI_Mrecv(MPI_BOTTOM, 1, t, msg, MPI_STATUS_IGNORE);
    MPI_Type_free(&t);
    packed_free(&p);
    if (h.kind != K_MATRIX)
      luaL_error(L, "lpar.mpi: recv into a matrix: rank %d sent no matrix", st->MPI_SOURCE);
    if ((size_t)h.rows != m->rows || (size_t)h.cols != m->cols)
      luaL_error(L, "lpar.mpi: recv into a %zux%zu matrix: rank %d sent a %dx%d one", m->rows,
                 m->cols, st->MPI_SOURCE, (int)h.rows, (int)h.cols);
    lua_pushvalue(L, into);
    return;
  }
  /* A fresh storage holds any payload: a matrix's elements or encoded bytes. */
  hold *k = new_hold(L);
  lparM_storage *s = lparM_storage_new((payload + sizeof(double) - 1) / sizeof(double));
  if (s == NULL) {
    MPI_Mrecv(NULL, 0, MPI_BYTE, msg, MPI_STATUS_IGNORE);
    luaL_error(L, "lpar.mpi: out of memory receiving %zu bytes", payload);
  }
  k->st[0] = s;
  MPI_Datatype t = message_type(&h, s->data, MPI_BYTE, (int)payload);
  MPI_Mrecv(MPI_BOTTOM, 1, t, msg, MPI_STATUS_IGNORE);
  MPI_Type_free(&t);
  if (m)
    luaL_error(L, "lpar.mpi: recv into a %zux%zu matrix: rank %d sent %s", m->rows, m->cols,
               st->MPI_SOURCE, h.kind == K_MATRIX ? "a matrix of another size" : "no matrix");
  push_head_value(L, &h, s, payload, st->MPI_SOURCE, "recv");
  hold_clear(k); /* a pushed matrix holds its own reference */
  lua_remove(L, -2);
}

/* Probe once (or until matched, when `block`); 1 and the value pushed when received. */
static int try_recv(lua_State *L, comm *c, int src, int tag, int into, int block, int *rsrc,
                    int *rtag) {
  double t0 = now();
  for (unsigned i = 0;; i++) {
    int flag = 0;
    MPI_Message msg;
    MPI_Status st;
    MPI_Improbe(src, tag, c->comm, &flag, &msg, &st);
    if (flag) {
      *rsrc = st.MPI_SOURCE;
      *rtag = st.MPI_TAG;
      receive_matched(L, &msg, &st, into);
      return 1;
    }
    if (!block) return 0;
    if ((i & 15) == 15 && interrupted(L)) luaL_error(L, "interrupted");
    backoff(t0);
  }
}

/* comm:send(v, dest, tag?): send v (a number, a matrix, any data) to rank dest. */
static int l_send(lua_State *L) {
  comm *c = check_comm(L, 1);
  int dest = check_rank(L, c, 3, "dest", 0);
  int tag = check_tag(L, 4, 0);
  request q = {.c = c, .type = MPI_DATATYPE_NULL};
  post_send(L, c, 2, dest, tag, &q);
  if (poll_wait(L, &q.req, NULL)) {
    abandon_send(&q);
    return luaL_error(L, "interrupted");
  }
  finish_send(&q);
  return 0;
}

/* comm:recv(src?, tag?, into?): the value, its source and tag (nil: any). */
static int l_recv(lua_State *L) {
  comm *c = check_comm(L, 1);
  int src = check_rank(L, c, 2, "src", 1);
  int tag = check_tag(L, 3, 1);
  int into = lua_isnoneornil(L, 4) ? 0 : 4;
  if (into) lparM_check(L, into);
  int rsrc, rtag;
  try_recv(L, c, src, tag, into, 1, &rsrc, &rtag);
  lua_pushinteger(L, rsrc);
  lua_pushinteger(L, rtag);
  return 3;
}

static int request_gc(lua_State *L) {
  request *q = luaL_checkudata(L, 1, REQUEST_METATABLE);
  if (!q->recv && !q->done) abandon_send(q); /* dropped while pending: keep its buffers */
  luaL_unref(L, LUA_REGISTRYINDEX, q->into);
  luaL_unref(L, LUA_REGISTRYINDEX, q->result);
  luaL_unref(L, LUA_REGISTRYINDEX, q->comm_ref);
  q->into = q->result = q->comm_ref = LUA_NOREF;
  return 0;
}

static request *new_request(lua_State *L, comm *c, int recv) {
  request *q = lua_newuserdatauv(L, sizeof *q, 0);
  memset(q, 0, sizeof *q);
  q->c = c;
  q->recv = recv;
  q->req = MPI_REQUEST_NULL;
  q->type = MPI_DATATYPE_NULL;
  q->into = q->result = LUA_NOREF;
  lua_pushvalue(L, 1);
  q->comm_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  luaL_setmetatable(L, REQUEST_METATABLE);
  return q;
}

/* comm:sendrecv(v, dest, sendtag?, src?, recvtag?, into?): send and receive at once. */
static int l_sendrecv(lua_State *L) {
  comm *c = check_comm(L, 1);
  int dest = check_rank(L, c, 3, "dest", 0);
  int stag = check_tag(L, 4, 0);
  int src = check_rank(L, c, 5, "src", 1);
  int rtag = check_tag(L, 6, 1);
  int into = lua_isnoneornil(L, 7) ? 0 : 7;
  if (into) lparM_check(L, into);
  request *q = new_request(L, c, 0); /* its __gc keeps a pending send's buffers */
  post_send(L, c, 2, dest, stag, q);
  int gsrc = 0, gtag = 0;
  double t0 = now();
  for (unsigned i = 0;; i++) {
    int flag = 0;
    MPI_Message msg;
    MPI_Status st;
    MPI_Improbe(src, rtag, c->comm, &flag, &msg, &st);
    if (flag) {
      gsrc = st.MPI_SOURCE;
      gtag = st.MPI_TAG;
      receive_matched(L, &msg, &st, into);
      break;
    }
    MPI_Test(&q->req, &flag, MPI_STATUS_IGNORE); /* progress the send too */
    if ((i & 15) == 15 && interrupted(L)) {
      abandon_send(q);
      return luaL_error(L, "interrupted");
    }
    backoff(t0);
  }
  if (poll_wait(L, &q->req, NULL)) {
    abandon_send(q);
    return luaL_error(L, "interrupted");
  }
  finish_send(q);
  lua_pushinteger(L, gsrc);
  lua_pushinteger(L, gtag);
  return 3;
}

/* comm:isend(v, dest, tag?): a request; v's storage is kept until it completes. */
static int l_isend(lua_State *L) {
  comm *c = check_comm(L, 1);
  int dest = check_rank(L, c, 3, "dest", 0);
  int tag = check_tag(L, 4, 0);
  request *q = new_request(L, c, 0);
  post_send(L, c, 2, dest, tag, q);
  return 1;
}

/* comm:irecv(src?, tag?, into?): a request; req:wait() returns the value, source, tag. */
static int l_irecv(lua_State *L) {
  comm *c = check_comm(L, 1);
  int src = check_rank(L, c, 2, "src", 1);
  int tag = check_tag(L, 3, 1);
  if (!lua_isnoneornil(L, 4)) lparM_check(L, 4);
  request *q = new_request(L, c, 1);
  q->src = src;
  q->tag = tag;
  if (!lua_isnoneornil(L, 4)) {
    lua_pushvalue(L, 4);
    q->into = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  return 1;
}

static int request_results(lua_State *L, request *q) {
  if (!q->recv) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, q->result);
  lua_pushinteger(L, q->rsrc);
  lua_pushinteger(L, q->rtag);
  return 3;
}

/* One step of a request: 1 once done. */
static int request_step(lua_State *L, request *q, int block) {
  if (q->done) return 1;
  if (q->recv) {
    int into = 0;
    if (q->into != LUA_NOREF) {
      lua_rawgeti(L, LUA_REGISTRYINDEX, q->into);
      into = lua_gettop(L);
    }
    if (!try_recv(L, q->c, q->src, q->tag, into, block, &q->rsrc, &q->rtag)) return 0;
    q->result = luaL_ref(L, LUA_REGISTRYINDEX);
    q->done = 1;
    return 1;
  }
  int flag = 0;
  if (block) {
    if (poll_wait(L, &q->req, NULL)) luaL_error(L, "interrupted"); /* still pending: wait again */
    flag = 1;
  } else {
    MPI_Test(&q->req, &flag, MPI_STATUS_IGNORE);
  }
  if (flag) finish_send(q);
  return flag;
}

/* req:wait(): true for an isend; the value, source and tag for an irecv. */
static int l_request_wait(lua_State *L) {
  request *q = luaL_checkudata(L, 1, REQUEST_METATABLE);
  request_step(L, q, 1);
  return request_results(L, q);
}

/* req:test(): false while pending, else what wait returns. */
static int l_request_test(lua_State *L) {
  request *q = luaL_checkudata(L, 1, REQUEST_METATABLE);
  if (!request_step(L, q, 0)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  return request_results(L, q);
}

/* ---- collectives ------------------------------------------------------- */

static void check_in_step(lua_State *L, comm *c, const char *op) {
  if (c->stale)
    luaL_error(L,
               "lpar.mpi: %s: an interrupted %s left this communicator out of step (MPI cannot "
               "cancel a collective); call reset() on every rank of it first",
               op, c->stale);
}

/*
** Wait for a collective whose memory is in k. Interrupted, an orphan takes
** k's contents (MPI may still write there), the communicator is marked out
** of step, and "interrupted" is raised.
*/
static void collective_wait(lua_State *L, comm *c, const char *op, MPI_Request *r, hold *k) {
  if (!poll_wait(L, r, NULL)) return;
  adopt(c->S, (orphan){.req = *r, .type = MPI_DATATYPE_NULL, .h = *k});
  memset(k, 0, sizeof *k);
  c->stale = op;
  luaL_error(L, "interrupted");
}

/* comm:barrier() */
static int l_barrier(lua_State *L) {
  comm *c = check_comm(L, 1);
  check_in_step(L, c, "barrier");
  hold *k = new_hold(L);
  MPI_Request r;
  MPI_Ibarrier(c->comm, &r);
  collective_wait(L, c, "barrier", &r, k);
  return done(k, 0);
}

static MPI_Op check_op(lua_State *L, int idx) {
  static const char *const names[] = {"sum", "prod", "max", "min", NULL};
  switch (luaL_checkoption(L, idx, "sum", names)) {
  case 0: return MPI_SUM;
  case 1: return MPI_PROD;
  case 2: return MPI_MAX;
  default: return MPI_MIN;
  }
}

/*
** reduce, and allreduce (root < 0): numbers and matrices, elementwise.
** Every rank passes the same kind and shape, as MPI itself requires.
*/
static int reduce_common(lua_State *L, comm *c, const char *name, int root) {
  MPI_Op op = check_op(L, 3);
  int here = root < 0 || root == c->rank;
  hold *k = new_hold(L);
  MPI_Request r;
  if (lua_type(L, 2) == LUA_TNUMBER) {
    int isint = lua_isinteger(L, 2);
    MPI_Datatype t = isint ? MPI_INT64_T : MPI_DOUBLE;
    union num { int64_t i; double d; } *in = hold_bytes(L, k, 0, 2 * sizeof *in), *out = in + 1;
    if (isint)
      in->i = (int64_t)lua_tointeger(L, 2);
    else
      in->d = lua_tonumber(L, 2);
    if (root < 0)
      MPI_Iallreduce(in, out, 1, t, op, c->comm, &r);
    else
      MPI_Ireduce(in, out, 1, t, op, root, c->comm, &r);
    collective_wait(L, c, name, &r, k);
    if (!here) return done(k, 0);
    if (isint)
      lua_pushinteger(L, (lua_Integer)out->i);
    else
      lua_pushnumber(L, out->d);
    return done(k, 1);
  }
  lparM_matrix *m = lparM_test(L, 2);
  if (m == NULL)
    return luaL_error(L, "lpar.mpi: %s: expected a number or a matrix, got %s", name,
                      luaL_typename(L, 2));
  size_t n = m->rows * m->cols;
  if (n > INT_MAX) return luaL_error(L, "lpar.mpi: %s: the matrix is too large for MPI", name);
  /* MPI reduces contiguous buffers: a strided view goes through a copy. */
  const double *src;
  if (lparM_contiguous(m) || n == 0) {
    src = n ? lparM_at(m, 0, 0) : m->st->data;
    k->st[0] = m->st;
    lparM_storage_retain(m->st);
  } else {
    double *copy = hold_bytes(L, k, 0, n * sizeof(double));
    for (size_t i = 0; i < m->rows; i++)
      memcpy(copy + i * m->cols, lparM_at(m, i, 0), m->cols * sizeof(double));
    src = copy;
  }
  double *out = here ? hold_bytes(L, k, 1, n * sizeof(double)) : NULL;
  if (root < 0)
    MPI_Iallreduce(src, out, (int)n, MPI_DOUBLE, op, c->comm, &r);
  else
    MPI_Ireduce(src, out, (int)n, MPI_DOUBLE, op, root, c->comm, &r);
  collective_wait(L, c, name, &r, k);
  if (!here) return done(k, 0);
  lparM_push(L, k->st[1], m->rows, m->cols);
  return done(k, 1);
}

/* comm:allreduce(v, op?): v combined over all ranks ("sum", "prod", "max", "min"). */
static int l_allreduce(lua_State *L) {
  comm *c = check_comm(L, 1);
  check_in_step(L, c, "allreduce");
  return reduce_common(L, c, "allreduce", -1);
}

/* comm:reduce(v, op?, root?): the combination on root, nothing elsewhere. */
static int l_reduce(lua_State *L) {
  comm *c = check_comm(L, 1);
  check_in_step(L, c, "reduce");
  int root = lua_isnoneornil(L, 4) ? 0 : check_rank(L, c, 4, "root", 0);
  return reduce_common(L, c, "reduce", root);
}

/*
** comm:bcast(v, root?): root's v on every rank. A non-root that passes a
** matrix of the same shape receives into it. Two steps: the head (kind and
** size), then the payload, straight from and into matrices' storage.
*/
static int l_bcast(lua_State *L) {
  comm *c = check_comm(L, 1);
  check_in_step(L, c, "bcast");
  int root = lua_isnoneornil(L, 3) ? 0 : check_rank(L, c, 3, "root", 0);
  hold *k = new_hold(L);
  head *h = hold_bytes(L, k, 0, sizeof *h);
  MPI_Request r;
  if (c->rank == root) {
    packed p;
    pack(L, 2, &p, "value");
    *h = p.h;
    k->st[1] = p.st; /* the hold owns p's memory from here */
    k->mem = p.buf.data;
    MPI_Ibcast(h, (int)sizeof *h, MPI_BYTE, root, c->comm, &r);
    collective_wait(L, c, "bcast", &r, k);
    if (p.dcount > 0) {
      MPI_Ibcast((void *)p.data, p.dcount, p.dtype, root, c->comm, &r);
      if (p.own_dtype) MPI_Type_free(&p.dtype); /* MPI keeps it while the operation runs */
      collective_wait(L, c, "bcast", &r, k);
    } else if (p.own_dtype) {
      MPI_Type_free(&p.dtype);
    }
    lua_pushvalue(L, 2);
    return done(k, 1);
  }
  MPI_Ibcast(h, (int)sizeof *h, MPI_BYTE, root, c->comm, &r);
  collective_wait(L, c, "bcast", &r, k);
  if (h->kind != K_MATRIX && h->kind != K_VALUE) {
    push_head_value(L, h, NULL, 0, root, "bcast");
    return done(k, 1);
  }
  if (h->rows < 0 || h->cols < 0 || h->rows > INT_MAX || (h->kind == K_MATRIX && h->rows * h->cols > INT_MAX))
    return luaL_error(L, "lpar.mpi: bcast: a malformed head from the root");
  size_t count = h->kind == K_MATRIX ? (size_t)(h->rows * h->cols) : (size_t)h->rows;
  lparM_matrix *into = h->kind == K_MATRIX ? lparM_test(L, 2) : NULL;
  if (into && (into->rows != (size_t)h->rows || into->cols != (size_t)h->cols)) into = NULL;
  packed p = {.dtype = MPI_BYTE};
  if (into) {
    if (lparM_will_write(into->st) < 0) return luaL_error(L, "lpar.mpi: out of memory");
    matrix_payload(L, into, &p);
    k->st[1] = into->st;
    lparM_storage_retain(into->st);
  } else {
    p.data = hold_bytes(L, k, 1, count * (h->kind == K_MATRIX ? sizeof(double) : 1));
    p.dtype = h->kind == K_MATRIX ? MPI_DOUBLE : MPI_BYTE;
    p.dcount = (int)count;
  }
  if (p.dcount > 0) {
    MPI_Ibcast((void *)p.data, p.dcount, p.dtype, root, c->comm, &r);
    if (p.own_dtype) MPI_Type_free(&p.dtype);
    collective_wait(L, c, "bcast", &r, k);
  }
  if (into)
    lua_pushvalue(L, 2);
  else
    push_head_value(L, h, k->st[1], h->kind == K_MATRIX ? count * sizeof(double) : count, root,
                    "bcast");
  return done(k, 1);
}

/* Encode the value at idx into k->mem; its length. */
static int encode_into(lua_State *L, int idx, hold *k, const char *root) {
  lparB_buffer b;
  char err[512];
  lparB_init(&b);
  if (lparS_encode(L, idx, 1, root, &b, err, sizeof err) < 0) {
    lparB_free(&b);
    luaL_error(L, "lpar.mpi: %s", err);
  }
  free(k->mem);
  k->mem = b.data;
  if (b.len > INT_MAX) luaL_error(L, "lpar.mpi: %s is too large for one MPI message", root);
  return (int)b.len;
}

/* Offsets of the pieces of the given sizes, into displs; the total. */
static int offsets(lua_State *L, const int *sizes, int *displs, int n) {
  size_t total = 0;
  for (int i = 0; i < n; i++) {
    if (sizes[i] < 0) luaL_error(L, "lpar.mpi: a malformed size from rank %d", i);
    displs[i] = (int)total;
    total += (size_t)sizes[i];
    if (total > INT_MAX) luaL_error(L, "lpar.mpi: more than 2 GiB to gather in one message");
  }
  return (int)total;
}

/* Push the n values encoded in data at displs/sizes as a list (a table). */
static void push_list(lua_State *L, const char *data, const int *sizes, const int *displs, int n,
                      const char *what) {
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    push_decoded(L, data + displs[i], (size_t)sizes[i], what);
    lua_rawseti(L, -2, i + 1);
  }
}

/* gather (root >= 0) and allgather (root < 0): everyone's value, in rank order. */
static int gather_common(lua_State *L, comm *c, const char *name, int root) {
  int here = root < 0 || root == c->rank;
  hold *k = new_hold(L);
  int len = encode_into(L, 2, k, "value");
  int *sizes = hold_bytes(L, k, 0, 2 * (size_t)c->size * sizeof(int) + sizeof(int));
  int *displs = sizes + c->size, *mine = displs + c->size;
  *mine = len;
  MPI_Request r;
  if (root < 0)
    MPI_Iallgather(mine, 1, MPI_INT, sizes, 1, MPI_INT, c->comm, &r);
  else
    MPI_Igather(mine, 1, MPI_INT, sizes, 1, MPI_INT, root, c->comm, &r);
  collective_wait(L, c, name, &r, k);
  char *all = NULL;
  if (here) all = hold_bytes(L, k, 1, (size_t)offsets(L, sizes, displs, c->size));
  if (root < 0)
    MPI_Iallgatherv(k->mem, len, MPI_BYTE, all, sizes, displs, MPI_BYTE, c->comm, &r);
  else
    MPI_Igatherv(k->mem, len, MPI_BYTE, all, sizes, displs, MPI_BYTE, root, c->comm, &r);
  collective_wait(L, c, name, &r, k);
  if (!here) return done(k, 0);
  push_list(L, all, sizes, displs, c->size, name);
  return done(k, 1);
}

/* comm:gather(v, root?): on root, the list of every rank's v (rank r at [r + 1]). */
static int l_gather(lua_State *L) {
  comm *c = check_comm(L, 1);
  check_in_step(L, c, "gather");
  int root = lua_isnoneornil(L, 3) ? 0 : check_rank(L, c, 3, "root", 0);
  return gather_common(L, c, "gather", root);
}

/* comm:allgather(v): the list of every rank's v, on every rank. */
static int l_allgather(lua_State *L) {
  comm *c = check_comm(L, 1);
  check_in_step(L, c, "allgather");
  return gather_common(L, c, "allgather", -1);
}

/* comm:scatter(list, root?): rank r gets root's list[r + 1]. */
static int l_scatter(lua_State *L) {
  comm *c = check_comm(L, 1);
  check_in_step(L, c, "scatter");
  int root = lua_isnoneornil(L, 3) ? 0 : check_rank(L, c, 3, "root", 0);
  hold *k = new_hold(L);
  int *sizes = hold_bytes(L, k, 0, 2 * (size_t)c->size * sizeof(int) + sizeof(int));
  int *displs = sizes + c->size, *mine = displs + c->size;
  if (c->rank == root) {
    luaL_checktype(L, 2, LUA_TTABLE);
    if (luaL_len(L, 2) != c->size)
      return luaL_error(L, "lpar.mpi: scatter: the list has %d items for %d ranks",
                        (int)luaL_len(L, 2), c->size);
    lparB_buffer b;
    char err[512], path[32];
    lparB_init(&b);
    for (int i = 0; i < c->size; i++) {
      size_t before = b.len;
      lua_rawgeti(L, 2, i + 1);
      snprintf(path, sizeof path, "list[%d]", i + 1);
      int rc = lparS_encode(L, lua_gettop(L), 1, path, &b, err, sizeof err);
      lua_pop(L, 1);
      if (rc < 0 || b.len > INT_MAX) {
        lparB_free(&b);
        return luaL_error(L, "lpar.mpi: scatter: %s", rc < 0 ? err : "more than 2 GiB");
      }
      sizes[i] = (int)(b.len - before);
    }
    k->mem = b.data;
    offsets(L, sizes, displs, c->size);
  }
  MPI_Request r;
  MPI_Iscatter(sizes, 1, MPI_INT, mine, 1, MPI_INT, root, c->comm, &r);
  collective_wait(L, c, "scatter", &r, k);
  if (*mine < 0) return luaL_error(L, "lpar.mpi: scatter: a malformed size from the root");
  char *piece = hold_bytes(L, k, 1, (size_t)*mine);
  MPI_Iscatterv(k->mem, sizes, displs, MPI_BYTE, piece, *mine, MPI_BYTE, root, c->comm, &r);
  collective_wait(L, c, "scatter", &r, k);
  push_decoded(L, piece, (size_t)*mine, "scatter");
  return done(k, 1);
}

/* ---- communicators ----------------------------------------------------- */

static comm *push_comm(lua_State *L, state *S, MPI_Comm mc, MPI_Comm spare) {
  comm *c = lua_newuserdatauv(L, sizeof *c, 0);
  memset(c, 0, sizeof *c);
  c->comm = mc;
  c->spare = spare;
  c->S = S;
  MPI_Comm_rank(mc, &c->rank);
  MPI_Comm_size(mc, &c->size);
  luaL_setmetatable(L, COMM_METATABLE);
  return c;
}

/* Duplicate `from` (a collective), polling; raises "interrupted" and marks c. */
static MPI_Comm dup_polled(lua_State *L, comm *c, MPI_Comm from, const char *op) {
  MPI_Comm out;
  MPI_Request r;
  hold *k = new_hold(L);
  MPI_Comm_idup(from, &out, &r);
  collective_wait(L, c, op, &r, k);
  lua_pop(L, 1);
  return out;
}

/*
** comm:split(color, key?): the communicator of the ranks that passed the
** same color, ordered by key (then rank); a rank passing a negative color
** gets nil. A barrier first (polled, so interruptible): the split itself
** blocks, but only once every rank has reached it.
*/
static int l_split(lua_State *L) {
  comm *c = check_comm(L, 1);
  check_in_step(L, c, "split");
  lua_Integer color = luaL_checkinteger(L, 2);
  lua_Integer key = luaL_optinteger(L, 3, c->rank);
  if (color > INT_MAX || key < INT_MIN || key > INT_MAX)
    return luaL_error(L, "lpar.mpi: split: color and key must fit in an int");
  hold *k = new_hold(L);
  MPI_Request r;
  MPI_Ibarrier(c->comm, &r);
  collective_wait(L, c, "split", &r, k);
  MPI_Comm out;
  MPI_Comm_split(c->comm, color < 0 ? MPI_UNDEFINED : (int)color, (int)key, &out);
  if (out == MPI_COMM_NULL) {
    lua_pushnil(L);
    return 1;
  }
  MPI_Comm spare;
  MPI_Comm_dup(out, &spare); /* its members have all just split: this does not wait long */
  push_comm(L, c->S, out, spare);
  return 1;
}

/*
** comm:reset(): on every rank of comm together, after an interrupted
** collective: a fresh communicator (from the spare) replaces the one out of
** step. Messages sent on the old one and not yet received are lost.
*/
static int l_reset(lua_State *L) {
  comm *c = check_comm(L, 1);
  MPI_Comm fresh = dup_polled(L, c, c->spare, "reset");
  c->comm = fresh; /* the old one is not freed: orphans may still use it */
  c->stale = NULL;
  return 0;
}

static int comm_index(lua_State *L) {
  comm *c = luaL_checkudata(L, 1, COMM_METATABLE);
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "rank") == 0) {
    lua_pushinteger(L, c->rank);
    return 1;
  }
  if (strcmp(k, "size") == 0) {
    lua_pushinteger(L, c->size);
    return 1;
  }
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

static int comm_tostring(lua_State *L) {
  comm *c = luaL_checkudata(L, 1, COMM_METATABLE);
  lua_pushfstring(L, "lpar.mpi communicator (rank %d of %d%s)", c->rank, c->size,
                  c->stale ? ", out of step" : "");
  return 1;
}

static const luaL_Reg comm_methods[] = {
  {"send", l_send},         {"recv", l_recv},           {"sendrecv", l_sendrecv},
  {"isend", l_isend},       {"irecv", l_irecv},         {"barrier", l_barrier},
  {"bcast", l_bcast},       {"reduce", l_reduce},       {"allreduce", l_allreduce},
  {"gather", l_gather},     {"scatter", l_scatter},     {"allgather", l_allgather},
  {"split", l_split},       {"reset", l_reset},         {NULL, NULL}};

/* mpi.f(...) is mpi.world:f(...). */
static int world_call(lua_State *L) {
  lua_pushvalue(L, lua_upvalueindex(2)); /* the world */
  lua_insert(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1)); /* the method */
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

static int state_gc(lua_State *L) {
  state *S = lua_touserdata(L, 1);
  free(S->orphans);
  S->orphans = NULL;
  S->norphans = S->cap = 0;
  int done = 0;
  MPI_Finalized(&done);
  /* Finalize only when nothing is pending: it would wait for peers that may be gone. */
  if (!done) MPI_Finalize();
  return 0;
}

/* Why MPI cannot start here, or NULL. */
static const char *not_under_mpi(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_getfield(L, -1, "lpar.engine");
  int engine = !lua_isnil(L, -1);
  lua_pop(L, 2);
  if (engine) {
    const char *v = getenv("LPAR_MPI");
    if (v == NULL || strcmp(v, "1") != 0)
      return "this engine was not started under MPI: start the cluster with the MPI launcher "
             "(lpar cluster start --launcher mpi -n N, or lpar.Cluster{launcher = \"mpi\", n = N})";
    return NULL;
  }
  if (!getenv("OMPI_COMM_WORLD_SIZE") && !getenv("PMIX_RANK") && !getenv("PMI_RANK"))
    return "not started by mpiexec (no OMPI_COMM_WORLD_SIZE, PMIX_RANK or PMI_RANK in the "
           "environment): engines get MPI from the MPI launcher (lpar cluster start --launcher mpi)";
  return NULL;
}

int luaopen_lpar_mpi(lua_State *L);

int luaopen_lpar_mpi(lua_State *L) {
  const char *why = not_under_mpi(L);
  if (why) return luaL_error(L, "lpar.mpi: %s", why);
  int inited = 0;
  MPI_Initialized(&inited);
  if (inited) return luaL_error(L, "lpar.mpi: MPI was already started in this process by someone else");
  int provided;
  if (MPI_Init_thread(NULL, NULL, MPI_THREAD_SINGLE, &provided) != MPI_SUCCESS)
    return luaL_error(L, "lpar.mpi: MPI_Init failed");
  /* Failures come back as codes; each operation says what failed. */
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);

  luaL_newmetatable(L, HOLD_METATABLE);
  lua_pushcfunction(L, hold_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, REQUEST_METATABLE);
  lua_pushcfunction(L, request_gc);
  lua_setfield(L, -2, "__gc");
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, l_request_wait);
  lua_setfield(L, -2, "wait");
  lua_pushcfunction(L, l_request_test);
  lua_setfield(L, -2, "test");
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newmetatable(L, COMM_METATABLE);
  lua_pushcfunction(L, comm_index);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, comm_tostring);
  lua_setfield(L, -2, "__tostring");
  luaL_newlib(L, comm_methods);
  lua_setfield(L, -2, "methods");
  lua_pop(L, 1);

  /* The state finalizes MPI when the Lua state closes (the engine exits). */
  state *S = lua_newuserdatauv(L, sizeof *S, 0);
  memset(S, 0, sizeof *S);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, state_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &STATE_KEY);

  MPI_Comm world, spare;
  MPI_Comm_dup(MPI_COMM_WORLD, &world);
  MPI_Comm_dup(MPI_COMM_WORLD, &spare);
  lua_createtable(L, 0, 24);
  comm *w = push_comm(L, S, world, spare);
  lua_setfield(L, -2, "world");
  for (const luaL_Reg *f = comm_methods; f->name; f++) {
    lua_pushcfunction(L, f->func);
    lua_getfield(L, -2, "world");
    lua_pushcclosure(L, world_call, 2);
    lua_setfield(L, -2, f->name);
  }
  lua_pushinteger(L, w->rank);
  lua_setfield(L, -2, "rank");
  lua_pushinteger(L, w->size);
  lua_setfield(L, -2, "size");
  char version[MPI_MAX_LIBRARY_VERSION_STRING];
  int vlen = 0;
  MPI_Get_library_version(version, &vlen);
  lua_pushlstring(L, version, (size_t)vlen);
  lua_setfield(L, -2, "library");
  return 1;
}
