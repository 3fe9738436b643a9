/*
** blas.c: OpenBLAS through dlopen, and the choice of its kernel from cpuid (blas.h).
*/
#define _GNU_SOURCE /* dladdr */
#include "blas.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <lauxlib.h>

/*
** cpuid: which OpenBLAS kernel this CPU can run. A feature counts only when
** the OS also saves the registers it needs (XCR0, read with xgetbv): a
** hypervisor may advertise AVX-512 in cpuid and still not enable its state,
** and then the kernel would fault.
*/
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

/* XCR0 bits: x87/SSE/AVX (1, 2) for ymm; opmask, zmm0-15 high, zmm16-31 (5, 6, 7). */
#define XCR0_YMM 0x06u
#define XCR0_ZMM 0xe6u

static unsigned long long xcr0(void) {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((unsigned long long)hi << 32) | lo;
}

static int bit(unsigned reg, int n) {
  return (reg >> n) & 1u;
}

void lparM_cpu_detect(lparM_cpu *cpu) {
  memset(cpu, 0, sizeof *cpu);
  unsigned a, b, c, d;
  if (!__get_cpuid_count(0, 0, &a, &b, &c, &d)) return;
  unsigned max_leaf = a;
  memcpy(cpu->vendor, &b, 4);
  memcpy(cpu->vendor + 4, &d, 4);
  memcpy(cpu->vendor + 8, &c, 4);
  if (max_leaf < 7 || !__get_cpuid_count(1, 0, &a, &b, &c, &d)) return;
  int fma = bit(c, 12), osxsave = bit(c, 27), avx = bit(c, 28);
  unsigned long long xcr = osxsave ? xcr0() : 0;
  int ymm = (xcr & XCR0_YMM) == XCR0_YMM, zmm = (xcr & XCR0_ZMM) == XCR0_ZMM;
  __get_cpuid_count(7, 0, &a, &b, &c, &d);
  unsigned max_sub = a;
  int avx2 = bit(b, 5);
  int avx512 = bit(b, 16) && bit(b, 17) && bit(b, 30) && bit(b, 31); /* F, DQ, BW, VL */
  int bf16 = 0;
  if (max_sub >= 1) {
    __get_cpuid_count(7, 1, &a, &b, &c, &d);
    bf16 = bit(a, 5);
  }
  cpu->avx2_fma = avx && avx2 && fma && ymm;
  cpu->avx512 = cpu->avx2_fma && avx512 && zmm;
  cpu->avx512_bf16 = cpu->avx512 && bf16;
  cpu->os_disabled = (avx && avx2 && fma && !ymm) || (avx512 && !zmm);
  /*
  ** BF16 would mean Cooperlake, but OpenBLAS 0.3.21 (Debian bookworm) does
  ** not accept that name in OPENBLAS_CORETYPE ("Core not found") and falls
  ** back to its own detection, which is what we are correcting. Its
  ** Cooperlake differs from SkylakeX only in bfloat16 routines: dgemm is
  ** the same kernel, so SkylakeX is the best name it takes.
  */
  if (cpu->avx512)
    cpu->kernel = "SkylakeX";
  else if (cpu->avx2_fma)
    cpu->kernel = "Haswell";
}

#else

void lparM_cpu_detect(lparM_cpu *cpu) {
  memset(cpu, 0, sizeof *cpu); /* not x86: OpenBLAS's own choice stands */
}

#endif

void lparM_cpu_describe(const lparM_cpu *cpu, char *buf, size_t len) {
  snprintf(buf, len, "%s%s%s%s", cpu->avx512 ? "AVX-512 F/BW/DQ/VL, " : "",
           cpu->avx512_bf16 ? "AVX512-BF16, " : "", cpu->avx2_fma ? "AVX2+FMA" : "no AVX2+FMA",
           cpu->os_disabled ? " (the OS does not enable all the vector state cpuid offers)" : "");
}

/*
** The BLAS is loaded by the names Debian's alternatives manage, the CBLAS
** interface first, so a user who switched BLAS (`update-alternatives
** --config libblas.so.3-x86_64-linux-gnu`: OpenBLAS, BLIS, the reference
** BLAS, MKL) gets the one they chose; $LPAR_BLAS names a library outright.
*/
static const char *const blas_names[] = {"libcblas.so.3", "libblas.so.3", "libopenblas.so.0",
                                         "libopenblas.so"};

