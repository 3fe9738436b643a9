/*
** serialize.c: Lua values to bytes and back (see serialize.h).
**
** Format, version 1. "uv" is an unsigned LEB128 varint (7 bits a byte, low
** group first, at most 10 bytes for 64 bits); fixed-width numbers are
** little-endian.
**
**   tuple := 0x01 uv(count) value{count}       nothing may follow
**
**   value := tag byte, then
**     0x00 NIL     0x01 FALSE     0x02 TRUE
**     0x03 INT     uv(zigzag(i))
**     0x04 FLOAT   8 bytes, IEEE-754 binary64 (NaN payload, -0.0 and inf kept)
**     0x05 STR     uv(len) bytes
**     0x06 TABLE   uv(narr) value{narr} (key value)* END
**                  the array section holds t[1..narr] (nils where holes are),
**                  the pairs hold every other key
**     0x07 TABLEMT uv(len) name, then as TABLE: the metatable registered
**                  under that name (lparS_register_metatable)
**     0x08 REF     uv(r): the r-th table or function of this tuple
**     0x09 GLOBALS the receiver's global table (LUA_RIDX_GLOBALS)
**     0x0A FUNC    uv(len) bytecode (lua_dump, not stripped), uv(nups),
**                  then per upvalue a value, or
**     0x0B JOIN    uv(r) uv(k): this upvalue is upvalue k of function r
**                  (shared upvalue cell; only valid as an upvalue)
**     0x0C CFUNC   uv(len) name: a C function by dotted name ("math.sin")
**     0x0D LIB     uv(len) name: a table of package.loaded by its key
**     0x0E END     closes a table's pairs
**     0x0F MATRIX  uv(rows) uv(cols), then 0x00 and rows*cols doubles
**                  (row-major), or 0x01 uv(i) uv(offset): the i-th memfd
**                  sent with the message, elements from `offset` (doubles)
**     0x10 FUNCSET 8-byte nonce, uv(slot), then as FUNC: the receiver keeps
**                  the bytecode as slot `slot` of the sender with that nonce
**     0x11 FUNCREF 8-byte nonce, uv(slot), uv(nups), upvalues: FUNC with the
**                  bytecode that sender set in that slot (see funcache.h)
**     0x40..0x5F   STR of length tag - 0x40 (0..31), bytes follow
**     0x80..0xFF   INT tag - 0x80 (0..127)
**
** References: TABLE, TABLEMT, FUNC and MATRIX take the next index (from 1) as soon
** as they start, before their contents, on both sides; so a table that
** contains itself, a table met twice, or a recursive function refers back
** with REF. Named things (GLOBALS, CFUNC, LIB) take no index.
**
** What goes by name: the sender's global table anywhere (and an _ENV
** upvalue that is a sandbox of it: a table with an unregistered
** metatable) as GLOBALS; C functions and package.loaded tables by the name
** the sender's index (names_build) gives them. The decoder looks names up
** raw, never calling metamethods, and loads bytecode only when allowed.
**
** This file is the format: the encoder and the decoder. The names of C
** things, both ways, are names.c's; the memory behind a matrix (inline
** elements, memfds and their bounds) is matrix_codec.c's.
*/
#include "serialize.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <unistd.h>

#include <lauxlib.h>

#include "lpar.h"
#include "matrix.h"
#include "matrix_codec.h"
#include "funcache.h"
#include "names.h"

_Static_assert(sizeof(lua_Integer) == 8, "lpar needs 64-bit Lua integers");
_Static_assert(sizeof(lua_Number) == 8, "lpar needs double Lua floats");

enum {
  T_NIL = 0x00, T_FALSE, T_TRUE, T_INT, T_FLOAT, T_STR, T_TABLE, T_TABLEMT,
  T_REF, T_GLOBALS, T_FUNC, T_JOIN, T_CFUNC, T_LIB, T_END, T_MATRIX,
  T_FUNCSET, T_FUNCREF,
  T_SHORTSTR = 0x40,
  T_SMALLINT = 0x80
};

#define FORMAT_VERSION 1
#define SHORTSTR_MAX 31
#define UV_MAX 10 /* bytes of the longest varint */

/* Registry keys. */
#define REG_MT_BYNAME "lpar.metatables"      /* name -> metatable */
#define REG_MT_BYOBJ "lpar.metatable_names"  /* metatable -> name */

static size_t put_uv(unsigned char *p, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    p[n++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  p[n++] = (unsigned char)v;
  return n;
}

static uint64_t zigzag(lua_Integer i) {
  uint64_t u = (uint64_t)i;
  return (u << 1) ^ (0 - (u >> 63));
}

static lua_Integer unzigzag(uint64_t z) {
  return (lua_Integer)((z >> 1) ^ (0 - (z & 1)));
}

static void put_f64(unsigned char *p, double d) {
  uint64_t u;
  memcpy(&u, &d, 8);
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(u >> (8 * i));
}

static double get_f64(const unsigned char *p) {
  uint64_t u = 0;
  for (int i = 0; i < 8; i++) u |= (uint64_t)p[i] << (8 * i);
  double d;
  memcpy(&d, &u, 8);
  return d;
}

/* Copy s[0..n) into dst as readable text: at most 40 bytes, odd bytes as '?'. */
static void printable(char *dst, size_t dstlen, const char *s, size_t n) {
  size_t max = n > 40 ? 40 : n, j = 0;
  for (size_t i = 0; i < max && j + 4 < dstlen; i++) {
    unsigned char c = (unsigned char)s[i];
    dst[j++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
  }
  if (max < n && j + 4 < dstlen) {
    memcpy(dst + j, "...", 3);
    j += 3;
  }
  if (dstlen) dst[j < dstlen ? j : dstlen - 1] = '\0';
}

/* ---------------------------------------------------------------- encoder */

/* One step of the path to the value being encoded, for error messages. */
enum { SEG_ROOT, SEG_INDEX, SEG_FIELD, SEG_KEY, SEG_UPVAL };

typedef struct seg {
  int kind;
  int slot;      /* stack slot of the key (FIELD, KEY) or function (UPVAL) */
  lua_Integer n; /* ROOT, INDEX: the index; UPVAL: the upvalue number */
} seg;

typedef struct enc {
  lua_State *L;
  lparB_buffer *b;
  int seen;    /* slot: object -> ref, upvalue id -> ref * 256 + n */
  int globals; /* slot: the global table */
  int names;   /* slot: name index (object -> dotted name) */
  int mtnames; /* slot: metatable -> registered name */
  int have_seen, have_names, have_mtnames, rebuilt;
  lua_Integer nrefs;
  int depth; /* path[0..depth] leads to the value being encoded */
  const char *root;
  char *err;
  size_t errlen;
  lparS_shm *shm; /* or NULL: matrices inline */
  lparF_sender *funcs; /* or NULL: every function with its bytecode */
  int engine;          /* where the message goes, for funcs */
  seg path[LPAR_MAX_DEPTH + 2];
} enc;

static int is_identifier(const char *s, size_t n) {
  static const char *const keywords[] = {
    "and", "break", "do", "else", "elseif", "end", "false", "for",
    "function", "goto", "if", "in", "local", "nil", "not", "or", "repeat",
    "return", "then", "true", "until", "while", NULL};
  if (n == 0 || n > 40) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    int alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && (i == 0 || c < '0' || c > '9')) return 0;
  }
  for (int i = 0; keywords[i]; i++)
    if (strlen(keywords[i]) == n && memcmp(keywords[i], s, n) == 0) return 0;
  return 1;
}

