/*
** engine.c: lpar-engine, one Lua 5.4 state serving requests over fd 3.
**
** The engine is a plain blocking loop: read a frame, run it, write the
** reply. Nothing else shares the process, so blocking I/O is the fastest
** path and needs no event loop. It exits on EOF (its controller went away)
** and, through PR_SET_PDEATHSIG, when its parent dies while it is busy.
*/
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "engine.h"
#include "funcache.h"
#include "lpar.h"
#include "matrix.h"
#include "paths.h"
#include "serialize.h"
#include "shm.h"
#include "wire.h"

static int env_int(const char *name, int fallback) {
  const char *s = getenv(name);
  return s && *s ? atoi(s) : fallback;
}

/*
** The Lua allocator, capped at LPAR_MEM_LIMIT bytes when set: past it an
** allocation fails, so the task raises "not enough memory" and fails, and
** the engine (its state intact) goes on serving. Matrices' storage is
** allocated outside Lua and not counted.
*/
static int panic(lua_State *L) {
  const char *msg = lua_tostring(L, -1);
  fprintf(stderr, "lpar-engine: unprotected error: %s\n", msg ? msg : "(not a string)");
  return 0;
}

typedef struct mem_cap {
  size_t used, limit;
} mem_cap;

static void *capped_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  mem_cap *m = ud;
  size_t old = ptr ? osize : 0;
  if (nsize == 0) {
    free(ptr);
    m->used -= old;
    return NULL;
  }
  if (m->limit && nsize > old && m->used - old + nsize > m->limit) return NULL;
  void *p = realloc(ptr, nsize);
  if (p) m->used = m->used - old + nsize;
  return p;
}

/* Message handler: an error table with the message and the remote traceback. */
static int error_handler(lua_State *L) {
  luaL_tolstring(L, 1, NULL);
  lua_createtable(L, 0, 2);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "message");
  luaL_traceback(L, L, NULL, 1);
  lua_setfield(L, -2, "traceback");
  return 1;
}

/*
** Runs one request, protected: (type, flags, decoded values...) -> results.
** An execute answers nothing, as in ipyparallel, except to a text-mode host,
** which has no other way to read a value back.
*/
static int run_request(lua_State *L) {
  int type = (int)lua_tointeger(L, 1);
  unsigned flags = (unsigned)lua_tointeger(L, 2);
  lua_remove(L, 2);
  int nargs = lua_gettop(L) - 1;
  switch (type) {
  case LPAR_MSG_EXECUTE: {
    size_t len;
    const char *code = luaL_checklstring(L, 2, &len);
    if (luaL_loadbufferx(L, code, len, "=[execute]", "t") != LUA_OK) return lua_error(L);
    int want = (flags & LPAR_FLAG_TEXT) ? LUA_MULTRET : 0;
    lua_call(L, 0, want);
    return lua_gettop(L) - 2;
  }
  case LPAR_MSG_APPLY:
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_call(L, nargs - 1, LUA_MULTRET);
    return lua_gettop(L) - 1;
  case LPAR_MSG_PUSH:
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 2)) {
      if (lua_type(L, -2) != LUA_TSTRING) return luaL_error(L, "push: names must be strings");
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_setglobal(L, lua_tostring(L, -2));
      lua_pop(L, 1);
    }
    return 0;
  case LPAR_MSG_PULL:
    for (int i = 2; i <= nargs + 1; i++) lua_getglobal(L, luaL_checkstring(L, i));
    return nargs;
  default:
    return luaL_error(L, "engine cannot serve a message of type %d", type);
  }
}

static void send_reply(lparE_state *st, int type, unsigned flags, const void *p, size_t n) {
  if (lparW_send(st->fd, type, flags, st->task, p, n) < 0) st->gone = 1; /* controller gone */
}

