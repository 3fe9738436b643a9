/*
** auth.c: HMAC-SHA256 trailers with sequence numbers, from libsodium.
*/
#include "auth.h"

#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "lpar.h"

int lparA_keygen(unsigned char key[LPARA_KEY_BYTES]) {
  if (sodium_init() < 0) return LPAR_ESYS;
  randombytes_buf(key, LPARA_KEY_BYTES);
  return LPAR_OK;
}

void lparA_init(lparA_channel *c, const unsigned char key[LPARA_KEY_BYTES], lparA_role role) {
  memset(c, 0, sizeof *c);
  memcpy(c->key, key, LPARA_KEY_BYTES);
  c->role = role;
}

void lparA_nonce(unsigned char nonce[LPARA_NONCE_BYTES]) {
  if (sodium_init() < 0) abort(); /* no randomness: nothing safe to do */
  randombytes_buf(nonce, LPARA_NONCE_BYTES);
}

void lparA_set_session(lparA_channel *c, const unsigned char ours[LPARA_NONCE_BYTES],
                       const unsigned char theirs[LPARA_NONCE_BYTES]) {
  int controller = c->role == LPARA_CONTROLLER;
  memcpy(c->session, controller ? ours : theirs, LPARA_NONCE_BYTES);
  memcpy(c->session + LPARA_NONCE_BYTES, controller ? theirs : ours, LPARA_NONCE_BYTES);
}

static void put_u64(unsigned char *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

/*
** MAC over session || role || seq || frame: the session ties it to one
** connection, the role keeps it from being reflected back at its sender.
*/
static void mac(const lparA_channel *c, lparA_role sender, const unsigned char seq[8],
                const void *head, size_t head_len, const void *frame, size_t len,
                unsigned char out[32]) {
  crypto_auth_hmacsha256_state st;
  unsigned char role = (unsigned char)sender;
  crypto_auth_hmacsha256_init(&st, c->key, LPARA_KEY_BYTES);
  crypto_auth_hmacsha256_update(&st, c->session, sizeof c->session);
  crypto_auth_hmacsha256_update(&st, &role, 1);
  crypto_auth_hmacsha256_update(&st, seq, 8);
  crypto_auth_hmacsha256_update(&st, head, head_len);
  crypto_auth_hmacsha256_update(&st, frame, len);
  crypto_auth_hmacsha256_final(&st, out);
  sodium_memzero(&st, sizeof st);
}

void lparA_sign2(lparA_channel *c, const void *head, size_t head_len, const void *payload,
                 size_t len, unsigned char trailer[LPARA_TRAILER_BYTES]) {
  put_u64(trailer, ++c->sent);
  mac(c, c->role, trailer, head, head_len, payload, len, trailer + 8);
}

void lparA_sign(lparA_channel *c, const void *frame, size_t len,
                unsigned char trailer[LPARA_TRAILER_BYTES]) {
  lparA_sign2(c, frame, len, "", 0, trailer);
}

int lparA_verify(lparA_channel *c, const void *frame, size_t len,
                 const unsigned char trailer[LPARA_TRAILER_BYTES], const char **why) {
  lparA_role peer = c->role == LPARA_CLIENT ? LPARA_CONTROLLER : LPARA_CLIENT;
  unsigned char expect[32];
  mac(c, peer, trailer, frame, len, "", 0, expect);
  if (crypto_verify_32(expect, trailer + 8) != 0) {
    c->dropped++;
    *why = "bad MAC (forged, altered, or signed with another key)";
    return LPAR_EAUTH;
  }
  uint64_t seq = get_u64(trailer);
  if (seq <= c->received) {
    c->dropped++;
    *why = "replayed or out of order (sequence number did not grow)";
    return LPAR_EAUTH;
  }
  c->received = seq;
  return LPAR_OK;
}