/* Lua-style quoted string, cut after 40 bytes. */
static void quote(char *dst, size_t dstlen, const char *s, size_t n) {
  size_t j = 0, max = n > 40 ? 40 : n;
  if (dstlen < 8) {
    if (dstlen) dst[0] = '\0';
    return;
  }
  dst[j++] = '"';
  for (size_t i = 0; i < max && j + 10 < dstlen; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      dst[j++] = '\\';
      dst[j++] = (char)c;
    } else if (c >= 0x20 && c < 0x7f) {
      dst[j++] = (char)c;
    } else {
      j += (size_t)snprintf(dst + j, dstlen - j, "\\%u", c);
    }
  }
  if (max < n) {
    memcpy(dst + j, "...", 3);
    j += 3;
  }
  dst[j++] = '"';
  dst[j] = '\0';
}

static const char *type_label(lua_State *L, int slot) {
  return lua_typename(L, lua_type(L, slot));
}

/* Format a table key as a path step: ".name", "[3]", "[\"a b\"]". */
static void fmt_field(lua_State *L, int slot, char *out, size_t outlen) {
  switch (lua_type(L, slot)) {
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, slot, &n);
    char q[200];
    if (is_identifier(s, n)) {
      snprintf(out, outlen, ".%s", s);
    } else {
      quote(q, sizeof q, s, n);
      snprintf(out, outlen, "[%s]", q);
    }
    break;
  }
  case LUA_TNUMBER:
    if (lua_isinteger(L, slot))
      snprintf(out, outlen, "[%lld]", (long long)lua_tointeger(L, slot));
    else
      snprintf(out, outlen, "[%.14g]", (double)lua_tonumber(L, slot));
    break;
  case LUA_TBOOLEAN:
    snprintf(out, outlen, "[%s]", lua_toboolean(L, slot) ? "true" : "false");
    break;
  default:
    snprintf(out, outlen, "[<%s>]", type_label(L, slot));
  }
}

static void fmt_seg(enc *S, const seg *g, char *out, size_t outlen) {
  lua_State *L = S->L;
  switch (g->kind) {
  case SEG_ROOT:
    snprintf(out, outlen, "%s[%lld]", S->root, (long long)g->n);
    break;
  case SEG_INDEX:
    snprintf(out, outlen, "[%lld]", (long long)g->n);
    break;
  case SEG_FIELD:
    fmt_field(L, g->slot, out, outlen);
    break;
  case SEG_KEY:
    snprintf(out, outlen, "[key <%s>]", type_label(L, g->slot));
    break;
  case SEG_UPVAL: {
    const char *name = lua_getupvalue(L, g->slot, (int)g->n);
    if (name && *name)
      snprintf(out, outlen, ".upvalue '%s'", name);
    else
      snprintf(out, outlen, ".upvalue #%lld", (long long)g->n);
    if (name) lua_pop(L, 1);
    break;
  }
  default:
    snprintf(out, outlen, "?");
  }
}

/* The path to the current value; long paths keep their two ends. */
static void fmt_path(enc *S, char *out, size_t outlen) {
  int nseg = S->depth + 1;
  size_t len = 0;
  out[0] = '\0';
  for (int i = 0; i < nseg && len + 1 < outlen; i++) {
    char step[128];
    if (nseg > 16 && i == 8) {
      snprintf(step, sizeof step, "...");
      i = nseg - 8;
    } else {
      fmt_seg(S, &S->path[i], step, sizeof step);
    }
    size_t n = strlen(step);
    if (n > outlen - 1 - len) n = outlen - 1 - len;
    memcpy(out + len, step, n);
    len += n;
    out[len] = '\0';
  }
}