/*
** A reply: two doubles (started, completed) then the encoded values; large
** matrices go as memfds, sent on the side socket just before the frame.
*/
static void reply_values(lua_State *L, lparE_state *st, int type, double started,
                         int first, int count, lparB_buffer *enc) {
  char err[512];
  double stamps[2] = {started, lparE_now()};
  lparS_shm shm = {.min_bytes = st->side >= 0 && !st->inline_reply ? LPARM_SHM_MIN_BYTES : 0};
  enc->len = 0;
  lparB_append(enc, stamps, sizeof stamps);
  int rc = lparS_encode_shm(L, first, count, type == LPAR_MSG_RESULT ? "result" : "error", enc,
                            &shm, err, sizeof err);
  if (rc == 0 && enc->len - sizeof stamps > LPAR_MAX_PAYLOAD) {
    /* Sent, it would cost this engine its connection (and its globals). */
    snprintf(err, sizeof err, "cannot send the %s: %zu bytes, more than the 1 GiB a message may carry",
             type == LPAR_MSG_RESULT ? "result" : "error", enc->len - sizeof stamps);
    lparS_shm_done(&shm);
    shm = (lparS_shm){.nfds = 0};
    rc = -1;
  }
  if (rc < 0) {
    /* The result cannot travel: say so instead. */
    lua_createtable(L, 0, 1);
    lua_pushstring(L, err);
    lua_setfield(L, -2, "message");
    enc->len = sizeof stamps;
    type = LPAR_MSG_ERROR;
    if (lparS_encode(L, lua_gettop(L), 1, "error", enc, err, sizeof err) < 0) enc->len = 0;
    lua_pop(L, 1);
  }
  unsigned flags = 0;
  if (shm.nfds > 0) {
    if (lparH_send_fds(st->side, shm.fds, shm.nfds) < 0) st->gone = 1;
    flags = LPAR_FLAG_FDS;
  }
  lparS_shm_done(&shm);
  send_reply(st, type, flags, enc->data, enc->len);
}

/* Text replies for hosts without Lua: values joined by tabs, or the error. */
static void reply_text(lua_State *L, lparE_state *st, int ok, int first, int count,
                       lparB_buffer *enc) {
  enc->len = 0;
  if (ok) {
    for (int i = 0; i < count; i++) {
      size_t n;
      const char *s = luaL_tolstring(L, first + i, &n);
      if (i > 0) lparB_append(enc, "\t", 1);
      lparB_append(enc, s, n);
      lua_pop(L, 1);
    }
  } else {
    lua_getfield(L, first, "message");
    lua_getfield(L, first, "traceback");
    size_t n;
    const char *s = lua_tolstring(L, -2, &n);
    if (s) lparB_append(enc, s, n);
    s = lua_tolstring(L, -1, &n);
    if (s) {
      lparB_append(enc, "\n", 1);
      lparB_append(enc, s, n);
    }
    lua_pop(L, 2);
  }
  send_reply(st, ok ? LPAR_MSG_RESULT : LPAR_MSG_ERROR, LPAR_FLAG_TEXT | LPAR_FLAG_RAW,
               enc->data, enc->len);
}

/* An error reply {message = why} to the request being served, without running it. */
static void refuse_request(lua_State *L, lparE_state *st, double started, const char *why,
                           lparB_buffer *enc) {
  int base = lua_gettop(L);
  lua_createtable(L, 0, 1);
  lua_pushstring(L, why);
  lua_setfield(L, -2, "message");
  reply_values(L, st, LPAR_MSG_ERROR, started, base + 1, 1, enc);
  lua_settop(L, base);
}

