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

#include <lua.h>

typedef struct lparM_blas {
  __typeof__(cblas_dgemm) *dgemm;
  __typeof__(cblas_dgemv) *dgemv;
  __typeof__(openblas_get_num_threads) *get_num_threads;
  __typeof__(openblas_set_num_threads) *set_num_threads;
  __typeof__(openblas_get_config) *get_config;     /* these three may be NULL */
  __typeof__(openblas_get_corename) *get_corename;
  __typeof__(openblas_get_parallel) *get_parallel;
} lparM_blas;

/* The loaded library, or NULL with a message in err. */
const lparM_blas *lparM_blas_load(char *err, size_t errlen);

/*
** The kernel. Debian's OpenBLAS is built with DYNAMIC_ARCH: at load it picks
** a kernel from cpuid, and 0.3.21 does not know recent CPUs (a Xeon with
** AMX, say), so it falls back to Prescott, a fifth of the machine's speed.
** OPENBLAS_CORETYPE, read once at load, overrides that. What OpenBLAS would
** pick cannot be asked without loading it, so lparM_blas_choose sets
** OPENBLAS_CORETYPE to the best kernel cpuid allows whenever the CPU has
** AVX2+FMA or AVX-512, before the library is loaded and before engines are
** spawned (they inherit the environment). It never overrides a user's
** OPENBLAS_CORETYPE, and LPAR_BLAS_CORETYPE=off turns it off. It also sets
** LPAR_BLAS_CHOSEN to the same name, so a child process (an engine) can tell
** lpar's choice, inherited, from a user's. Idempotent: called by
** lpar.matrix's luaopen (the hub and the controller load it before they
** spawn engines) and again just before the library is loaded.
*/
void lparM_blas_choose(void);

/* What the CPU and the OS allow, from cpuid and xgetbv. */
typedef struct lparM_cpu {
  char vendor[13];
  int avx2_fma;     /* AVX, AVX2 and FMA, with ymm state enabled by the OS */
  int avx512;       /* AVX-512 F, BW, DQ and VL, with zmm state enabled */
  int avx512_bf16;  /* and AVX512-BF16 */
  int os_disabled;  /* cpuid offers vector features whose state the OS does not save */
  const char *kernel; /* the best OPENBLAS_CORETYPE for it, or NULL to leave OpenBLAS be */
} lparM_cpu;

void lparM_cpu_detect(lparM_cpu *cpu);
/* "AVX-512 F/BW/DQ/VL, AVX512-BF16, AVX2+FMA" or the like. */
void lparM_cpu_describe(const lparM_cpu *cpu, char *buf, size_t len);

/*
** matrix.blas_info(): {vendor, version, config, path, file, kernel, threads,
** parallel, cpu, cpu_kernel, coretype, chosen_by, reason}; loads the library.
** nil, msg when it cannot be loaded.
*/
int lparM_blas_info(lua_State *L);

#endif