static int enc_fail(enc *S, int code, const char *fmt, ...) {
  if (S->err == NULL || S->errlen == 0) return code;
  char reason[200], path[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(reason, sizeof reason, fmt, ap);
  va_end(ap);
  if (code == LPAR_ENOMEM) {
    snprintf(S->err, S->errlen, "%s", reason);
    return code;
  }
  if (!lua_checkstack(S->L, 2)) {
    snprintf(S->err, S->errlen, "cannot send: %s", reason);
    return code;
  }
  fmt_path(S, path, sizeof path);
  snprintf(S->err, S->errlen, "cannot send %s: %s", path, reason);
  return code;
}

static int nomem(enc *S) {
  return enc_fail(S, LPAR_ENOMEM, "out of memory");
}

/* Room for n more bytes, and where they go. */
static unsigned char *room(enc *S, size_t n) {
  lparB_buffer *b = S->b;
  if (b->cap - b->len < n && lparB_reserve(b, n) != 0) return NULL;
  return (unsigned char *)b->data + b->len;
}

static int put_tag(enc *S, int tag) {
  unsigned char *p = room(S, 1);
  if (p == NULL) return nomem(S);
  p[0] = (unsigned char)tag;
  S->b->len++;
  return 0;
}

static int put_tag_uv(enc *S, int tag, uint64_t v) {
  unsigned char *p = room(S, 1 + UV_MAX);
  if (p == NULL) return nomem(S);
  p[0] = (unsigned char)tag;
  S->b->len += 1 + put_uv(p + 1, v);
  return 0;
}

static int put_uv_only(enc *S, uint64_t v) {
  unsigned char *p = room(S, UV_MAX);
  if (p == NULL) return nomem(S);
  S->b->len += put_uv(p, v);
  return 0;
}

/* tag, uv(n), bytes; strings up to SHORTSTR_MAX carry their length in the tag. */
static int put_bytes(enc *S, int tag, const char *s, size_t n) {
  if (n > SIZE_MAX - 1 - UV_MAX) return nomem(S);
  unsigned char *p = room(S, 1 + UV_MAX + n);
  if (p == NULL) return nomem(S);
  size_t h;
  if (tag == T_STR && n <= SHORTSTR_MAX) {
    p[0] = (unsigned char)(T_SHORTSTR + n);
    h = 1;
  } else {
    p[0] = (unsigned char)tag;
    h = 1 + put_uv(p + 1, n);
  }
  if (n) memcpy(p + h, s, n);
  S->b->len += h + n;
  return 0;
}

static int put_int(enc *S, lua_Integer i) {
  if (i >= 0 && i < 0x80) return put_tag(S, T_SMALLINT + (int)i);
  return put_tag_uv(S, T_INT, zigzag(i));
}

static int put_float(enc *S, double d) {
  unsigned char *p = room(S, 9);
  if (p == NULL) return nomem(S);
  p[0] = T_FLOAT;
  put_f64(p + 1, d);
  S->b->len += 9;
  return 0;
}

static int enc_typed(enc *S, int idx, int type);

static int enc_value(enc *S, int idx) {
  return enc_typed(S, idx, lua_type(S->L, idx));
}

/*
** REF for an object already sent: returns 0 (REF written) or an error, or 1
** when the object is new.
*/
static int enc_seen(enc *S, int idx) {
  lua_State *L = S->L;
  if (!S->have_seen) {
    lua_createtable(L, 0, 16);
    lua_replace(L, S->seen);
    S->have_seen = 1;
    return 1;
  }
  lua_pushvalue(L, idx);
  if (lua_rawget(L, S->seen) == LUA_TNUMBER) {
    lua_Integer r = lua_tointeger(L, -1);
    lua_pop(L, 1);
    return put_tag_uv(S, T_REF, (uint64_t)r);
  }
  lua_pop(L, 1);
  return 1;
}

static lua_Integer mark_seen(enc *S, int idx) {
  lua_State *L = S->L;
  lua_pushvalue(L, idx);
  lua_pushinteger(L, ++S->nrefs);
  lua_rawset(L, S->seen);
  return S->nrefs;
}

/* Entering a table or function: bound the depth and the Lua stack. */
static int enter(enc *S) {
  if (S->depth >= LPAR_MAX_DEPTH)
    return enc_fail(S, LPAR_EDEPTH, "nesting deeper than %d", LPAR_MAX_DEPTH);
  if (!lua_checkstack(S->L, 20)) return enc_fail(S, LPAR_ENOMEM, "Lua stack overflow");
  S->depth++;
  return 0;
}

/* ------------------------------------------------ names of C things (names.c) */

static void names_load(enc *S) {
  lparN_index(S->L, S->globals, 0);
  lua_replace(S->L, S->names);
  S->have_names = 1;
}

/*
** Push the name of the C function or library table at idx and return 1, or
** return 0 pushing nothing. A miss may rebuild the index once per call.
*/
static int name_of(enc *S, int idx, int may_rebuild) {
  lua_State *L = S->L;
  if (!lua_checkstack(L, 32)) return 0; /* names_build's need; never short in practice */
  if (!S->have_names) names_load(S);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, S->names) == LUA_TSTRING) return 1;
  lua_pop(L, 1);
  if (!may_rebuild || S->rebuilt) return 0;
  S->rebuilt = 1;
  lparN_index(L, S->globals, 1);
  lua_replace(L, S->names);
  return name_of(S, idx, 0);
}

/* ---------------------------------------------------------------- tables */

/* Push the registered name of the metatable at top (popping it); 0 if none. */
static int mt_name(enc *S) {
  lua_State *L = S->L;
  if (!S->have_mtnames) {
    lua_getfield(L, LUA_REGISTRYINDEX, REG_MT_BYOBJ);
    lua_replace(L, S->mtnames);
    S->have_mtnames = 1;
  }
  if (lua_type(L, S->mtnames) != LUA_TTABLE) {
    lua_pop(L, 1);
    return 0;
  }
  if (lua_rawget(L, S->mtnames) == LUA_TSTRING) return 1;
  lua_pop(L, 1);
  return 0;
}

/*
** t[1..n] by lua_rawgeti, fetched ARRAY_BATCH at a time: the hot loop of a
** big list, where one lua_settop per batch instead of per value shows.
*/
#define ARRAY_BATCH 32

static int enc_array(enc *S, int idx, lua_Unsigned n) {
  lua_State *L = S->L;
  seg *g = &S->path[S->depth];
  int base = lua_gettop(L), types[ARRAY_BATCH];
  if (!lua_checkstack(L, ARRAY_BATCH)) return enc_fail(S, LPAR_ENOMEM, "Lua stack overflow");
  g->kind = SEG_INDEX;
  for (lua_Unsigned i = 1; i <= n;) {
    int m = n - i + 1 < ARRAY_BATCH ? (int)(n - i + 1) : ARRAY_BATCH;
    for (int j = 0; j < m; j++) types[j] = lua_rawgeti(L, idx, (lua_Integer)i + j);
    for (int j = 0; j < m; j++) {
      g->n = (lua_Integer)i + j;
      int rc = enc_typed(S, base + 1 + j, types[j]);
      if (rc) return rc;
    }
    lua_settop(L, base);
    i += (lua_Unsigned)m;
  }
  return 0;
}

/* Every pair whose key is not in 1..n, then END. */
static int enc_pairs(enc *S, int idx, lua_Unsigned n) {
  lua_State *L = S->L;
  seg *g = &S->path[S->depth];
  int k = lua_gettop(L) + 1;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_isinteger(L, k)) {
      lua_Integer i = lua_tointeger(L, k);
      if (i >= 1 && (lua_Unsigned)i <= n) {
        lua_pop(L, 1);
        continue;
      }
    }
    g->kind = SEG_KEY;
    g->slot = k;
    int rc = enc_value(S, k);
    if (rc) return rc;
    g->kind = SEG_FIELD;
    rc = enc_value(S, k + 1);
    if (rc) return rc;
    lua_pop(L, 1);
  }
  return put_tag(S, T_END);
}