/*
** A request with a deadline (LPAR_FLAG_DEADLINE): strip it from the
** payload; 1 to run the request (STARTED is sent), 0 when it was answered
** instead, because its deadline passed while it waited here or it is malformed.
*/
static int within_deadline(lua_State *L, lparE_state *st, const char **payload, size_t *len,
                           double started, lparB_buffer *enc) {
  if (*len < sizeof(double)) {
    st->bad_messages++;
    refuse_request(L, st, started, "malformed request: a deadline flag without a deadline", enc);
    return 0;
  }
  double deadline;
  memcpy(&deadline, *payload, sizeof deadline);
  *payload += sizeof deadline;
  *len -= sizeof deadline;
  if (started > deadline) {
    char why[160];
    snprintf(why, sizeof why, "timed out while queued on engine %d: its deadline passed %.3fs before it could start",
             st->id, started - deadline);
    refuse_request(L, st, started, why, enc);
    return 0;
  }
  send_reply(st, LPAR_MSG_STARTED, LPAR_FLAG_RAW, NULL, 0);
  return 1;
}

/*
** A request whose payload is in shared memory (LPAR_FLAG_SHM): the frame's
** payload `frame` is the length, u64 little-endian, and `fd` a memfd holding
** at least that many bytes. Read into `body`: one copy, with none of the
** page-table work a mapping of it would cost each engine. 0, or -1 with err.
*/
static int read_body(const char *frame, size_t len, lparB_buffer *body, int fd, int nfds, char *err,
                     size_t errlen) {
  struct stat sb;
  uint64_t n = 0;
  if (len != 8 || nfds < 1) {
    snprintf(err, errlen, "shared-memory request without its length or its memory");
    return -1;
  }
  for (int i = 7; i >= 0; i--) n = n << 8 | (unsigned char)frame[i];
  if (n > LPAR_MAX_PAYLOAD || fstat(fd, &sb) != 0 || (uint64_t)sb.st_size < n) {
    snprintf(err, errlen, "shared-memory request longer than its memory");
    return -1;
  }
  body->len = 0;
  if (lparB_reserve(body, (size_t)n + 1) < 0) {
    snprintf(err, errlen, "out of memory for a request of %llu bytes", (unsigned long long)n);
    return -1;
  }
  size_t got = 0;
  while (got < n) {
    ssize_t k = pread(fd, body->data + got, (size_t)n - got, (off_t)got);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) {
      snprintf(err, errlen, "cannot read the request's shared memory: %s",
               k < 0 ? strerror(errno) : "cut short");
      return -1;
    }
    got += (size_t)k;
  }
  body->len = (size_t)n;
  return 0;
}

