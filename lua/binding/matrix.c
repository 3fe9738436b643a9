/*
** matrix.c: dense row-major matrices of doubles and their Lua binding
** (lpar.matrix).
**
** Storage is reference-counted and shared by views (sub, tile); every
** operation that makes a new matrix makes it contiguous (stride == cols).
** Elementwise loops walk a view as "runs": one run over all elements when
** the operands are contiguous, else one run per row. Products go to
** OpenBLAS, which takes a view's stride as its leading dimension.
**
** Errors are raised with luaL_error from the binding functions, so they
** carry the position of the user's call.
*/
#include "matrix.h"
#include "blas.h"
#include "plot.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>

#define MAX_ELEMENTS ((size_t)1 << 40) /* refuse larger matrices: surely a mistake */
#define ALIGNMENT 64                   /* a cache line; what BLAS kernels like */
#define EDGE 3                         /* tostring: rows/cols shown at each end when eliding */
#define CELL 32                        /* tostring: room for one "%.6g" */
#define TBLOCK 32                      /* transpose tile: two 32x32 tiles of doubles fit L1 */

/* A shape as printf arguments for lua_pushfstring's "%Ix%I". */
#define DIMS(m) (lua_Integer)(m)->rows, (lua_Integer)(m)->cols

/* ---- storage ---------------------------------------------------------- */

static void storage_free(lparM_storage *s) {
  free(s->data);
  free(s);
}

static lparM_storage *storage_alloc(size_t count, int zero) {
  if (count > MAX_ELEMENTS || count > SIZE_MAX / sizeof(double)) return NULL;
  lparM_storage *s = malloc(sizeof *s);
  if (s == NULL) return NULL;
  /* posix_memalign of 0 bytes may give NULL, which would read as a failure */
  size_t bytes = (count ? count : 1) * sizeof(double);
  void *p = NULL;
  if (posix_memalign(&p, ALIGNMENT, bytes) != 0) {
    free(s);
    return NULL;
  }
  if (zero) memset(p, 0, bytes);
  *s = (lparM_storage){.data = p, .count = count, .refs = 1, .release = storage_free,
                       .ud = NULL, .fd = -1};
  return s;
}

lparM_storage *lparM_storage_new(size_t count) {
  return storage_alloc(count, 1);
}

lparM_storage *lparM_storage_new_uninit(size_t count) {
  return storage_alloc(count, 0);
}

void lparM_storage_retain(lparM_storage *s) {
  s->refs++;
}

void lparM_storage_release(lparM_storage *s) {
  if (s != NULL && --s->refs == 0) s->release(s);
}

/* ---- views ------------------------------------------------------------- */

double *lparM_at(const lparM_matrix *m, size_t i, size_t j) {
  return m->st->data + m->offset + i * m->stride + j;
}

int lparM_contiguous(const lparM_matrix *m) {
  return m->rows <= 1 || m->stride == m->cols;
}

/*
** Elementwise loops see a view, or two views of one shape, as `n` runs of
** `len` doubles, run k starting at run_at(m, k): a single run when all are
** contiguous, else one per row. n is 0 for an empty view, whose offset may
** point past its storage.
*/
typedef struct runs {
  size_t n, len;
} runs;

static runs runs_of(const lparM_matrix *a, const lparM_matrix *b) {
  if (a->rows == 0 || a->cols == 0) return (runs){0, 0};
  if (lparM_contiguous(a) && (b == NULL || lparM_contiguous(b)))
    return (runs){1, a->rows * a->cols};
  return (runs){a->rows, a->cols};
}

static double *run_at(const lparM_matrix *m, size_t k) {
  return m->st->data + m->offset + k * m->stride;
}

/* out = a + sign * b; out is contiguous and of a's shape. */
static void combine(lparM_matrix *out, const lparM_matrix *a, const lparM_matrix *b,
                    double sign) {
  runs r = runs_of(a, b);
  for (size_t k = 0; k < r.n; k++) {
    const double *x = run_at(a, k), *y = run_at(b, k);
    double *z = out->st->data + k * r.len;
    for (size_t e = 0; e < r.len; e++) z[e] = x[e] + sign * y[e];
  }
}

/* out = s * a; out is contiguous and of a's shape. */
static void scale(lparM_matrix *out, const lparM_matrix *a, double s) {
  runs r = runs_of(a, NULL);
  for (size_t k = 0; k < r.n; k++) {
    const double *x = run_at(a, k);
    double *z = out->st->data + k * r.len;
    for (size_t e = 0; e < r.len; e++) z[e] = s * x[e];
  }
}

/* dst = src, shapes equal; the caller makes sure they do not overlap. */
static void copy_view(lparM_matrix *dst, const lparM_matrix *src) {
  runs r = runs_of(dst, src);
  for (size_t k = 0; k < r.n; k++)
    memcpy(run_at(dst, k), run_at(src, k), r.len * sizeof(double));
}

static double sum_of(const lparM_matrix *a) {
  runs r = runs_of(a, NULL);
  double s = 0;
  for (size_t k = 0; k < r.n; k++) {
    const double *x = run_at(a, k);
    for (size_t e = 0; e < r.len; e++) s += x[e];
  }
  return s;
}

