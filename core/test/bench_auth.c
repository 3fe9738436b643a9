/*
** bench_auth.c: how fast a link seals, against the HMAC it replaced: one
** 2 MiB payload sealed again and again with AES-256-GCM, XChaCha20-Poly1305
** (lparA_seal, as links do) and HMAC-SHA256. Prints "key<TAB>GB/s<TAB>unit"
** lines for scripts/bench (medians of 5 runs). Not a test: no assertion.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sodium.h>

#include "auth.h"

#define BYTES (2u << 20)
#define ROUNDS 40

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* GB/s of sealing BYTES with channel c (aes: whether AES-256-GCM is allowed). */
static double seal_rate(int aes, const char **name, unsigned char *in, unsigned char *out) {
  unsigned char key[LPARA_KEY_BYTES] = {1}, tag[LPARA_TAG_BYTES], head[24] = {0};
  lparA_channel a, b;
  lparA_init(&a, key, LPARA_CLIENT, aes);
  lparA_init(&b, key, LPARA_CONTROLLER, aes);
  lparA_start(&a, b.hello);
  *name = lparA_cipher_name(a.cipher);
  double t = now();
  for (int i = 0; i < ROUNDS; i++) lparA_seal(&a, head, sizeof head, in, BYTES, out, tag);
  return (double)BYTES * ROUNDS / (now() - t) / 1e9;
}

static double hmac_rate(unsigned char *in) {
  unsigned char key[32] = {1}, mac[32];
  double t = now();
  for (int i = 0; i < ROUNDS; i++) crypto_auth_hmacsha256(mac, in, BYTES, key);
  return (double)BYTES * ROUNDS / (now() - t) / 1e9;
}

int main(void) {
  if (sodium_init() < 0) return 1;
  unsigned char *in = malloc(BYTES), *out = malloc(BYTES);
  if (!in || !out) return 1;
  memset(in, 7, BYTES);
  double aes[5], xchacha[5], hmac[5];
  const char *aes_name = "", *x_name = "";
  for (int r = 0; r < 5; r++) {
    aes[r] = seal_rate(1, &aes_name, in, out);
    xchacha[r] = seal_rate(0, &x_name, in, out);
    hmac[r] = hmac_rate(in);
  }
  qsort(aes, 5, sizeof *aes, by_value);
  qsort(xchacha, 5, sizeof *xchacha, by_value);
  qsort(hmac, 5, sizeof *hmac, by_value);
  printf("seal_2mib_%s\t%.3f\tGB/s\n", strcmp(aes_name, "AES-256-GCM") == 0 ? "aes256gcm" : "fallback", aes[2]);
  printf("seal_2mib_xchacha20poly1305\t%.3f\tGB/s\n", xchacha[2]);
  printf("hmac_2mib_sha256\t%.3f\tGB/s\n", hmac[2]);
  free(in);
  free(out);
  return 0;
}
