/*
** blas.c: OpenBLAS through dlopen.
*/
#include "blas.h"

#include <dlfcn.h>
#include <stdio.h>

const lparM_blas *lparM_blas_load(char *err, size_t errlen) {
  /* Function pointers, set once; a constant table in all but name. */
  static lparM_blas blas;
  static int loaded;
  if (loaded) return &blas;
  static const char *const names[] = {"libopenblas.so.0", "libopenblas.so"};
  void *lib = NULL;
  for (size_t i = 0; lib == NULL && i < sizeof names / sizeof *names; i++)
    lib = dlopen(names[i], RTLD_NOW | RTLD_GLOBAL);
  if (lib == NULL) {
    snprintf(err, errlen, "cannot load OpenBLAS: %s", dlerror());
    return NULL;
  }
  *(void **)&blas.dgemm = dlsym(lib, "cblas_dgemm");
  *(void **)&blas.dgemv = dlsym(lib, "cblas_dgemv");
  *(void **)&blas.get_num_threads = dlsym(lib, "openblas_get_num_threads");
  *(void **)&blas.set_num_threads = dlsym(lib, "openblas_set_num_threads");
  if (!blas.dgemm || !blas.dgemv || !blas.get_num_threads || !blas.set_num_threads) {
    snprintf(err, errlen, "OpenBLAS lacks a function lpar needs (cblas_dgemm, cblas_dgemv, "
                          "openblas_get/set_num_threads)");
    return NULL;
  }
  loaded = 1;
  return &blas;
}
