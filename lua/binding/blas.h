/*
** blas.h: OpenBLAS, loaded on first use (internal, prefix lparM_).
**
** An engine that never multiplies matrices should not pay for OpenBLAS:
** loading it starts its thread pool and buffers, about 2.6 MB of an idle
** engine's memory. So the library is dlopen'ed by the first call that needs it.
*/
#ifndef LPAR_BLAS_H
#define LPAR_BLAS_H

#include <stddef.h>

#include <cblas.h>

typedef struct lparM_blas {
  __typeof__(cblas_dgemm) *dgemm;
  __typeof__(cblas_dgemv) *dgemv;
  __typeof__(openblas_get_num_threads) *get_num_threads;
  __typeof__(openblas_set_num_threads) *set_num_threads;
} lparM_blas;

/* The loaded library, or NULL with a message in err. */
const lparM_blas *lparM_blas_load(char *err, size_t errlen);

#endif
