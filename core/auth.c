/*
** auth.c: per-connection AEAD channels, from libsodium (see auth.h).
*/
#include "auth.h"

#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "lpar.h"

#define CAN_AES 0x1 /* the hello's last byte: ciphers this side can do */
#define KDF_LABEL "lpar link keys v1"

static void need_sodium(void) {
  if (sodium_init() < 0) abort(); /* no randomness: nothing safe to do */
}

int lparA_keygen(unsigned char key[LPARA_KEY_BYTES]) {
  if (sodium_init() < 0) return LPAR_ESYS;
  randombytes_buf(key, LPARA_KEY_BYTES);
  return LPAR_OK;
}

void lparA_init(lparA_channel *c, const unsigned char key[LPARA_KEY_BYTES], lparA_role role,
                int aes) {
  need_sodium();
  memset(c, 0, sizeof *c);
  memcpy(c->key, key, LPARA_KEY_BYTES);
  c->role = role;
  randombytes_buf(c->hello, LPARA_NONCE_BYTES);
  c->hello[LPARA_NONCE_BYTES] = aes && crypto_aead_aes256gcm_is_available() ? CAN_AES : 0;
}

/* BLAKE2b keyed with the cluster key over label, direction and both halves. */
static void derive(const lparA_channel *c, lparA_role sender, const unsigned char *controller,
                   const unsigned char *client, unsigned char out[LPARA_KEY_BYTES]) {
  crypto_generichash_state st;
  unsigned char dir = (unsigned char)sender;
  crypto_generichash_init(&st, c->key, LPARA_KEY_BYTES, LPARA_KEY_BYTES);
  crypto_generichash_update(&st, (const unsigned char *)KDF_LABEL, sizeof KDF_LABEL);
  crypto_generichash_update(&st, &dir, 1);
  crypto_generichash_update(&st, controller, LPARA_HELLO_BYTES);
  crypto_generichash_update(&st, client, LPARA_HELLO_BYTES);
  crypto_generichash_final(&st, out, LPARA_KEY_BYTES);
  sodium_memzero(&st, sizeof st);
}

int lparA_start(lparA_channel *c, const unsigned char theirs[LPARA_HELLO_BYTES]) {
  if (c->cipher != LPARA_NONE || (theirs[LPARA_NONCE_BYTES] & ~CAN_AES) != 0) return LPAR_EAUTH;
  int controller = c->role == LPARA_CONTROLLER;
  const unsigned char *ctl = controller ? c->hello : theirs, *cli = controller ? theirs : c->hello;
  lparA_role peer = controller ? LPARA_CLIENT : LPARA_CONTROLLER;
  derive(c, c->role, ctl, cli, c->send_key);
  derive(c, peer, ctl, cli, c->recv_key);
  sodium_memzero(c->key, sizeof c->key);
  c->cipher = (c->hello[LPARA_NONCE_BYTES] & theirs[LPARA_NONCE_BYTES] & CAN_AES)
                  ? LPARA_AES256GCM
                  : LPARA_XCHACHA20POLY1305;
  return LPAR_OK;
}

/* The nonce of frame `seq`: its number, little-endian, then zeros. */
static void nonce_of(uint64_t seq, unsigned char nonce[crypto_aead_xchacha20poly1305_ietf_NPUBBYTES]) {
  memset(nonce, 0, crypto_aead_xchacha20poly1305_ietf_NPUBBYTES);
  for (int i = 0; i < 8; i++) nonce[i] = (unsigned char)(seq >> (8 * i));
}

void lparA_seal(lparA_channel *c, const void *head, size_t head_len, const void *payload,
                size_t len, void *out, unsigned char tag[LPARA_TAG_BYTES]) {
  unsigned char nonce[crypto_aead_xchacha20poly1305_ietf_NPUBBYTES];
  nonce_of(++c->sent, nonce);
  if (c->cipher == LPARA_AES256GCM)
    crypto_aead_aes256gcm_encrypt_detached(out, tag, NULL, payload, len, head, head_len, NULL,
                                           nonce, c->send_key);
  else
    crypto_aead_xchacha20poly1305_ietf_encrypt_detached(out, tag, NULL, payload, len, head,
                                                        head_len, NULL, nonce, c->send_key);
}

int lparA_open(lparA_channel *c, const void *head, size_t head_len, void *payload, size_t len,
               const unsigned char tag[LPARA_TAG_BYTES], const char **why) {
  unsigned char nonce[crypto_aead_xchacha20poly1305_ietf_NPUBBYTES];
  nonce_of(c->received + 1, nonce);
  int rc;
  if (c->cipher == LPARA_AES256GCM)
    rc = crypto_aead_aes256gcm_decrypt_detached(payload, NULL, payload, len, tag, head, head_len,
                                                nonce, c->recv_key);
  else if (c->cipher == LPARA_XCHACHA20POLY1305)
    rc = crypto_aead_xchacha20poly1305_ietf_decrypt_detached(payload, NULL, payload, len, tag,
                                                             head, head_len, nonce, c->recv_key);
  else
    rc = -1;
  if (rc != 0) {
    c->dropped++;
    *why = "it does not open (forged, altered, replayed, out of order, or sealed with another key)";
    return LPAR_EAUTH;
  }
  c->received++;
  return LPAR_OK;
}

const char *lparA_cipher_name(lparA_cipher cipher) {
  switch (cipher) {
  case LPARA_AES256GCM: return "AES-256-GCM";
  case LPARA_XCHACHA20POLY1305: return "XChaCha20-Poly1305";
  default: return "none";
  }
}