/*
** What lparM_blas_choose decided. One per copy of this file (the binding
** and lpar.matrix may each link one): the environment, with
** LPAR_BLAS_CHOSEN, is what keeps the copies, and the engines, in agreement.
*/
static struct {
  int done;
  const char *source;  /* "user", "lpar" or "openblas": who picked the kernel */
  char coretype[64];   /* OPENBLAS_CORETYPE as the library will see it, or "" */
  char reason[512];
  lparM_cpu cpu;
} choice;

static int already_loaded(void) {
  for (size_t i = 0; i < sizeof blas_names / sizeof *blas_names; i++) {
    void *h = dlopen(blas_names[i], RTLD_LAZY | RTLD_NOLOAD);
    if (h != NULL) {
      dlclose(h);
      return 1;
    }
  }
  return 0;
}

/* The same words whether this process set it or inherited it. */
#define LPAR_CHOSE                                                                   \
  "lpar set OPENBLAS_CORETYPE=%s for this CPU (%s), since OpenBLAS falls back to an old " \
  "kernel on CPUs it does not know; LPAR_BLAS_CORETYPE=off leaves the kernel to OpenBLAS"

/*
** Runs at module load, before lpar starts any thread of its own: setenv is
** not safe against a concurrent getenv.
*/
void lparM_blas_choose(void) {
  if (choice.done) return;
  choice.done = 1;
  lparM_cpu_detect(&choice.cpu);
  char cpu[160];
  lparM_cpu_describe(&choice.cpu, cpu, sizeof cpu);
  const char *best = choice.cpu.kernel;
  const char *given = getenv("OPENBLAS_CORETYPE"), *mark = getenv("LPAR_BLAS_CHOSEN");
  const char *mode = getenv("LPAR_BLAS_CORETYPE");
  int off = mode != NULL && strcasecmp(mode, "off") == 0;
  int inherited = given != NULL && mark != NULL && strcmp(given, mark) == 0;
  choice.source = "openblas";
  if (given != NULL && *given && inherited && off) {
    /* An lpar above us chose, but this process was told not to (engine_env). */
    unsetenv("OPENBLAS_CORETYPE");
    unsetenv("LPAR_BLAS_CHOSEN");
    given = NULL;
  }
  if (given != NULL && *given) {
    snprintf(choice.coretype, sizeof choice.coretype, "%s", given);
    choice.source = inherited ? "lpar" : "user";
    if (inherited)
      snprintf(choice.reason, sizeof choice.reason, LPAR_CHOSE, given, cpu);
    else
      snprintf(choice.reason, sizeof choice.reason,
               "OPENBLAS_CORETYPE=%s was set by the user: kept (for this CPU, %s, lpar would "
               "choose %s)",
               given, cpu, best ? best : "none");
  } else if (off) {
    snprintf(choice.reason, sizeof choice.reason,
             "LPAR_BLAS_CORETYPE=off: the kernel is OpenBLAS's own choice (lpar would choose %s)",
             best ? best : "none");
  } else if (best == NULL) {
    snprintf(choice.reason, sizeof choice.reason,
             "this CPU (%s) has no kernel lpar would force: the kernel is OpenBLAS's own choice",
             cpu);
  } else if (already_loaded()) {
    snprintf(choice.reason, sizeof choice.reason,
             "OpenBLAS was loaded before lpar could choose its kernel: its own choice stands");
  } else if (setenv("OPENBLAS_CORETYPE", best, 1) == 0 &&
             setenv("LPAR_BLAS_CHOSEN", best, 1) == 0) {
    snprintf(choice.coretype, sizeof choice.coretype, "%s", best);
    choice.source = "lpar";
    snprintf(choice.reason, sizeof choice.reason, LPAR_CHOSE, best, cpu);
  } else {
    snprintf(choice.reason, sizeof choice.reason,
             "cannot set OPENBLAS_CORETYPE: the kernel is OpenBLAS's own choice");
  }
}