/* max |a - b| (b NULL: max |a|); NaN if any difference is NaN; 0 when empty. */
static double max_abs(const lparM_matrix *a, const lparM_matrix *b) {
  runs r = runs_of(a, b);
  double m = 0;
  for (size_t k = 0; k < r.n; k++) {
    const double *x = run_at(a, k), *y = b ? run_at(b, k) : NULL;
    for (size_t e = 0; e < r.len; e++) {
      double d = fabs(y ? x[e] - y[e] : x[e]);
      if (d > m || isnan(d)) m = d; /* once NaN, m stays NaN: d > NaN is false */
    }
  }
  return m;
}

/*
** Frobenius norm. The plain sum of squares is exact enough and fast; only
** when it overflows or underflows is it redone scaled by the largest element.
*/
static double norm_of(const lparM_matrix *a) {
  runs r = runs_of(a, NULL);
  double s = 0;
  for (size_t k = 0; k < r.n; k++) {
    const double *x = run_at(a, k);
    for (size_t e = 0; e < r.len; e++) s += x[e] * x[e];
  }
  if (isfinite(s) && s > 0x1p-900) return sqrt(s);
  double big = max_abs(a, NULL);
  if (big == 0 || !isfinite(big)) return big;
  s = 0;
  for (size_t k = 0; k < r.n; k++) {
    const double *x = run_at(a, k);
    for (size_t e = 0; e < r.len; e++) s += (x[e] / big) * (x[e] / big);
  }
  return big * sqrt(s);
}

static int equal_views(const lparM_matrix *a, const lparM_matrix *b) {
  if (a->rows != b->rows || a->cols != b->cols) return 0;
  runs r = runs_of(a, b);
  for (size_t k = 0; k < r.n; k++) {
    const double *x = run_at(a, k), *y = run_at(b, k);
    for (size_t e = 0; e < r.len; e++)
      if (x[e] != y[e]) return 0;
  }
  return 1;
}

/* out = a transposed, in tiles so that neither side strides through memory. */
static void transpose(lparM_matrix *out, const lparM_matrix *a) {
  size_t rows = a->rows, cols = a->cols;
  double *z = out->st->data;
  for (size_t i0 = 0; i0 < rows; i0 += TBLOCK) {
    size_t i1 = i0 + TBLOCK < rows ? i0 + TBLOCK : rows;
    for (size_t j0 = 0; j0 < cols; j0 += TBLOCK) {
      size_t j1 = j0 + TBLOCK < cols ? j0 + TBLOCK : cols;
      for (size_t i = i0; i < i1; i++) {
        const double *x = lparM_at(a, i, 0);
        for (size_t j = j0; j < j1; j++) z[j * rows + i] = x[j];
      }
    }
  }
}

/* ---- the userdata ------------------------------------------------------ */

static void fill_metatable(lua_State *L);

/* Push the matrix metatable, creating it on first use in this state. */
static void push_metatable(lua_State *L) {
  if (luaL_newmetatable(L, LPARM_METATABLE)) fill_metatable(L);
}

lparM_matrix *lparM_test(lua_State *L, int idx) {
  lparM_matrix *m = luaL_testudata(L, idx, LPARM_METATABLE);
  return m && m->st ? m : NULL;
}

lparM_matrix *lparM_check(lua_State *L, int idx) {
  lparM_matrix *m = luaL_checkudata(L, idx, LPARM_METATABLE);
  if (m->st == NULL) luaL_error(L, "use of a closed matrix");
  return m;
}

/*
** Lua sees a matrix as a small userdata, not the storage behind it, so a
** loop making big temporaries would pile them up: under the generational
** collector (Debian's lua5.4 default) they even grow old before they die,
** and a GC step with the bytes as debt never reaches them. So the bytes
** of new storages are counted (in the registry under &alloc_key), and once
** they pass FORCE_MIN and twice the Lua heap, a full collection runs: its
** cost follows the Lua heap, so it is paid for by that many bytes, as
** Lua's own pace does. Collecting often also lets malloc reuse the freed
** blocks instead of faulting in fresh pages (A + B on 1024x1024: 0.7 ms
** against 4 ms).
*/
static const char alloc_key = 'a';
#define FORCE_MIN ((size_t)8 << 20)

static void account(lua_State *L, size_t bytes) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &alloc_key);
  size_t since = (size_t)lua_tointeger(L, -1) + bytes;
  lua_pop(L, 1);
  if (since >= FORCE_MIN && since / 2048 >= (size_t)lua_gc(L, LUA_GCCOUNT) &&
      lua_gc(L, LUA_GCISRUNNING) == 1) {
    since = 0;
    lua_gc(L, LUA_GCCOLLECT);
  }
  lua_pushinteger(L, (lua_Integer)since);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &alloc_key);
}

