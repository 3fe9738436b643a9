/*
** test_auth.c: authenticated frames. A signed frame passes; a forged, an
** altered, a replayed, a reflected frame and one signed with another key
** are refused and counted.
*/
#include <string.h>

#include "auth.h"
#include "check.h"
#include "lpar.h"

static const char frame[] = "a frame: header and payload, as bytes";

int main(void) {
  unsigned char key[LPARA_KEY_BYTES], other[LPARA_KEY_BYTES];
  CHECK(lparA_keygen(key) == LPAR_OK);
  CHECK(lparA_keygen(other) == LPAR_OK);
  CHECK(memcmp(key, other, sizeof key) != 0); /* random, 256 bits */

  lparA_channel client, controller;
  lparA_init(&client, key, LPARA_CLIENT);
  lparA_init(&controller, key, LPARA_CONTROLLER);
  unsigned char t1[LPARA_TRAILER_BYTES], t2[LPARA_TRAILER_BYTES];
  const char *why = NULL;

  lparA_sign(&client, frame, sizeof frame, t1);
  CHECK(lparA_verify(&controller, frame, sizeof frame, t1, &why) == LPAR_OK);

  /* Replay of the same frame and trailer. */
  CHECK(lparA_verify(&controller, frame, sizeof frame, t1, &why) == LPAR_EAUTH);
  CHECK(why && strstr(why, "replayed"));

  /* One byte altered, in the payload or in the trailer. */
  char altered[sizeof frame];
  memcpy(altered, frame, sizeof frame);
  altered[5] ^= 1;
  lparA_sign(&client, frame, sizeof frame, t2);
  CHECK(lparA_verify(&controller, altered, sizeof frame, t2, &why) == LPAR_EAUTH);
  CHECK(why && strstr(why, "bad MAC"));
  unsigned char bent[LPARA_TRAILER_BYTES];
  memcpy(bent, t2, sizeof bent);
  bent[20] ^= 0x40;
  CHECK(lparA_verify(&controller, frame, sizeof frame, bent, &why) == LPAR_EAUTH);
  /* The untouched frame still passes after the refusals. */
  CHECK(lparA_verify(&controller, frame, sizeof frame, t2, &why) == LPAR_OK);

  /* Signed with another key. */
  lparA_channel stranger;
  lparA_init(&stranger, other, LPARA_CLIENT);
  stranger.sent = 100; /* a sequence number that would otherwise pass */
  lparA_sign(&stranger, frame, sizeof frame, t1);
  CHECK(lparA_verify(&controller, frame, sizeof frame, t1, &why) == LPAR_EAUTH);

  /* Unsigned: a zero trailer. */
  unsigned char zero[LPARA_TRAILER_BYTES] = {0};
  zero[0] = 200;
  CHECK(lparA_verify(&controller, frame, sizeof frame, zero, &why) == LPAR_EAUTH);

  /* Reflected: the controller's own frame sent back to it. */
  lparA_sign(&controller, frame, sizeof frame, t1);
  CHECK(lparA_verify(&controller, frame, sizeof frame, t1, &why) == LPAR_EAUTH);
  CHECK(lparA_verify(&client, frame, sizeof frame, t1, &why) == LPAR_OK);

  /* A frame recorded on one connection, replayed on another: the sessions differ. */
  unsigned char n1[LPARA_NONCE_BYTES], n2[LPARA_NONCE_BYTES], n3[LPARA_NONCE_BYTES];
  lparA_nonce(n1);
  lparA_nonce(n2);
  lparA_nonce(n3);
  lparA_channel a_client, a_controller, b_controller;
  lparA_init(&a_client, key, LPARA_CLIENT);
  lparA_init(&a_controller, key, LPARA_CONTROLLER);
  lparA_init(&b_controller, key, LPARA_CONTROLLER);
  lparA_set_session(&a_client, n2, n1);
  lparA_set_session(&a_controller, n1, n2);
  lparA_set_session(&b_controller, n3, n2);
  lparA_sign(&a_client, frame, sizeof frame, t1);
  CHECK(lparA_verify(&a_controller, frame, sizeof frame, t1, &why) == LPAR_OK);
  CHECK(lparA_verify(&b_controller, frame, sizeof frame, t1, &why) == LPAR_EAUTH);
  CHECK(why && strstr(why, "bad MAC"));

  CHECKF(controller.dropped == 6, "dropped %llu", (unsigned long long)controller.dropped);
  CHECK(strcmp(lpar_strerror(LPAR_EAUTH), "message failed authentication") == 0);
  return check_report();
}