static int enc_table(enc *S, int idx) {
  lua_State *L = S->L;
  if (lua_rawequal(L, idx, S->globals)) return put_tag(S, T_GLOBALS);
  int rc = enc_seen(S, idx);
  if (rc != 1) return rc;
  if (name_of(S, idx, 0)) {
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    rc = put_bytes(S, T_LIB, s, n);
    lua_pop(L, 1);
    return rc;
  }
  int has_mt = lua_getmetatable(L, idx);
  if (has_mt && !mt_name(S))
    return enc_fail(S, LPAR_EUNSENDABLE, "table has a metatable that is not "
                    "registered (lpar.register_metatable(name, mt))");
  if ((rc = enter(S)) != 0) return rc;
  mark_seen(S, idx);
  if (has_mt) {
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    rc = put_bytes(S, T_TABLEMT, s, n);
    lua_pop(L, 1);
    if (rc) return rc;
  } else if ((rc = put_tag(S, T_TABLE)) != 0) {
    return rc;
  }
  lua_Unsigned n = lua_rawlen(L, idx);
  if ((rc = put_uv_only(S, n)) != 0) return rc;
  if ((rc = enc_array(S, idx, n)) != 0) return rc;
  if ((rc = enc_pairs(S, idx, n)) != 0) return rc;
  S->depth--;
  return 0;
}

/* ------------------------------------------------------------- functions */

static int dump_writer(lua_State *L, const void *p, size_t n, void *ud) {
  (void)L;
  return lparB_append(ud, p, n) != 0;
}

/* uv(len) bytecode: dump in place, then slide it to make room for the length. */
static int enc_dump(enc *S, int idx) {
  lua_State *L = S->L;
  lparB_buffer *b = S->b;
  size_t at = b->len;
  lua_pushvalue(L, idx);
  int st = lua_dump(L, dump_writer, b, 0);
  lua_pop(L, 1);
  if (st != 0) return nomem(S);
  size_t n = b->len - at;
  unsigned char len[UV_MAX];
  size_t k = put_uv(len, n);
  if (room(S, k) == NULL) return nomem(S);
  memmove(b->data + at + k, b->data + at, n);
  memcpy(b->data + at, len, k);
  b->len += k;
  return 0;
}

/*
** A function's code: FUNC with its bytecode, or, with a sender's function
** slots, FUNCSET the first time it goes to this engine and FUNCREF after.
*/
static int enc_code(enc *S, int idx) {
  if (S->funcs == NULL) {
    int rc = put_tag(S, T_FUNC);
    return rc ? rc : enc_dump(S, idx);
  }
  lua_State *L = S->L;
  int slot = lparF_recall(L, S->funcs, idx, S->engine);
  if (slot >= 0) { /* sent before, and held there: named, not dumped */
    unsigned char *p = room(S, 1 + LPARF_NONCE_BYTES + UV_MAX);
    if (p == NULL) return nomem(S);
    size_t n = 0;
    p[n++] = T_FUNCREF;
    memcpy(p + n, S->funcs->nonce, LPARF_NONCE_BYTES);
    n += LPARF_NONCE_BYTES;
    n += put_uv(p + n, (uint64_t)slot);
    S->b->len += n;
    return 0;
  }
  lparB_buffer *code = &S->funcs->scratch;
  code->len = 0;
  lua_pushvalue(L, idx);
  int st = lua_dump(L, dump_writer, code, 0);
  lua_pop(L, 1);
  if (st != 0) return nomem(S);
  int known = 0;
  slot = lparF_slot(S->funcs, S->engine, code->data, code->len, &known);
  if (slot >= 0) lparF_remember(L, S->funcs, idx, slot);
  unsigned char *p = room(S, 2 + LPARF_NONCE_BYTES + 2 * UV_MAX + (known ? 0 : code->len));
  if (p == NULL) return nomem(S);
  size_t n = 0;
  if (slot < 0) {
    p[n++] = T_FUNC;
  } else {
    p[n++] = known ? T_FUNCREF : T_FUNCSET;
    memcpy(p + n, S->funcs->nonce, LPARF_NONCE_BYTES);
    n += LPARF_NONCE_BYTES;
    n += put_uv(p + n, (uint64_t)slot);
  }
  if (!known || slot < 0) {
    n += put_uv(p + n, code->len);
    memcpy(p + n, code->data, code->len);
    n += code->len;
  }
  S->b->len += n;
  if (code->cap > (1u << 20)) lparB_free(code);
  return 0;
}

/*
** An _ENV that is a table with an unregistered metatable is a proxy of the
** globals (a sandbox such as setmetatable({}, {__index = _G}), or busted's
** per-file environment): it rebinds to the receiver's globals like _ENV
** itself, rather than failing as an unsendable metatable.
*/
static int is_env_proxy(enc *S, int v, const char *name) {
  lua_State *L = S->L;
  if (name == NULL || strcmp(name, "_ENV") != 0 || lua_type(L, v) != LUA_TTABLE ||
      !lua_getmetatable(L, v))
    return 0;
  if (mt_name(S)) {
    lua_pop(S->L, 1);
    return 0;
  }
  return 1;
}

/* One upvalue: JOIN if its cell went out earlier in this tuple, else its value. */
static int enc_upvalue(enc *S, int idx, lua_Integer ref, int n) {
  lua_State *L = S->L;
  void *id = lua_upvalueid(L, idx, n);
  if (id != NULL) {
    lua_pushlightuserdata(L, id);
    if (lua_rawget(L, S->seen) == LUA_TNUMBER) {
      lua_Integer code = lua_tointeger(L, -1);
      lua_pop(L, 1);
      int rc = put_tag_uv(S, T_JOIN, (uint64_t)(code >> 8));
      return rc ? rc : put_uv_only(S, (uint64_t)(code & 0xff));
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, id);
    lua_pushinteger(L, ref * 256 + n);
    lua_rawset(L, S->seen);
  }
  seg *g = &S->path[S->depth];
  g->kind = SEG_UPVAL;
  g->slot = idx;
  g->n = n;
  const char *name = lua_getupvalue(L, idx, n);
  int v = lua_gettop(L);
  int rc = is_env_proxy(S, v, name) ? put_tag(S, T_GLOBALS) : enc_value(S, v);
  lua_settop(L, v - 1);
  return rc;
}