lparM_matrix *lparM_push(lua_State *L, lparM_storage *st, size_t rows, size_t cols) {
  if (rows > MAX_ELEMENTS || cols > MAX_ELEMENTS || (rows && cols > st->count / rows))
    luaL_error(L, "a %Ix%I matrix does not fit a storage of %I doubles", (lua_Integer)rows,
               (lua_Integer)cols, (lua_Integer)st->count);
  push_metatable(L);
  lparM_matrix *m = lua_newuserdatauv(L, sizeof *m, 0);
  *m = (lparM_matrix){.st = st, .offset = 0, .rows = rows, .cols = cols, .stride = cols};
  lparM_storage_retain(st);
  lua_insert(L, -2);
  lua_setmetatable(L, -2);
  account(L, rows * cols * sizeof(double));
  return m;
}

/* A new userdata viewing `parent`'s storage (retained), fields to be set by the caller. */
static lparM_matrix *push_view(lua_State *L, const lparM_matrix *parent) {
  push_metatable(L);
  lparM_matrix *m = lua_newuserdatauv(L, sizeof *m, 0);
  *m = *parent;
  lparM_storage_retain(m->st);
  lua_insert(L, -2);
  lua_setmetatable(L, -2);
  return m;
}

static void check_shape(lua_State *L, const char *fn, size_t rows, size_t cols) {
  if (rows > MAX_ELEMENTS || cols > MAX_ELEMENTS || (rows && cols > MAX_ELEMENTS / rows))
    luaL_error(L, "%s: a %Ix%I matrix is too large (at most 2^40 elements)", fn,
               (lua_Integer)rows, (lua_Integer)cols);
}

/*
** Push a new contiguous rows x cols matrix (zeroed if asked). The userdata
** comes first, with its metatable, so that a failure to allocate the
** storage leaks nothing.
*/
static lparM_matrix *push_new(lua_State *L, const char *fn, size_t rows, size_t cols,
                              int zero) {
  check_shape(L, fn, rows, cols);
  push_metatable(L);
  lparM_matrix *m = lua_newuserdatauv(L, sizeof *m, 0);
  *m = (lparM_matrix){.st = NULL, .rows = rows, .cols = cols, .stride = cols};
  lua_insert(L, -2);
  lua_setmetatable(L, -2);
  /*
  ** On the heap even when big: a fresh memfd costs a page fault per page
  ** (A + B on 1024x1024: 6.7 ms in a memfd, 0.7 ms on the heap, whose
  ** freed blocks are reused), and lparM_export_fd copies a heap storage
  ** into a memfd only when it is actually sent.
  */
  m->st = storage_alloc(rows * cols, zero);
  if (m->st == NULL)
    luaL_error(L, "%s: out of memory for a %Ix%I matrix", fn, (lua_Integer)rows,
               (lua_Integer)cols);
  account(L, rows * cols * sizeof(double));
  return m;
}

/* __gc, __close: idempotent, so they may run in any order. */
static int m_release(lua_State *L) {
  lparM_matrix *m = luaL_checkudata(L, 1, LPARM_METATABLE);
  lparM_storage_release(m->st);
  m->st = NULL;
  return 0;
}

/* ---- argument checks --------------------------------------------------- */

/* How a bad argument reads in an error: its value if simple, else its type. */
static const char *describe(lua_State *L, int arg) {
  switch (lua_type(L, arg)) {
  case LUA_TNONE:
  case LUA_TNIL: return "nil";
  case LUA_TNUMBER:
  case LUA_TBOOLEAN: return luaL_tolstring(L, arg, NULL);
  default: return luaL_typename(L, arg);
  }
}

/* A non-negative integer size at arg; what names it in errors ("rows"). */
static size_t check_size(lua_State *L, const char *fn, int arg, const char *what) {
  int ok = 0;
  lua_Integer n = lua_type(L, arg) == LUA_TNUMBER ? lua_tointegerx(L, arg, &ok) : 0;
  if (!ok) luaL_error(L, "%s: %s must be an integer, got %s", fn, what, describe(L, arg));
  if (n < 0) luaL_error(L, "%s: %s must be >= 0, got %I", fn, what, n);
  if ((lua_Unsigned)n > MAX_ELEMENTS)
    luaL_error(L, "%s: %s = %I is too large (at most 2^40 elements)", fn, what, n);
  return (size_t)n;
}

/* Two 1-based indices at arg, arg + 1 (integers, any range; callers check bounds). */
static void check_pair(lua_State *L, const char *fn, int arg, const char *what,
                       lua_Integer *i, lua_Integer *j) {
  int oki, okj;
  *i = lua_tointegerx(L, arg, &oki);
  *j = lua_tointegerx(L, arg + 1, &okj);
  if (!oki || !okj)
    luaL_error(L, "%s: %s (%s, %s) must be two integers", fn, what, describe(L, arg),
               describe(L, arg + 1));
}

/* Element (i, j) of m, 1-based, checked. */
static double *check_element(lua_State *L, const char *fn, const lparM_matrix *m) {
  lua_Integer i, j;
  check_pair(L, fn, 2, "index", &i, &j);
  if (i < 1 || j < 1 || (lua_Unsigned)i > m->rows || (lua_Unsigned)j > m->cols)
    luaL_error(L, "%s: index (%I, %I) out of bounds for %Ix%I", fn, i, j, DIMS(m));
  return lparM_at(m, (size_t)i - 1, (size_t)j - 1);
}