/*
** Serve one request: `payload` is the frame's, in the reader's buffer
** (frames after it may follow there); a shared-memory request is read into
** `body` instead.
*/
static void serve(lua_State *L, lparE_state *st, const lparW_header *h, const char *payload,
                  lparB_buffer *body, lparB_buffer *enc) {
  double started = lparE_now();
  char err[512];
  lparS_shm shm = {.nfds = 0};
  if ((h->flags & LPAR_FLAG_FDS) && st->side >= 0) /* sent just before the frame */
    shm.nfds = lparH_recv_fds(st->side, shm.fds, LPARH_MAX_FDS, 1);
  size_t len = (size_t)h->len;
  int have = 1; /* the request's bytes are here */
  if (shm.nfds < 0) {
    shm.nfds = 0;
    have = 0;
    snprintf(err, sizeof err, "the request's shared memory did not arrive");
  } else if (h->flags & LPAR_FLAG_SHM) {
    if (read_body(payload, len, body, shm.fds[shm.nfds > 0 ? shm.nfds - 1 : 0], shm.nfds, err,
                  sizeof err) < 0) {
      have = 0;
    } else { /* the payload came from the last descriptor */
      payload = body->data;
      len = body->len;
      close(shm.fds[--shm.nfds]);
    }
  }
  if (have && (h->flags & LPAR_FLAG_DEADLINE) && !within_deadline(L, st, &payload, &len, started, enc)) {
    for (int i = 0; i < shm.nfds; i++) close(shm.fds[i]); /* not wanted */
    return;
  }
  int base = lua_gettop(L);
  lua_pushcfunction(L, error_handler);
  lua_pushcfunction(L, run_request);
  lua_pushinteger(L, h->type);
  lua_pushinteger(L, h->flags);
  int nvals = 1, decoded = 0;
  if (!have) {
    /* err says why */
  } else if (h->flags & LPAR_FLAG_RAW) { /* the payload is the code itself */
    lua_pushlstring(L, payload, len);
    decoded = 1;
  } else {
    decoded = lparS_decode_shm(L, payload, len, LPARS_ALLOW_CODE, &shm, &nvals, err, sizeof err) == 0;
  }
  for (int i = 0; i < shm.nfds; i++) close(shm.fds[i]); /* storages hold their own */
  if (!decoded) {
    st->bad_messages++;
    lua_settop(L, base);
    char why[sizeof err + 32];
    snprintf(why, sizeof why, "malformed request: %s", err);
    refuse_request(L, st, started, why, enc);
    return;
  }
  lparE_task_begin(h->id);
  int status = lua_pcall(L, nvals + 2, LUA_MULTRET, base + 1);
  int ok = status == LUA_OK;
  lparE_task_end(L);
  if (status == LUA_ERRMEM) { /* no message handler ran: say what the limit is */
    lua_settop(L, base + 1);
    lua_gc(L, LUA_GCCOLLECT);
    lua_createtable(L, 0, 1);
    if (st->mem_limit && st->mem_limit % (1u << 20) == 0)
      lua_pushfstring(L, "not enough memory (limit %d MB)", (int)(st->mem_limit >> 20));
    else if (st->mem_limit) /* 1.5 MB, not a rounded-down 1 MB */
      lua_pushfstring(L, "not enough memory (limit %f MB)", (lua_Number)st->mem_limit / (1 << 20));
    else
      lua_pushliteral(L, "not enough memory");
    lua_setfield(L, -2, "message");
  }
  lparE_flush_output(st);
  int first = base + 2, count = lua_gettop(L) - base - 1;
  if (h->flags & LPAR_FLAG_TEXT)
    reply_text(L, st, ok, first, count, enc);
  else
    reply_values(L, st, ok ? LPAR_MSG_RESULT : LPAR_MSG_ERROR, started, first, count, enc);
  lua_settop(L, base);
}

/* lpar.engine.bad_messages(): malformed requests this engine rejected. */
static int engine_bad_messages(lua_State *L) {
  lparE_state *st = lua_touserdata(L, lua_upvalueindex(1));
  lua_pushinteger(L, (lua_Integer)st->bad_messages);
  return 1;
}

/*
** lpar.engine.functions_received(): function bodies (bytecode) that came
** in requests; a function sent again by a client that knows this engine
** has it comes by its slot instead, and is not counted.
*/
static int engine_functions_received(lua_State *L) {
  lua_pushinteger(L, lparF_received(L));
  return 1;
}

/*
** lpar.engine.display(mime, data, metadata?): attach display data (an image,
** say) to the running task; the client finds it in ar.outputs.
*/
static int engine_display(lua_State *L) {
  lparE_state *st = lua_touserdata(L, lua_upvalueindex(1));
  luaL_checkstring(L, 1);
  luaL_checkstring(L, 2);
  if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
  lua_settop(L, 3);
  lparB_buffer b;
  char err[512];
  lparB_init(&b);
  if (lparS_encode(L, 1, 3, "display", &b, err, sizeof err) < 0) {
    lparB_free(&b);
    return luaL_error(L, "%s", err);
  }
  lparE_flush_output(st); /* keep output and displays in the order they were made */
  int rc = lparW_send(st->fd, LPAR_MSG_DISPLAY, 0, st->task, b.data, b.len);
  lparB_free(&b);
  if (rc < 0) st->gone = 1;
  return 0;
}

/* lpar.engine._send_raw(bytes): write raw bytes to the controller (tests of bad input). */
static int engine_send_raw(lua_State *L) {
  lparE_state *st = lua_touserdata(L, lua_upvalueindex(1));
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_pushboolean(L, lparW_write_all(st->fd, s, n) == LPAR_OK);
  return 1;
}