static int enc_lfunc(enc *S, int idx) {
  lua_State *L = S->L;
  int rc = enc_seen(S, idx);
  if (rc != 1) return rc;
  if ((rc = enter(S)) != 0) return rc;
  lua_Integer ref = mark_seen(S, idx);
  if ((rc = enc_code(S, idx)) != 0) return rc;
  lua_Debug ar;
  lua_pushvalue(L, idx);
  lua_getinfo(L, ">u", &ar);
  if ((rc = put_uv_only(S, ar.nups)) != 0) return rc;
  for (int n = 1; n <= ar.nups; n++)
    if ((rc = enc_upvalue(S, idx, ref, n)) != 0) return rc;
  S->depth--;
  return 0;
}

static int enc_cfunc(enc *S, int idx) {
  if (!name_of(S, idx, 1))
    return enc_fail(S, LPAR_EUNSENDABLE, "C function with no known name");
  size_t n;
  const char *s = lua_tolstring(S->L, -1, &n);
  int rc = put_bytes(S, T_CFUNC, s, n);
  lua_pop(S->L, 1);
  return rc;
}

/* Index of `fd` in the message's descriptors, adding it; -1 when full. */
static int enc_matrix_shm(enc *S, lparM_matrix *m) {
  size_t off;
  int slot = lparS_matrix_slot(S->shm, m, &off);
  if (slot < 0) return 1; /* no memfd: inline instead */
  int rc = put_uv_only(S, 1);
  if (rc == 0) rc = put_uv_only(S, (uint64_t)slot);
  return rc ? rc : put_uv_only(S, off);
}

static int enc_matrix(enc *S, int idx, lparM_matrix *m) {
  int rc = enc_seen(S, idx);
  if (rc != 1) return rc;
  mark_seen(S, idx);
  size_t bytes = m->rows * m->cols * sizeof(double);
  if ((rc = put_tag_uv(S, T_MATRIX, m->rows)) != 0 || (rc = put_uv_only(S, m->cols)) != 0)
    return rc;
  if (S->shm && S->shm->min_bytes && bytes >= S->shm->min_bytes) {
    rc = enc_matrix_shm(S, m);
    if (rc <= 0) return rc;
  }
  if ((rc = put_uv_only(S, 0)) != 0 || bytes == 0) return rc;
  unsigned char *p = room(S, bytes);
  if (p == NULL) return nomem(S);
  lparS_matrix_copy(m, p);
  S->b->len += bytes;
  return 0;
}

static int enc_userdata(enc *S, int idx) {
  lua_State *L = S->L;
  lparM_matrix *m = lparM_test(L, idx);
  if (m) return enc_matrix(S, idx, m);
  if (luaL_getmetafield(L, idx, "__name") == LUA_TSTRING)
    return enc_fail(S, LPAR_EUNSENDABLE, "userdata %s", lua_tostring(L, -1));
  return enc_fail(S, LPAR_EUNSENDABLE, "userdata");
}

/* The value at idx, whose lua_type is `type`. */
static int enc_typed(enc *S, int idx, int type) {
  lua_State *L = S->L;
  switch (type) {
  case LUA_TNIL:
    return put_tag(S, T_NIL);
  case LUA_TBOOLEAN:
    return put_tag(S, lua_toboolean(L, idx) ? T_TRUE : T_FALSE);
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) return put_int(S, lua_tointeger(L, idx));
    return put_float(S, (double)lua_tonumber(L, idx));
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    return put_bytes(S, T_STR, s, n);
  }
  case LUA_TTABLE:
    return enc_table(S, idx);
  case LUA_TFUNCTION:
    return lua_iscfunction(L, idx) ? enc_cfunc(S, idx) : enc_lfunc(S, idx);
  case LUA_TUSERDATA:
    return enc_userdata(S, idx);
  case LUA_TLIGHTUSERDATA:
    return enc_fail(S, LPAR_EUNSENDABLE, "light userdata");
  case LUA_TTHREAD:
    return enc_fail(S, LPAR_EUNSENDABLE, "coroutine");
  default:
    return enc_fail(S, LPAR_EUNSENDABLE, "%s", type_label(L, idx));
  }
}

int lparS_encode(lua_State *L, int first, int count, const char *root,
                 lparB_buffer *out, char *err, size_t errlen) {
  return lparS_encode_shm(L, first, count, root, out, NULL, err, errlen);
}

void lparS_shm_done(lparS_shm *shm) {
  for (int i = 0; i < shm->nfds; i++)
    if (shm->owned[i]) close(shm->fds[i]);
  shm->nfds = 0;
}

int lparS_encode_shm(lua_State *L, int first, int count, const char *root, lparB_buffer *out,
                     lparS_shm *shm, char *err, size_t errlen) {
  return lparS_encode_for(L, first, count, root, out, shm, NULL, 0, err, errlen);
}

int lparS_encode_for(lua_State *L, int first, int count, const char *root, lparB_buffer *out,
                     lparS_shm *shm, lparF_sender *funcs, int engine, char *err, size_t errlen) {
  if (err && errlen) err[0] = '\0';
  int top = lua_gettop(L);
  if (count > 0) first = lua_absindex(L, first);
  if (count < 0 || (count > 0 && (first < 1 || first > top - count + 1))) {
    if (err && errlen) snprintf(err, errlen, "bad stack range for encoding");
    return LPAR_EINVAL;
  }
  size_t len0 = out->len;
  enc S;
  S.L = L;
  S.b = out;
  S.have_seen = S.have_names = S.have_mtnames = S.rebuilt = 0;
  S.nrefs = 0;
  S.depth = 0;
  S.root = root ? root : "value";
  S.err = err;
  S.errlen = errlen;
  S.shm = shm;
  S.funcs = funcs;
  S.engine = engine;
  if (funcs) lparF_discard(funcs);
  if (!lua_checkstack(L, 16)) return enc_fail(&S, LPAR_ENOMEM, "Lua stack overflow");
  lua_pushnil(L);
  S.seen = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  S.globals = S.seen + 1;
  lua_pushnil(L);
  S.names = S.seen + 2;
  lua_pushnil(L);
  S.mtnames = S.seen + 3;
  int rc = put_tag_uv(&S, FORMAT_VERSION, (uint64_t)count);
  for (int i = 0; i < count && rc == 0; i++) {
    S.path[0].kind = SEG_ROOT;
    S.path[0].n = i + 1;
    rc = enc_value(&S, first + i);
  }
  lua_settop(L, top);
  if (rc) {
    out->len = len0;
    if (shm) lparS_shm_done(shm);
  }
  return rc;
}