static void check_same_shape(lua_State *L, const char *fn, const lparM_matrix *a,
                             const lparM_matrix *b) {
  if (a->rows != b->rows || a->cols != b->cols)
    luaL_error(L, "%s: shapes %Ix%I and %Ix%I differ", fn, DIMS(a), DIMS(b));
}

/* The matrix operand of an arithmetic metamethod, with a clear error otherwise. */
static lparM_matrix *check_operand(lua_State *L, const char *fn, int idx) {
  if (lparM_test(L, idx) == NULL && lua_type(L, idx) != LUA_TUSERDATA)
    luaL_error(L, "%s: both operands must be matrices, got a %s", fn, luaL_typename(L, idx));
  return lparM_check(L, idx);
}

/* ---- constructors ------------------------------------------------------ */

static int m_new(lua_State *L) {
  size_t r = check_size(L, "new", 1, "rows"), c = check_size(L, "new", 2, "cols");
  double fill = luaL_optnumber(L, 3, 0);
  lparM_matrix *m = push_new(L, "new", r, c, fill == 0);
  if (fill != 0)
    for (size_t k = 0; k < r * c; k++) m->st->data[k] = fill;
  return 1;
}

static int m_zeros(lua_State *L) {
  size_t r = check_size(L, "zeros", 1, "rows"), c = check_size(L, "zeros", 2, "cols");
  push_new(L, "zeros", r, c, 1);
  return 1;
}

static int m_ones(lua_State *L) {
  size_t r = check_size(L, "ones", 1, "rows"), c = check_size(L, "ones", 2, "cols");
  lparM_matrix *m = push_new(L, "ones", r, c, 0);
  for (size_t k = 0; k < r * c; k++) m->st->data[k] = 1;
  return 1;
}

static int m_eye(lua_State *L) {
  size_t n = check_size(L, "eye", 1, "n");
  lparM_matrix *m = push_new(L, "eye", n, n, 1);
  for (size_t k = 0; k < n; k++) m->st->data[k * n + k] = 1;
  return 1;
}

/*
** random: xoshiro256** seeded through splitmix64, so a seed gives the same
** numbers on every machine and run (rand() would not). Without a seed, the
** time, the pid and a per-module call counter (upvalue 1) make the seed.
*/
static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15u);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro_next(uint64_t s[4]) {
  uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return out;
}

static uint64_t fresh_seed(lua_State *L) {
  lua_Integer calls = lua_tointeger(L, lua_upvalueindex(1)) + 1;
  lua_pushinteger(L, calls);
  lua_replace(L, lua_upvalueindex(1));
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t x = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
  x ^= (uint64_t)getpid() << 32;
  return splitmix64(&x) ^ (uint64_t)calls;
}

static int m_random(lua_State *L) {
  size_t r = check_size(L, "random", 1, "rows"), c = check_size(L, "random", 2, "cols");
  uint64_t seed = lua_isnoneornil(L, 3) ? fresh_seed(L) : (uint64_t)luaL_checkinteger(L, 3);
  lparM_matrix *m = push_new(L, "random", r, c, 0);
  uint64_t s[4];
  for (int k = 0; k < 4; k++) s[k] = splitmix64(&seed);
  double *z = m->st->data;
  for (size_t k = 0; k < r * c; k++) z[k] = (double)(xoshiro_next(s) >> 11) * 0x1p-53;
  return 1;
}

/* Row i (1-based) of from's table, pushed; returns its length. */
static size_t from_row(lua_State *L, lua_Integer i) {
  if (lua_rawgeti(L, 1, i) != LUA_TTABLE)
    luaL_error(L, "from: row %I is a %s, not a table of numbers", i, luaL_typename(L, -1));
  return lua_rawlen(L, -1);
}