/*
** On an engine, `lpar` (global, and package.loaded.lpar, so a closure that
** captured the client's lpar module finds it by name) starts as a small
** table holding `engine`; the first use of any other field loads the full
** module into it.
*/
static const char *const lazy_lpar =
  "local engine = ...\n"
  "local lpar = { engine = engine }\n"
  "setmetatable(lpar, { __index = function(t, k)\n"
  "  setmetatable(t, nil)\n"
  "  local path = package.searchpath('lpar', package.path)\n"
  "  if path then\n"
  "    for name, v in pairs(dofile(path)) do\n"
  "      if rawget(t, name) == nil then t[name] = v end\n"
  "    end\n"
  "  end\n"
  "  return rawget(t, k)\n"
  "end })\n"
  "package.loaded.lpar = lpar\n"
  "_G.lpar = lpar\n";

/* `lpar.engine`, also reachable as package.loaded["lpar.engine"]. */
static void open_engine_module(lua_State *L, lparE_state *st) {
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, st->id);
  lua_setfield(L, -2, "id");
  lua_pushinteger(L, st->n);
  lua_setfield(L, -2, "n");
  lua_pushinteger(L, (lua_Integer)getpid());
  lua_setfield(L, -2, "pid");
  lua_pushcfunction(L, lparS_register_metatable);
  lua_setfield(L, -2, "register_metatable");
  lua_pushcfunction(L, engine_functions_received);
  lua_setfield(L, -2, "functions_received");
  lua_pushlightuserdata(L, st);
  lua_pushcclosure(L, engine_send_raw, 1);
  lua_setfield(L, -2, "_send_raw");
  lua_pushlightuserdata(L, st);
  lua_pushcclosure(L, engine_bad_messages, 1);
  lua_setfield(L, -2, "bad_messages");
  lua_pushlightuserdata(L, st);
  lua_pushcclosure(L, engine_display, 1);
  lua_setfield(L, -2, "display");
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "lpar.engine");
  lua_pop(L, 1);
  if (luaL_loadstring(L, lazy_lpar) != LUA_OK) {
    fprintf(stderr, "lpar-engine: %s\n", lua_tostring(L, -1));
    exit(1);
  }
  lua_insert(L, -2);
  lua_call(L, 1, 0);
}

/*
** Under the MPI launcher (LPAR_MPI=1, set by the rank's `lpar engine
** --rank`), load lpar.mpi now: MPI_Init waits for every rank, which start
** together, where a task's first require on one engine would wait for all.
** A failure is logged, and the task's own require raises it again.
*/
static void start_mpi(lua_State *L, int id) {
  const char *v = getenv("LPAR_MPI");
  if (v == NULL || strcmp(v, "1") != 0) return;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "lpar.mpi");
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    fprintf(stderr, "lpar-engine %d: %s\n", id, lua_tostring(L, -1));
    lua_pop(L, 1);
  }
}