/* ---------------------------------------------------------------- decoder */

typedef struct dec {
  lua_State *L;
  const unsigned char *start, *p, *end;
  unsigned flags;
  int refs; /* slot: ref index -> table or function; nil until needed */
  int have_refs;
  lua_Integer nrefs;
  int depth;
  char *err;
  size_t errlen;
  const lparS_shm *shm; /* descriptors that came with the message, or NULL */
} dec;

static int bad(dec *D, const char *fmt, ...) {
  if (D->err && D->errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(D->err, D->errlen, fmt, ap);
    va_end(ap);
  }
  return LPAR_EBADMSG;
}

static size_t offset(dec *D, const unsigned char *p) {
  return (size_t)(p - D->start);
}

static size_t left(dec *D) {
  return (size_t)(D->end - D->p);
}

static int get_uv(dec *D, uint64_t *out, const char *what) {
  const unsigned char *p = D->p;
  uint64_t v = 0;
  *out = 0; /* set on every path: gcc -O3 cannot tell that bad() is nonzero */
  for (int shift = 0;; shift += 7) {
    if (p == D->end)
      return bad(D, "truncated %s at offset %zu", what, offset(D, D->p));
    unsigned c = *p++;
    if (shift == 63 && c > 1)
      return bad(D, "%s varint too long at offset %zu", what, offset(D, D->p));
    v |= (uint64_t)(c & 0x7f) << shift;
    if (!(c & 0x80)) break;
  }
  D->p = p;
  *out = v;
  return 0;
}

/* A length that must fit in what is left of the input. */
static int get_len(dec *D, uint64_t *n, const char *what, const unsigned char *at) {
  int rc = get_uv(D, n, what);
  if (rc) return rc;
  if (*n > left(D))
    return bad(D, "bad %s length %llu at offset %zu (only %zu bytes left)", what,
               (unsigned long long)*n, offset(D, at), left(D));
  return 0;
}

static int dec_value(dec *D);

static void add_ref(dec *D, int slot) {
  lua_State *L = D->L;
  if (!D->have_refs) {
    lua_createtable(L, 8, 0);
    lua_replace(L, D->refs);
    D->have_refs = 1;
  }
  lua_pushvalue(L, slot);
  lua_rawseti(L, D->refs, ++D->nrefs);
}

static int dec_enter(dec *D, const unsigned char *at) {
  if (D->depth >= LPAR_MAX_DEPTH)
    return bad(D, "nesting deeper than %d at offset %zu", LPAR_MAX_DEPTH, offset(D, at));
  if (!lua_checkstack(D->L, 20)) return bad(D, "Lua stack overflow at offset %zu", offset(D, at));
  D->depth++;
  return 0;
}