/* matrix.from{{1, 2}, {3, 4}}: a table of rows, all of one length. */
static int m_from(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t r = lua_rawlen(L, 1), c = 0;
  for (size_t i = 1; i <= r; i++) {
    size_t len = from_row(L, (lua_Integer)i);
    if (i == 1) c = len;
    else if (len != c)
      luaL_error(L, "from: row %I has length %I, but row 1 has length %I", (lua_Integer)i,
                 (lua_Integer)len, (lua_Integer)c);
    lua_pop(L, 1);
  }
  lparM_matrix *m = push_new(L, "from", r, c, 0);
  for (size_t i = 0; i < r; i++) {
    from_row(L, (lua_Integer)i + 1);
    for (size_t j = 0; j < c; j++) {
      if (lua_rawgeti(L, -1, (lua_Integer)j + 1) != LUA_TNUMBER)
        luaL_error(L, "from: element (%I, %I) is a %s, not a number", (lua_Integer)i + 1,
                   (lua_Integer)j + 1, luaL_typename(L, -1));
      m->st->data[i * c + j] = lua_tonumber(L, -1);
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  return 1;
}

/* Block (i, j), 1-based, of block's table: a live matrix, anchored by the table. */
static lparM_matrix *block_at(lua_State *L, size_t i, size_t j) {
  lua_rawgeti(L, 1, (lua_Integer)i);
  lua_rawgeti(L, -1, (lua_Integer)j);
  lparM_matrix *m = lparM_test(L, -1);
  if (m == NULL)
    luaL_error(L, "block: block (%I, %I) is a %s, not a matrix", (lua_Integer)i,
               (lua_Integer)j, luaL_typename(L, -1));
  lua_pop(L, 2);
  return m;
}

/* Check that block's table is a grid of blocks; returns its size in blocks. */
static void block_grid(lua_State *L, size_t *nr, size_t *nc) {
  luaL_checktype(L, 1, LUA_TTABLE);
  *nr = lua_rawlen(L, 1);
  *nc = 0;
  for (size_t i = 1; i <= *nr; i++) {
    if (lua_rawgeti(L, 1, (lua_Integer)i) != LUA_TTABLE)
      luaL_error(L, "block: row %I is a %s, not a table of matrices", (lua_Integer)i,
                 luaL_typename(L, -1));
    size_t len = lua_rawlen(L, -1);
    if (i == 1) *nc = len;
    else if (len != *nc)
      luaL_error(L, "block: row %I has %I blocks, but row 1 has %I", (lua_Integer)i,
                 (lua_Integer)len, (lua_Integer)*nc);
    lua_pop(L, 1);
  }
}

/* Block (i, j) must be as tall as the first of its row and as wide as the top of its column. */
static void block_fits(lua_State *L, size_t i, size_t j) {
  const lparM_matrix *b = block_at(L, i, j), *left = block_at(L, i, 1), *top = block_at(L, 1, j);
  lua_Integer bi = (lua_Integer)i, bj = (lua_Integer)j;
  if (b->rows != left->rows)
    luaL_error(L, "block: block (%I, %I) is %Ix%I, but block (%I, 1) in its row has %I rows", bi,
               bj, DIMS(b), bi, (lua_Integer)left->rows);
  if (b->cols != top->cols)
    luaL_error(L, "block: block (%I, %I) is %Ix%I, but block (1, %I) in its column has %I columns",
               bi, bj, DIMS(b), bj, (lua_Integer)top->cols);
}

/* Add n to a block sum, refusing more than MAX_ELEMENTS (so it cannot wrap). */
static size_t add_size(lua_State *L, size_t sum, size_t n) {
  if (n > MAX_ELEMENTS - sum) luaL_error(L, "block: the result is too large (at most 2^40 rows)");
  return sum + n;
}

/*
** matrix.block{{A, B}, {C, D}}: blocks in a row share their height (that of
** the row's first block), blocks in a column their width (the top block's).
*/
static int m_block(lua_State *L) {
  size_t nr, nc, rows = 0, cols = 0;
  block_grid(L, &nr, &nc);
  if (nc == 0) nr = 0; /* {{}, {}}: no blocks, a 0x0 result */
  for (size_t i = 1; i <= nr; i++)
    for (size_t j = 1; j <= nc; j++) block_fits(L, i, j);
  for (size_t i = 1; i <= nr; i++) rows = add_size(L, rows, block_at(L, i, 1)->rows);
  for (size_t j = 1; j <= nc; j++) cols = add_size(L, cols, block_at(L, 1, j)->cols);
  lparM_matrix *m = push_new(L, "block", rows, cols, 0);
  size_t r0 = 0;
  for (size_t i = 1; i <= nr; i++) {
    size_t c0 = 0;
    for (size_t j = 1; j <= nc; j++) {
      const lparM_matrix *b = block_at(L, i, j);
      lparM_matrix dst = {.st = m->st, .offset = r0 * cols + c0, .rows = b->rows,
                          .cols = b->cols, .stride = cols};
      copy_view(&dst, b);
      c0 += b->cols;
    }
    r0 += block_at(L, i, 1)->rows;
  }
  return 1;
}

/* ---- element access and views ----------------------------------------- */

static int m_get(lua_State *L) {
  lua_pushnumber(L, *check_element(L, "get", lparM_check(L, 1)));
  return 1;
}

/* Before writing to a's storage: a peer may hold its memfd (see lparM_will_write). */
static void will_write(lua_State *L, const char *fn, const lparM_matrix *a) {
  if (lparM_will_write(a->st) < 0)
    luaL_error(L, "%s: out of memory for a private copy of a shared %Ix%I matrix", fn, DIMS(a));
}

static int m_set(lua_State *L) {
  lparM_matrix *m = lparM_check(L, 1);
  double v = luaL_checknumber(L, 4);
  double *p = check_element(L, "set", m);
  will_write(L, "set", m);
  *p = v;
  return 0;
}

static int m_shape(lua_State *L) {
  lparM_matrix *m = lparM_check(L, 1);
  lua_pushinteger(L, (lua_Integer)m->rows);
  lua_pushinteger(L, (lua_Integer)m->cols);
  return 2;
}

/* #A is the number of rows: a matrix reads as a list of rows (totable's shape). */
static int m_len(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)lparM_check(L, 1)->rows);
  return 1;
}