int main(void) {
  lparE_state st = {.fd = env_int("LPAR_FD", -1), .side = env_int("LPAR_SIDE_FD", -1),
                    .id = env_int("LPAR_ENGINE_ID", 0),
                    .n = env_int("LPAR_ENGINE_N", 1)};
  int parent = env_int("LPAR_PARENT_PID", 0);
  if (st.fd < 0) {
    fprintf(stderr, "lpar-engine: no LPAR_FD; engines are started by lpar, not by hand\n");
    return 2;
  }
  /* Die with the parent even when too busy to read EOF. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (parent > 0 && getppid() != parent) return 0;
  lparB_init(&st.out);
  lparB_init(&st.err);
  const char *limit = getenv("LPAR_MEM_LIMIT");
  mem_cap cap = {.limit = limit && *limit ? (size_t)strtoull(limit, NULL, 10) : 0};
  st.mem_limit = cap.limit;
  lua_State *L = lua_newstate(capped_alloc, &cap);
  if (L == NULL) return 1;
  lua_atpanic(L, panic);
  luaL_openlibs(L);
  lparP_set_paths(L);
  /* lpar.matrix from this executable: no second copy of the core to load. */
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, lparM_open);
  lua_setfield(L, -2, "lpar.matrix");
  lua_pop(L, 1);
  open_engine_module(L, &st);
  lparE_capture_output(L, &st);
  lparE_interrupt_init(L);
  start_mpi(L, st.id);

  /* The hello says how often heartbeats come (0: never), so a host judges
  ** this engine's silence by its own period. */
  int beat_ms = env_int("LPAR_HEARTBEAT_MS", LPAR_HEARTBEAT_MS);
  char hello[128];
  int n = snprintf(hello, sizeof hello, "lpar-engine %s id=%d pid=%ld heartbeat=%d", LPAR_VERSION,
                   st.id, (long)getpid(), beat_ms > 0 ? beat_ms : 0);
  if (lparW_send(st.fd, LPAR_MSG_HELLO, LPAR_FLAG_RAW, 0, hello, (size_t)n) < 0) {
    lua_close(L);
    return 0;
  }

  /*
  ** Requests are read in as big a gulp as the socket holds and served one
  ** by one from the buffer: a burst of small tasks costs one read, not two
  ** reads and a poll each.
  */
  lparW_reader in;
  lparB_buffer enc, body; /* replies; a request from shared memory */
  int status = 0;
  lparW_reader_init(&in);
  lparB_init(&enc);
  lparB_init(&body);
  lparE_heartbeat_init(st.fd, beat_ms);
  for (;;) {
    lparW_header h;
    const char *payload = NULL, *reason = "";
    int rc = lparW_reader_next(&in, &h, &payload, &reason);
    if (rc < 0) {
      fprintf(stderr, "lpar-engine %d: dropping the connection: %s\n", st.id, reason);
      status = 3;
      break;
    }
    if (rc == 1) {
      st.task = h.id;
      st.inline_reply = (h.flags & LPAR_FLAG_INLINE) != 0;
      serve(L, &st, &h, payload, &body, &enc);
      if (st.gone) break;
      if (enc.cap > (1u << 24)) lparB_free(&enc); /* do not hold a huge buffer while idle */
      if (body.cap > (1u << 24)) lparB_free(&body);
      continue;
    }
    if (in.buf.len == 0 && in.buf.cap > (1u << 24)) lparW_reader_free(&in);
    /* Idle until a request comes; SIGALRM wakes it to send a heartbeat. */
    struct pollfd pfd = {.fd = st.fd, .events = POLLIN};
    if (poll(&pfd, 1, -1) < 0) {
      if (errno != EINTR) break;
      if (lparE_beat_due() && lparW_send(st.fd, LPAR_MSG_HEARTBEAT, 0, 0, NULL, 0) < 0) break;
      continue;
    }
    char *space;
    size_t room;
    if (lparW_reader_space(&in, &space, &room) < 0) {
      fprintf(stderr, "lpar-engine %d: dropping the connection: out of memory for a request\n", st.id);
      status = 3;
      break;
    }
    ssize_t k = read(st.fd, space, room);
    if (k < 0 && errno == EINTR) continue;
    if (k == 0 || (k < 0 && errno == ECONNRESET)) {
      if (in.buf.len > in.pos) { /* a frame cut short */
        fprintf(stderr, "lpar-engine %d: dropping the connection: truncated frame\n", st.id);
        status = 3;
      }
      break; /* controller closed: leave quietly */
    }
    if (k < 0) {
      fprintf(stderr, "lpar-engine %d: dropping the connection: read failed (%s)\n", st.id,
              strerror(errno));
      status = 3;
      break;
    }
    lparW_reader_commit(&in, (size_t)k);
  }
  lua_close(L);
  lparW_reader_free(&in);
  lparB_free(&enc);
  lparB_free(&body);
  lparB_free(&st.out);
  lparB_free(&st.err);
  return status;
}