/* Push the metatable registered under name[0..n), or return an error. */
static int dec_metatable(dec *D, const char *name, size_t n, const unsigned char *at) {
  lua_State *L = D->L;
  if (lua_getfield(L, LUA_REGISTRYINDEX, REG_MT_BYNAME) == LUA_TTABLE) {
    lua_pushlstring(L, name, n);
    if (lua_rawget(L, -2) == LUA_TTABLE) {
      lua_remove(L, -2);
      return 0;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  char shown[64];
  printable(shown, sizeof shown, name, n);
  return bad(D, "unknown metatable '%s' at offset %zu (not registered here)", shown,
             offset(D, at));
}

/* The pairs after the array section, up to END. */
static int dec_pairs(dec *D, int t) {
  lua_State *L = D->L;
  for (;;) {
    if (D->p == D->end)
      return bad(D, "truncated table at offset %zu", offset(D, D->p));
    if (*D->p == T_END) {
      D->p++;
      return 0;
    }
    const unsigned char *at = D->p;
    int rc = dec_value(D);
    if (rc) return rc;
    if (lua_type(L, -1) == LUA_TNIL)
      return bad(D, "nil table key at offset %zu", offset(D, at));
    if (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1) && isnan(lua_tonumber(L, -1)))
      return bad(D, "NaN table key at offset %zu", offset(D, at));
    if ((rc = dec_value(D)) != 0) return rc;
    lua_rawset(L, t);
  }
}

static int dec_table(dec *D, int has_mt, const unsigned char *at) {
  lua_State *L = D->L;
  int rc = dec_enter(D, at);
  if (rc) return rc;
  uint64_t n = 0;
  if (has_mt) {
    if ((rc = get_len(D, &n, "metatable name", at)) != 0) return rc;
    const char *name = (const char *)D->p;
    D->p += n;
    if ((rc = dec_metatable(D, name, (size_t)n, at)) != 0) return rc;
  }
  uint64_t narr = 0;
  if ((rc = get_uv(D, &narr, "array length")) != 0) return rc;
  if (narr > left(D) || narr > INT_MAX)
    return bad(D, "bad array length %llu at offset %zu (only %zu bytes left)",
               (unsigned long long)narr, offset(D, at), left(D));
  lua_createtable(L, (int)narr, 0);
  int t = lua_gettop(L);
  if (has_mt) {
    lua_pushvalue(L, t - 1);
    lua_setmetatable(L, t);
  }
  add_ref(D, t);
  for (lua_Integer i = 1; i <= (lua_Integer)narr; i++) {
    if ((rc = dec_value(D)) != 0) return rc;
    lua_rawseti(L, t, i);
  }
  if ((rc = dec_pairs(D, t)) != 0) return rc;
  if (has_mt) lua_remove(L, t - 1);
  D->depth--;
  return 0;
}

typedef struct chunk {
  const char *p;
  size_t n;
} chunk;

static const char *chunk_reader(lua_State *L, void *ud, size_t *size) {
  chunk *c = ud;
  (void)L;
  *size = c->n;
  c->n = 0;
  return *size ? c->p : NULL;
}

static int is_lua_function(lua_State *L, int idx) {
  return lua_type(L, idx) == LUA_TFUNCTION && !lua_iscfunction(L, idx);
}

/* JOIN r k as upvalue n of the function at f. */
static int dec_join(dec *D, int f, int n) {
  lua_State *L = D->L;
  const unsigned char *at = D->p++;
  uint64_t r = 0, k = 0;
  int rc = get_uv(D, &r, "reference");
  if (rc || (rc = get_uv(D, &k, "upvalue number")) != 0) return rc;
  if (r < 1 || r > (uint64_t)D->nrefs)
    return bad(D, "bad reference %llu at offset %zu", (unsigned long long)r, offset(D, at));
  lua_rawgeti(L, D->refs, (lua_Integer)r);
  if (!is_lua_function(L, -1))
    return bad(D, "upvalue join with a non-function at offset %zu", offset(D, at));
  if (k < 1 || k > 255 || lua_getupvalue(L, -1, (int)k) == NULL)
    return bad(D, "bad upvalue number %llu at offset %zu", (unsigned long long)k,
               offset(D, at));
  lua_pop(L, 1);
  lua_upvaluejoin(L, f, n, lua_gettop(L), (int)k);
  lua_pop(L, 1);
  return 0;
}

/* Load bytecode code[0..len) as the function at `at`, then its upvalues. */
static int dec_load(dec *D, const unsigned char *at, const char *code, size_t len) {
  lua_State *L = D->L;
  chunk c = {code, len};
  int st = lua_load(L, chunk_reader, &c, "=remote", "b");
  if (st != LUA_OK) {
    if (st == LUA_ERRMEM) {
      bad(D, "out of memory loading bytecode at offset %zu", offset(D, at));
      return LPAR_ENOMEM;
    }
    return bad(D, "bad bytecode at offset %zu: %s", offset(D, at), lua_tostring(L, -1));
  }
  int f = lua_gettop(L);
  add_ref(D, f);
  uint64_t nups = 0;
  int rc = get_uv(D, &nups, "upvalue count");
  if (rc) return rc;
  lua_Debug ar;
  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  if (nups != ar.nups)
    return bad(D, "function at offset %zu has %d upvalues, not %llu", offset(D, at),
               (int)ar.nups, (unsigned long long)nups);
  for (int n = 1; n <= ar.nups; n++) {
    if (D->p < D->end && *D->p == T_JOIN) {
      rc = dec_join(D, f, n);
    } else if ((rc = dec_value(D)) == 0) {
      lua_setupvalue(L, f, n);
    }
    if (rc) return rc;
  }
  D->depth--;
  return 0;
}

/* FUNC, FUNCSET or FUNCREF (the tag at `at`). */
static int dec_func(dec *D, const unsigned char *at) {
  lua_State *L = D->L;
  if (!(D->flags & LPARS_ALLOW_CODE))
    return bad(D, "bytecode not allowed from this peer (function at offset %zu)",
               offset(D, at));
  int rc = dec_enter(D, at);
  if (rc) return rc;
  const unsigned char *nonce = NULL;
  uint64_t slot = 0, len = 0;
  if (*at != T_FUNC) {
    if (left(D) < LPARF_NONCE_BYTES)
      return bad(D, "truncated function slot at offset %zu", offset(D, at));
    nonce = D->p;
    D->p += LPARF_NONCE_BYTES;
    if ((rc = get_uv(D, &slot, "function slot")) != 0) return rc;
    if (slot >= LPARF_SLOTS)
      return bad(D, "bad function slot %llu at offset %zu", (unsigned long long)slot, offset(D, at));
  }
  if (*at == T_FUNCREF) {
    if (!lparF_push(L, nonce, (unsigned)slot))
      return bad(D, "function slot %llu at offset %zu is not kept here (this engine restarted, or "
                 "forgot its functions after %d); send the function again",
                 (unsigned long long)slot, offset(D, at), LPARF_MAX_KEPT);
    size_t n;
    const char *code = lua_tolstring(L, -1, &n);
    rc = dec_load(D, at, code, n);
    if (rc == 0) lua_remove(L, -2); /* the string; the function stays on top */
    return rc;
  }
  if ((rc = get_len(D, &len, "bytecode", at)) != 0) return rc;
  const char *code = (const char *)D->p;
  D->p += len;
  if (*at == T_FUNCSET)
    lparF_keep(L, nonce, (unsigned)slot, code, (size_t)len);
  else
    lparF_count(L);
  return dec_load(D, at, code, (size_t)len);
}

static int dec_named(dec *D, int tag, const unsigned char *at) {
  uint64_t n = 0;
  int rc = get_len(D, &n, "name", at);
  if (rc) return rc;
  const char *s = (const char *)D->p;
  D->p += n;
  if (!lua_checkstack(D->L, 16)) return bad(D, "Lua stack overflow at offset %zu", offset(D, at));
  if (lparN_resolve(D->L, s, (size_t)n, tag == T_LIB ? LUA_TTABLE : LUA_TFUNCTION)) return 0;
  char shown[64];
  printable(shown, sizeof shown, s, (size_t)n);
  return bad(D, "unknown %s '%s' at offset %zu", tag == T_LIB ? "library table" : "C function",
             shown, offset(D, at));
}

static int dec_string(dec *D, uint64_t n, const unsigned char *at) {
  if (n > left(D))
    return bad(D, "bad string length %llu at offset %zu (only %zu bytes left)",
               (unsigned long long)n, offset(D, at), left(D));
  lua_pushlstring(D->L, (const char *)D->p, (size_t)n);
  D->p += n;
  return 0;
}

/* The storage of a shared matrix: a private mapping of descriptor `slot`. */
static int dec_matrix(dec *D, const unsigned char *at) {
  uint64_t rows = 0, cols = 0, kind = 0, slot = 0, off = 0; /* set by get_uv, or it fails */
  int rc;
  if ((rc = get_uv(D, &rows, "matrix rows")) || (rc = get_uv(D, &cols, "matrix columns")) ||
      (rc = get_uv(D, &kind, "matrix kind")))
    return rc;
  /* Each side is bounded too: a 2^40 x 0 matrix is empty, yet loops over its rows. */
  if (rows > ((uint64_t)1 << 31) || cols > ((uint64_t)1 << 31) ||
      (cols && rows > ((uint64_t)1 << 40) / cols))
    return bad(D, "matrix of %llux%llu at offset %zu is too large", (unsigned long long)rows,
               (unsigned long long)cols, offset(D, at));
  uint64_t count = rows * cols;
  size_t view_offset = 0;
  lparM_storage *s;
  if (kind == 0) {
    if (count > left(D) / sizeof(double))
      return bad(D, "matrix of %llux%llu at offset %zu: only %zu bytes left",
                 (unsigned long long)rows, (unsigned long long)cols, offset(D, at), left(D));
    s = lparM_storage_new_uninit((size_t)count); /* every element is copied in below */
    if (s == NULL) return bad(D, "out of memory for a %llux%llu matrix", (unsigned long long)rows,
                              (unsigned long long)cols);
    memcpy(s->data, D->p, (size_t)count * sizeof(double));
    D->p += count * sizeof(double);
  } else if (kind == 1) {
    if ((rc = get_uv(D, &slot, "matrix descriptor")) || (rc = get_uv(D, &off, "matrix offset")))
      return rc;
    char why[160];
    s = lparS_matrix_mapped(D->shm, slot, off, count, why, sizeof why);
    if (s == NULL) return bad(D, "%s, at offset %zu", why, offset(D, at));
    view_offset = (size_t)off;
  } else {
    return bad(D, "unknown matrix kind %llu at offset %zu", (unsigned long long)kind, offset(D, at));
  }
  lparM_matrix *m = lparM_push(D->L, s, (size_t)rows, (size_t)cols);
  lparM_storage_release(s); /* the userdata holds it now */
  m->offset = view_offset;
  add_ref(D, lua_gettop(D->L));
  return 0;
}

static int dec_value(dec *D) {
  lua_State *L = D->L;
  const unsigned char *at = D->p;
  if (at == D->end) return bad(D, "truncated input at offset %zu: value expected", offset(D, at));
  unsigned tag = *D->p++;
  uint64_t u = 0;
  int rc;
  if (tag >= T_SMALLINT) {
    lua_pushinteger(L, (lua_Integer)(tag - T_SMALLINT));
    return 0;
  }
  if (tag >= T_SHORTSTR && tag <= T_SHORTSTR + SHORTSTR_MAX)
    return dec_string(D, tag - T_SHORTSTR, at);
  switch (tag) {
  case T_NIL: lua_pushnil(L); return 0;
  case T_FALSE: lua_pushboolean(L, 0); return 0;
  case T_TRUE: lua_pushboolean(L, 1); return 0;
  case T_INT:
    if ((rc = get_uv(D, &u, "integer")) != 0) return rc;
    lua_pushinteger(L, unzigzag(u));
    return 0;
  case T_FLOAT:
    if (left(D) < 8) return bad(D, "truncated float at offset %zu", offset(D, at));
    lua_pushnumber(L, (lua_Number)get_f64(D->p));
    D->p += 8;
    return 0;
  case T_STR:
    if ((rc = get_uv(D, &u, "string length")) != 0) return rc;
    return dec_string(D, u, at);
  case T_TABLE: return dec_table(D, 0, at);
  case T_TABLEMT: return dec_table(D, 1, at);
  case T_REF:
    if ((rc = get_uv(D, &u, "reference")) != 0) return rc;
    if (u < 1 || u > (uint64_t)D->nrefs)
      return bad(D, "bad reference %llu at offset %zu (%lld defined)", (unsigned long long)u,
                 offset(D, at), (long long)D->nrefs);
    lua_rawgeti(L, D->refs, (lua_Integer)u);
    return 0;
  case T_GLOBALS: lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS); return 0;
  case T_FUNC:
  case T_FUNCSET:
  case T_FUNCREF: return dec_func(D, at);
  case T_MATRIX: return dec_matrix(D, at);
  case T_CFUNC:
  case T_LIB: return dec_named(D, (int)tag, at);
  case T_JOIN: return bad(D, "upvalue join outside a function at offset %zu", offset(D, at));
  case T_END: return bad(D, "table end outside a table at offset %zu", offset(D, at));
  default: return bad(D, "unknown tag 0x%02x at offset %zu", tag, offset(D, at));
  }
}