static int m_totable(lua_State *L) {
  lparM_matrix *m = lparM_check(L, 1);
  lua_createtable(L, m->rows > INT_MAX ? INT_MAX : (int)m->rows, 0);
  for (size_t i = 0; i < m->rows; i++) {
    lua_createtable(L, m->cols > INT_MAX ? INT_MAX : (int)m->cols, 0);
    for (size_t j = 0; j < m->cols; j++) {
      lua_pushnumber(L, *lparM_at(m, i, j));
      lua_rawseti(L, -2, (lua_Integer)j + 1);
    }
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  return 1;
}

static int m_copy(lua_State *L) {
  lparM_matrix *a = lparM_check(L, 1);
  copy_view(push_new(L, "copy", a->rows, a->cols, 0), a);
  return 1;
}

static int m_transpose(lua_State *L) {
  lparM_matrix *a = lparM_check(L, 1);
  transpose(push_new(L, "T", a->cols, a->rows, 0), a);
  return 1;
}

/* A 1-based inclusive range lo..hi of n, possibly empty (hi == lo - 1). */
static int range_ok(lua_Integer lo, lua_Integer hi, size_t n) {
  return lo >= 1 && hi >= lo - 1 && (lua_Unsigned)hi <= n;
}

/* A:sub(r1, r2, c1, c2): rows r1..r2 and columns c1..c2, inclusive; columns default to all. */
static int m_sub(lua_State *L) {
  lparM_matrix *a = lparM_check(L, 1);
  lua_Integer r1, r2, c1 = 1, c2 = (lua_Integer)a->cols;
  check_pair(L, "sub", 2, "rows", &r1, &r2);
  if (!lua_isnoneornil(L, 4) || !lua_isnoneornil(L, 5))
    check_pair(L, "sub", 4, "columns", &c1, &c2);
  if (!range_ok(r1, r2, a->rows))
    luaL_error(L, "sub: rows %I..%I out of bounds for %Ix%I", r1, r2, DIMS(a));
  if (!range_ok(c1, c2, a->cols))
    luaL_error(L, "sub: columns %I..%I out of bounds for %Ix%I", c1, c2, DIMS(a));
  lparM_matrix *v = push_view(L, a);
  v->offset = a->offset + (size_t)(r1 - 1) * a->stride + (size_t)(c1 - 1);
  v->rows = (size_t)(r2 - r1 + 1);
  v->cols = (size_t)(c2 - c1 + 1);
  return 1;
}

/*
** A:tile(i, j, tr, tc): the (i, j)-th tile of the tr x tc grid over A,
** 1-based. When tr or tc does not divide A's shape, the tiles of the last
** row or column of tiles are smaller: they hold what is left.
*/
static int m_tile(lua_State *L) {
  lparM_matrix *a = lparM_check(L, 1);
  lua_Integer i, j, tr, tc;
  check_pair(L, "tile", 2, "tile index", &i, &j);
  check_pair(L, "tile", 4, "tile size", &tr, &tc);
  if (tr < 1 || tc < 1) luaL_error(L, "tile: tile size %Ix%I must be at least 1x1", tr, tc);
  lua_Unsigned nr = (a->rows + (lua_Unsigned)tr - 1) / (lua_Unsigned)tr;
  lua_Unsigned nc = (a->cols + (lua_Unsigned)tc - 1) / (lua_Unsigned)tc;
  if (i < 1 || j < 1 || (lua_Unsigned)i > nr || (lua_Unsigned)j > nc)
    luaL_error(L, "tile: tile (%I, %I) out of bounds: %Ix%I tiles of %Ix%I cover %Ix%I", i, j,
               (lua_Integer)nr, (lua_Integer)nc, tr, tc, DIMS(a));
  size_t r0 = (size_t)(i - 1) * (size_t)tr, c0 = (size_t)(j - 1) * (size_t)tc;
  lparM_matrix *v = push_view(L, a);
  v->offset = a->offset + r0 * a->stride + c0;
  v->rows = a->rows - r0 < (size_t)tr ? a->rows - r0 : (size_t)tr;
  v->cols = a->cols - c0 < (size_t)tc ? a->cols - c0 : (size_t)tc;
  return 1;
}

/* A:set_sub(r, c, B): copy B into A with B's (1, 1) at (r, c); returns A. */
static int m_set_sub(lua_State *L) {
  lparM_matrix *a = lparM_check(L, 1), *b = lparM_check(L, 4);
  lua_Integer r, c;
  check_pair(L, "set_sub", 2, "position", &r, &c);
  if (r < 1 || c < 1 || (lua_Unsigned)r - 1 + b->rows > a->rows ||
      (lua_Unsigned)c - 1 + b->cols > a->cols)
    luaL_error(L, "set_sub: a %Ix%I block at (%I, %I) does not fit in %Ix%I", DIMS(b), r, c,
               DIMS(a));
  if (b->st == a->st) { /* B may overlap the target: copy it first */
    lparM_matrix *t = push_new(L, "set_sub", b->rows, b->cols, 0);
    copy_view(t, b);
    b = t;
  }
  will_write(L, "set_sub", a);
  lparM_matrix dst = *a;
  dst.offset = a->offset + (size_t)(r - 1) * a->stride + (size_t)(c - 1);
  dst.rows = b->rows;
  dst.cols = b->cols;
  copy_view(&dst, b);
  lua_settop(L, 1);
  return 1;
}

/* ---- products and arithmetic ------------------------------------------ */

/* OpenBLAS, loaded on first use (see blas.h); raises when it cannot be. */
static const lparM_blas *blas(lua_State *L) {
  char err[256];
  const lparM_blas *b = lparM_blas_load(err, sizeof err);
  if (b == NULL) luaL_error(L, "lpar.matrix: %s", err);
  return b;
}

static void check_blas_int(lua_State *L, size_t n) {
  if (n > INT_MAX) luaL_error(L, "dot: dimension %I is too large for BLAS", (lua_Integer)n);
}

/*
** A:dot(B). A single column B or single row A goes to dgemv (gemm's
** blocking only costs there); the rest to dgemm. The row stride of a view
** is its leading dimension, and B's row stride the step down its column.
** The result is zeroed first: some OpenBLAS versions scale y by beta = 0,
** which would turn the allocator's garbage NaNs into NaN results.
*/
static int m_dot(lua_State *L) {
  lparM_matrix *a = lparM_check(L, 1), *b = lparM_check(L, 2);
  if (a->cols != b->rows)
    luaL_error(L, "dot: shapes %Ix%I and %Ix%I do not align (%I ~= %I)", DIMS(a), DIMS(b),
               (lua_Integer)a->cols, (lua_Integer)b->rows);
  size_t m = a->rows, k = a->cols, n = b->cols;
  lparM_matrix *c = push_new(L, "dot", m, n, 1);
  if (m == 0 || n == 0 || k == 0) return 1;
  check_blas_int(L, m);
  check_blas_int(L, n);
  check_blas_int(L, a->stride);
  check_blas_int(L, b->stride);
  const double *pa = lparM_at(a, 0, 0), *pb = lparM_at(b, 0, 0);
  const lparM_blas *B = blas(L);
  if (n == 1)
    B->dgemv(CblasRowMajor, CblasNoTrans, (int)m, (int)k, 1.0, pa, (int)a->stride, pb,
                (int)b->stride, 0.0, c->st->data, 1);
  else if (m == 1)
    B->dgemv(CblasRowMajor, CblasTrans, (int)k, (int)n, 1.0, pb, (int)b->stride, pa, 1, 0.0,
                c->st->data, 1);
  else
    B->dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)k, 1.0, pa,
                (int)a->stride, pb, (int)b->stride, 0.0, c->st->data, (int)n);
  return 1;
}

