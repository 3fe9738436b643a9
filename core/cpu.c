/*
** cpu.c: which OpenBLAS kernel this CPU can run, from cpuid (see blas.h).
**
** A feature counts only when the OS also saves the registers it needs
** (XCR0, read with xgetbv): a hypervisor may advertise AVX-512 in cpuid
** and still not enable its state, and then the kernel would fault.
*/
#include "blas.h"

#include <stdio.h>
#include <string.h>

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