int lparS_decode(lua_State *L, const void *data, size_t len, unsigned flags,
                 int *count, char *err, size_t errlen) {
  return lparS_decode_shm(L, data, len, flags, NULL, count, err, errlen);
}

int lparS_decode_shm(lua_State *L, const void *data, size_t len, unsigned flags,
                     const lparS_shm *shm, int *count, char *err, size_t errlen) {
  if (err && errlen) err[0] = '\0';
  if (count) *count = 0;
  dec D;
  D.L = L;
  D.start = D.p = data;
  D.end = D.start + len;
  D.flags = flags;
  D.have_refs = 0;
  D.nrefs = 0;
  D.depth = 0;
  D.err = err;
  D.errlen = errlen;
  D.shm = shm;
  if (len == 0 || data == NULL) return bad(&D, "empty input");
  if (*D.p != FORMAT_VERSION)
    return bad(&D, "unsupported encoding version %u (expected %d)", *D.p, FORMAT_VERSION);
  D.p++;
  uint64_t n = 0;
  int rc = get_uv(&D, &n, "value count");
  if (rc) return rc;
  if (n > left(&D))
    return bad(&D, "bad value count %llu at offset 1 (only %zu bytes left)",
               (unsigned long long)n, left(&D));
  if (n > 1000000 || !lua_checkstack(L, (int)n + 16))
    return bad(&D, "too many values (%llu)", (unsigned long long)n);
  int top = lua_gettop(L);
  lua_pushnil(L);
  D.refs = top + 1;
  for (uint64_t i = 0; i < n && rc == 0; i++) rc = dec_value(&D);
  if (rc == 0 && D.p != D.end)
    rc = bad(&D, "trailing bytes at offset %zu (%zu bytes)", offset(&D, D.p), left(&D));
  if (rc) {
    lua_settop(L, top);
    return rc;
  }
  lua_remove(L, D.refs);
  if (count) *count = (int)n;
  return 0;
}

/* ------------------------------------------------------------ metatables */

int lparS_register_metatable(lua_State *L) {
  size_t n;
  luaL_checklstring(L, 1, &n);
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_argcheck(L, n > 0, 1, "empty metatable name");
  lua_settop(L, 2);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, REG_MT_BYNAME); /* 3 */
  luaL_getsubtable(L, LUA_REGISTRYINDEX, REG_MT_BYOBJ);  /* 4 */
  /* Forget the metatable this name had, and the name this metatable had. */
  lua_pushvalue(L, 1);
  if (lua_rawget(L, 3) == LUA_TTABLE) {
    lua_pushnil(L);
    lua_rawset(L, 4);
  } else {
    lua_pop(L, 1);
  }
  lua_pushvalue(L, 2);
  if (lua_rawget(L, 4) == LUA_TSTRING) {
    lua_pushnil(L);
    lua_rawset(L, 3);
  } else {
    lua_pop(L, 1);
  }
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_rawset(L, 3);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 1);
  lua_rawset(L, 4);
  return 0;
}