const lparM_blas *lparM_blas_load(char *err, size_t errlen) {
  /* Function pointers, set once; a constant table in all but name. */
  static lparM_blas blas;
  static int loaded;
  if (loaded) return &blas;
  lparM_blas_choose(); /* OPENBLAS_CORETYPE is read when the library initialises */
  void *lib = NULL;
  const char *chosen = getenv("LPAR_BLAS");
  if (chosen && *chosen) {
    lib = dlopen(chosen, RTLD_NOW | RTLD_GLOBAL);
    if (lib == NULL) {
      snprintf(err, errlen, "cannot load the BLAS LPAR_BLAS names: %s", dlerror());
      return NULL;
    }
  }
  for (size_t i = 0; lib == NULL && i < sizeof blas_names / sizeof *blas_names; i++) {
    lib = dlopen(blas_names[i], RTLD_NOW | RTLD_GLOBAL);
    /* A BLAS without the C interface (libblas.so.3 of some builds) will not do. */
    if (lib && !dlsym(lib, "cblas_dgemm")) {
      dlclose(lib);
      lib = NULL;
    }
  }
  if (lib == NULL) {
    snprintf(err, errlen, "cannot load a BLAS with cblas_dgemm (tried libcblas.so.3, libblas.so.3, "
                          "libopenblas.so.0): install libopenblas0, or set LPAR_BLAS");
    return NULL;
  }
  *(void **)&blas.dgemm = dlsym(lib, "cblas_dgemm");
  *(void **)&blas.dgemv = dlsym(lib, "cblas_dgemv");
  *(void **)&blas.get_num_threads = dlsym(lib, "openblas_get_num_threads");
  *(void **)&blas.set_num_threads = dlsym(lib, "openblas_set_num_threads");
  *(void **)&blas.get_config = dlsym(lib, "openblas_get_config");
  *(void **)&blas.get_corename = dlsym(lib, "openblas_get_corename");
  *(void **)&blas.get_parallel = dlsym(lib, "openblas_get_parallel");
  /* Threads are OpenBLAS's: with another BLAS they are left to it (get_num_threads is NULL). */
  if (!blas.dgemm || !blas.dgemv) {
    snprintf(err, errlen, "the BLAS loaded lacks cblas_dgemm or cblas_dgemv");
    return NULL;
  }
  loaded = 1;
  return &blas;
}

static void set_string(lua_State *L, const char *key, const char *value) {
  if (value == NULL || *value == '\0') return;
  lua_pushstring(L, value);
  lua_setfield(L, -2, key);
}

int lparM_blas_info(lua_State *L) {
  char err[256];
  const lparM_blas *b = lparM_blas_load(err, sizeof err);
  if (b == NULL) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_createtable(L, 0, 13);
  const char *config = b->get_config ? b->get_config() : NULL;
  char version[32] = "";
  int openblas = config != NULL && sscanf(config, "OpenBLAS %31s", version) == 1;
  set_string(L, "vendor", openblas ? "OpenBLAS" : "not OpenBLAS");
  set_string(L, "version", version);
  set_string(L, "config", config);
  Dl_info where;
  if (dladdr(*(void **)&b->dgemm, &where) && where.dli_fname) {
    set_string(L, "path", where.dli_fname);
    char real[PATH_MAX];
    /* Debian's alternatives make the path a chain of symbolic links. */
    if (realpath(where.dli_fname, real)) set_string(L, "file", real);
  }
  const char *kernel = b->get_corename ? b->get_corename() : NULL;
  set_string(L, "kernel", kernel);
  if (b->get_num_threads) {
    lua_pushinteger(L, b->get_num_threads());
    lua_setfield(L, -2, "threads");
  }
  if (b->get_parallel) {
    int p = b->get_parallel();
    set_string(L, "parallel", p == 0 ? "sequential" : p == 1 ? "pthreads" : "openmp");
  }
  char cpu[160];
  lparM_cpu_describe(&choice.cpu, cpu, sizeof cpu);
  set_string(L, "cpu", cpu);
  set_string(L, "cpu_kernel", choice.cpu.kernel);
  set_string(L, "coretype", choice.coretype);
  set_string(L, "chosen_by", choice.source);
  /* Say so when the library did not take the name (a build that lacks it). */
  if (choice.coretype[0] && kernel && strcasecmp(kernel, choice.coretype) != 0)
    lua_pushfstring(L, "%s; but OpenBLAS reports %s", choice.reason, kernel);
  else
    lua_pushstring(L, choice.reason);
  lua_setfield(L, -2, "reason");
  return 1;
}
