/*
** test_auth.c: AEAD channels. A sealed frame opens on the peer, in both
** directions and with both ciphers, and its payload was not in the clear;
** a forged, an altered, a replayed, a reordered, a reflected frame, one
** sealed with another key and one recorded on another connection are
** refused and counted.
*/
#define _GNU_SOURCE /* memfd_create, memmem */
#include <string.h>

#include "auth.h"
#include "check.h"
#include "lpar.h"

static const char head[24] = "a frame header, 24 bytes";
static const char text[] = "a payload with a marker: SECRET-MARKER-1234";

typedef struct sealed {
  char head[24];
  char body[sizeof text];
  unsigned char tag[LPARA_TAG_BYTES];
} sealed;

static sealed seal(lparA_channel *c) {
  sealed s;
  memcpy(s.head, head, sizeof head);
  lparA_seal(c, s.head, sizeof s.head, text, sizeof text, s.body, s.tag);
  return s;
}

/* Open a copy of s on c: 1 when it opens with the original payload. */
static int opens(lparA_channel *c, sealed s, const char **why) {
  if (lparA_open(c, s.head, sizeof s.head, s.body, sizeof s.body, s.tag, why) != LPAR_OK) return 0;
  return memcmp(s.body, text, sizeof text) == 0;
}

static void pair(const unsigned char *key, int aes, lparA_channel *client, lparA_channel *ctl) {
  lparA_init(client, key, LPARA_CLIENT, aes);
  lparA_init(ctl, key, LPARA_CONTROLLER, aes);
  CHECK(lparA_start(client, ctl->hello) == LPAR_OK);
  CHECK(lparA_start(ctl, client->hello) == LPAR_OK);
}

static void check_cipher(const unsigned char *key, const unsigned char *other, int aes) {
  lparA_channel client, ctl;
  const char *why = NULL;
  pair(key, aes, &client, &ctl);
  CHECK(client.cipher == ctl.cipher);
  CHECKF(aes || ctl.cipher == LPARA_XCHACHA20POLY1305, "cipher %s", lparA_cipher_name(ctl.cipher));
  sealed a = seal(&client);
  CHECK(memmem(a.body, sizeof a.body, "SECRET-MARKER", 13) == NULL); /* encrypted */
  CHECK(opens(&ctl, a, &why));
  CHECK(!opens(&ctl, a, &why)); /* replayed */
  CHECK(why && strstr(why, "replayed"));

  sealed b = seal(&client), c = seal(&client);
  CHECK(!opens(&ctl, c, &why)); /* out of order: b was skipped */
  sealed bent = b;
  bent.body[3] ^= 1;
  CHECK(!opens(&ctl, bent, &why)); /* payload altered */
  bent = b;
  bent.head[8] ^= 1;
  CHECK(!opens(&ctl, bent, &why)); /* header altered */
  bent = b;
  bent.tag[0] ^= 0x80;
  CHECK(!opens(&ctl, bent, &why)); /* tag altered */
  CHECK(opens(&ctl, b, &why));     /* the refusals cost nothing */
  CHECK(opens(&ctl, c, &why));

  /* Reflected: the controller's own frame back at it; its peer opens it. */
  sealed d = seal(&ctl);
  CHECK(!opens(&ctl, d, &why));
  CHECK(opens(&client, d, &why));

  /* Sealed with another key. */
  lparA_channel s_client, s_ctl;
  pair(other, aes, &s_client, &s_ctl);
  s_client.sent = client.sent;
  CHECK(!opens(&ctl, seal(&s_client), &why));

  /* Recorded on one connection, replayed on another of the same key. */
  lparA_channel b_client, b_ctl;
  pair(key, aes, &b_client, &b_ctl);
  CHECK(!opens(&b_ctl, a, &why));
  CHECK(opens(&b_ctl, seal(&b_client), &why));

  CHECKF(ctl.dropped == 7, "dropped %llu", (unsigned long long)ctl.dropped);
}

int main(void) {
  unsigned char key[LPARA_KEY_BYTES], other[LPARA_KEY_BYTES];
  CHECK(lparA_keygen(key) == LPAR_OK);
  CHECK(lparA_keygen(other) == LPAR_OK);
  CHECK(memcmp(key, other, sizeof key) != 0); /* random, 256 bits */
  check_cipher(key, other, 1);
  check_cipher(key, other, 0);

  /* One side without AES: both use XChaCha20-Poly1305. */
  lparA_channel client, ctl;
  lparA_init(&client, key, LPARA_CLIENT, 0);
  lparA_init(&ctl, key, LPARA_CONTROLLER, 1);
  CHECK(lparA_start(client.cipher == LPARA_NONE ? &client : &ctl, ctl.hello) == LPAR_OK);
  CHECK(lparA_start(&ctl, client.hello) == LPAR_OK);
  CHECK(client.cipher == LPARA_XCHACHA20POLY1305 && ctl.cipher == LPARA_XCHACHA20POLY1305);

  /* A hello with unknown cipher bits is refused; so is a second start. */
  unsigned char bad[LPARA_HELLO_BYTES];
  memcpy(bad, client.hello, sizeof bad);
  bad[LPARA_NONCE_BYTES] = 0x80;
  lparA_init(&ctl, key, LPARA_CONTROLLER, 1);
  CHECK(lparA_start(&ctl, bad) == LPAR_EAUTH);
  CHECK(lparA_start(&ctl, client.hello) == LPAR_OK);
  CHECK(lparA_start(&ctl, client.hello) == LPAR_EAUTH);

  CHECK(strcmp(lpar_strerror(LPAR_EAUTH), "message failed authentication") == 0);
  return check_report();
}