static int arith(lua_State *L, const char *fn, double sign) {
  lparM_matrix *a = check_operand(L, fn, 1), *b = check_operand(L, fn, 2);
  check_same_shape(L, fn, a, b);
  combine(push_new(L, fn, a->rows, a->cols, 0), a, b, sign);
  return 1;
}

static int m_add(lua_State *L) {
  return arith(L, "add", 1);
}

static int m_sub_op(lua_State *L) {
  return arith(L, "sub", -1);
}

/* A * s and s * A; a product of matrices is A:dot(B), never `*`. */
static int m_mul(lua_State *L) {
  int mi = luaL_testudata(L, 1, LPARM_METATABLE) ? 1 : 2, si = 3 - mi;
  lparM_matrix *a = lparM_check(L, mi);
  if (luaL_testudata(L, si, LPARM_METATABLE))
    return luaL_error(L, "mul: * scales a matrix by a number; use A:dot(B) for the product");
  if (lua_type(L, si) != LUA_TNUMBER)
    return luaL_error(L, "mul: cannot multiply a matrix by a %s", luaL_typename(L, si));
  scale(push_new(L, "mul", a->rows, a->cols, 0), a, lua_tonumber(L, si));
  return 1;
}

static int m_unm(lua_State *L) {
  lparM_matrix *a = lparM_check(L, 1);
  scale(push_new(L, "unm", a->rows, a->cols, 0), a, -1);
  return 1;
}

static int m_eq(lua_State *L) {
  lparM_matrix *a = lparM_test(L, 1), *b = lparM_test(L, 2);
  lua_pushboolean(L, a && b && equal_views(a, b));
  return 1;
}

static int m_max_abs_diff(lua_State *L) {
  lparM_matrix *a = lparM_check(L, 1), *b = lparM_check(L, 2);
  check_same_shape(L, "max_abs_diff", a, b);
  lua_pushnumber(L, max_abs(a, b));
  return 1;
}

static int m_norm(lua_State *L) {
  lua_pushnumber(L, norm_of(lparM_check(L, 1)));
  return 1;
}

static int m_sum(lua_State *L) {
  lua_pushnumber(L, sum_of(lparM_check(L, 1)));
  return 1;
}

/* ---- tostring ---------------------------------------------------------- */

/*
** The indices shown of n rows or columns: all when n <= 2 * EDGE, else
** EDGE from each end with "..." after the first EDGE. Returns the count.
*/
static size_t shown(size_t n, size_t idx[2 * EDGE]) {
  size_t count = n <= 2 * EDGE ? n : 2 * EDGE;
  for (size_t k = 0; k < count; k++) idx[k] = n <= 2 * EDGE || k < EDGE ? k : n - 2 * EDGE + k;
  return count;
}

