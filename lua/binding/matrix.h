/*
** matrix.h: dense row-major matrices of doubles (internal, prefix lparM_).
**
** A matrix is a view (offset, rows, cols, row stride) on a reference-counted
** storage. Views made by sub and tile share the storage; writes through a view
** reach its parent. The storage may be malloc'd or a mapping of shared memory
** (a memfd received from a peer, mapped copy-on-write): its `release`
** callback frees it either way.
*/
#ifndef LPAR_MATRIX_H
#define LPAR_MATRIX_H

#include <stddef.h>

#include <lua.h>

#define LPARM_METATABLE "lpar.matrix" /* the userdata's metatable in the registry */

typedef struct lparM_storage {
  double *data;
  size_t count; /* doubles */
  int refs;
  void (*release)(struct lparM_storage *s); /* frees data and s */
  void *ud;      /* for release: e.g. the mapping's length */
  int fd;        /* memfd whose contents equal data, or -1 */
  int shared;    /* data is a shared mapping of fd: writes change the file */
  int exported;  /* fd has been sent: the file must not change any more */
  int mapped;    /* data is an mmap (of fd), not heap memory */
} lparM_storage;

typedef struct lparM_matrix {
  lparM_storage *st;
  size_t offset;     /* index of element (1,1) in st->data */
  size_t rows, cols;
  size_t stride;     /* doubles between the starts of two rows (>= cols) */
} lparM_matrix;

/* New malloc'd storage of `count` doubles, refs = 1, zeroed; NULL when out of memory. */
lparM_storage *lparM_storage_new(size_t count);
/* The same, not zeroed: for a caller that writes every element at once (a decoder). */
lparM_storage *lparM_storage_new_uninit(size_t count);
/* Counts are plain ints: a storage belongs to one process and one thread. */
void lparM_storage_retain(lparM_storage *s);
/* Drops a reference; the last one calls s->release. NULL is allowed. */
void lparM_storage_release(lparM_storage *s);

/*
** Shared-memory storage (matrix_shm.c). A matrix of at least
** LPARM_SHM_MIN_BYTES is sent to a local engine as a memfd (its heap storage
** moves into one when first sent), so sending it
** passes the descriptor instead of the bytes. Every write to a storage goes
** through lparM_will_write first: once its memfd has been sent, the writer
** moves to a private copy, so what a peer received never changes.
*/
#define LPARM_SHM_MIN_BYTES ((size_t)256 << 10)
/* Storage over a private (copy-on-write) mapping of a received memfd; takes fd. */
lparM_storage *lparM_storage_from_fd(int fd, size_t count);
/* Call before writing to s (0, or LPAR_ENOMEM when a private copy cannot be made). */
int lparM_will_write(lparM_storage *s);
/*
** A memfd holding s's data, to send, marked exported. Heap storage moves
** into a memfd the first time it is sent (one copy), so sending it again,
** to this engine or another, costs nothing. *owned is set when the caller
** must close the descriptor once sent. -1 on failure.
*/
int lparM_export_fd(lparM_storage *s, int *owned);

/* Address of element (i, j), 0-based. */
double *lparM_at(const lparM_matrix *m, size_t i, size_t j);
/* Whether the view's elements are one contiguous row-major run. */
int lparM_contiguous(const lparM_matrix *m);

/*
** Push a new matrix userdata viewing `st` (retained by the call) with the
** given shape, contiguous row-major from offset 0 (the caller may then move
** m->offset). Raises an error when rows * cols exceeds st->count; like any
** Lua allocation it may raise a memory error, before retaining st. Makes
** the metatable if lparM_open has not run in this state yet.
*/
lparM_matrix *lparM_push(lua_State *L, lparM_storage *st, size_t rows, size_t cols);
/*
** The matrix at idx, or NULL for anything else and for a closed matrix (one
** whose __close or __gc has run: its st is NULL). lparM_check raises a type
** error instead, or "use of a closed matrix".
*/
lparM_matrix *lparM_test(lua_State *L, int idx);
lparM_matrix *lparM_check(lua_State *L, int idx);

/*
** lua_CFunction: the lpar.matrix module table. The metatable is registered
** under LPARM_METATABLE once per state; calling it again reuses it.
*/
int lparM_open(lua_State *L);

#endif