/* Like numpy: matrix(RxC) then the rows, cells right-aligned to one width. */
static int m_tostring(lua_State *L) {
  lparM_matrix *m = lparM_check(L, 1);
  size_t ri[2 * EDGE], ci[2 * EDGE], nr = shown(m->rows, ri), nc = shown(m->cols, ci);
  char cell[2 * EDGE][2 * EDGE][CELL];
  int width = 1;
  for (size_t i = 0; i < nr; i++)
    for (size_t j = 0; j < nc; j++) {
      int w = snprintf(cell[i][j], CELL, "%.6g", *lparM_at(m, ri[i], ci[j]));
      if (w > width) width = w;
    }
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  lua_pushfstring(L, "matrix(%Ix%I)\n[", DIMS(m));
  luaL_addvalue(&b);
  for (size_t i = 0; i < nr; i++) {
    luaL_addstring(&b, i ? " [" : "[");
    for (size_t j = 0; j < nc; j++) {
      char pad[CELL + 2];
      snprintf(pad, sizeof pad, "%*s%s", width, cell[i][j], j + 1 < nc ? ", " : "");
      luaL_addstring(&b, pad);
      if (j + 1 == EDGE && m->cols > 2 * EDGE) luaL_addstring(&b, "..., ");
    }
    luaL_addstring(&b, i + 1 < nr ? "],\n" : "]");
    if (i + 1 == EDGE && m->rows > 2 * EDGE) luaL_addstring(&b, " ...,\n");
  }
  luaL_addchar(&b, ']');
  luaL_pushresult(&b);
  return 1;
}

/* ---- the module -------------------------------------------------------- */

/* __index: the fields rows and cols, then the methods (upvalue 1). */
static int m_index(lua_State *L) {
  lparM_matrix *m = luaL_checkudata(L, 1, LPARM_METATABLE);
  const char *key = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : "";
  if (!strcmp(key, "rows") || !strcmp(key, "cols")) {
    if (m->st == NULL) return luaL_error(L, "use of a closed matrix");
    lua_pushinteger(L, (lua_Integer)(key[0] == 'r' ? m->rows : m->cols));
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int m_blas_threads(lua_State *L) {
  if (blas(L)->set_num_threads == NULL || blas(L)->get_num_threads == NULL) {
    luaL_pushfail(L); /* another BLAS than OpenBLAS: its threads are its own business */
    lua_pushstring(L, "blas_threads: the BLAS in use has no thread control (it is not OpenBLAS)");
    return 2;
  }
  if (!lua_isnoneornil(L, 1)) {
    lua_Integer n = luaL_checkinteger(L, 1);
    if (n < 1 || n > 4096) luaL_error(L, "blas_threads: need a count from 1 to 4096, got %I", n);
    blas(L)->set_num_threads((int)n);
  }
  lua_pushinteger(L, blas(L)->get_num_threads());
  return 1;
}

static int m_ismatrix(lua_State *L) {
  lua_pushboolean(L, lparM_test(L, 1) != NULL);
  return 1;
}

static const luaL_Reg methods[] = {
  {"shape", m_shape},     {"get", m_get},          {"set", m_set},
  {"totable", m_totable}, {"copy", m_copy},        {"T", m_transpose},
  {"sub", m_sub},         {"tile", m_tile},        {"set_sub", m_set_sub},
  {"dot", m_dot},         {"max_abs_diff", m_max_abs_diff}, {"norm", m_norm},
  {"sum", m_sum},         {NULL, NULL}};

static const luaL_Reg metamethods[] = {
  {"__len", m_len},  {"__add", m_add},      {"__sub", m_sub_op},
  {"__mul", m_mul},  {"__unm", m_unm},      {"__eq", m_eq},
  {"__tostring", m_tostring}, {"__gc", m_release}, {"__close", m_release},
  {NULL, NULL}};

static const luaL_Reg functions[] = {
  {"new", m_new},     {"zeros", m_zeros}, {"ones", m_ones},
  {"eye", m_eye},     {"from", m_from},   {"block", m_block},
  {"blas_threads", m_blas_threads}, {"blas_info", lparM_blas_info},
  {"ismatrix", m_ismatrix}, {NULL, NULL}};

/* The new metatable is at the top; leaves it there. */
static void fill_metatable(lua_State *L) {
  luaL_setfuncs(L, metamethods, 0);
  luaL_newlib(L, methods);
  lua_pushcclosure(L, m_index, 1);
  lua_setfield(L, -2, "__index");
}

int lparM_open(lua_State *L) {
  lparM_blas_choose(); /* OpenBLAS's kernel, before anything loads it or spawns an engine */
  push_metatable(L);
  lua_pop(L, 1);
  luaL_newlib(L, functions);
  /* The methods are functions of the module too (matrix.dot(A, B) is
     A:dot(B)): so a method sent as a value, rc[0]:apply(A.dot, A, B),
     travels by its name "lpar.matrix.dot", as module functions do. */
  luaL_setfuncs(L, methods, 0);
  lua_pushinteger(L, 0); /* random's call counter */
  lua_pushcclosure(L, m_random, 1);
  lua_setfield(L, -2, "random");
  lua_pushcfunction(L, lparG_png); /* for lpar.plot.imshow */
  lua_setfield(L, -2, "_png");
  return 1;
}
