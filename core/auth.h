/*
** auth.h: authenticated encryption for sockets that others could reach
** (named unix sockets, TCP), internal, prefix lparA_.
**
** Threat model: anyone who can reach the socket may send bytes, record
** what passes, and replay, alter, reorder or reflect it; only holders of the
** cluster's 256-bit key are peers. So every frame is sealed with an AEAD
** (libsodium): AES-256-GCM where both ends' CPUs have it, else
** XChaCha20-Poly1305. The frame header is additional data (authenticated,
** in the clear: it says how long the frame is); the payload is encrypted,
** in segments of at most 128 KiB that each take a sequence number and carry
** a tag (route.c), so both ends can work on a large frame as it passes.
**
** When a connection opens, each side sends a hello: 16 random bytes, its
** half of the session, and whether it can do AES-256-GCM. Each direction
** then has its own key, BLAKE2b keyed with the cluster key over both halves
** and the direction, so a frame recorded on one connection means nothing on
** another, and a frame reflected back at its sender does not open. The
** nonce is the frame's sequence number in its direction, never sent: a
** replayed, dropped or reordered frame fails to open.
*/
#ifndef LPAR_AUTH_H
#define LPAR_AUTH_H

#include <stddef.h>
#include <stdint.h>

#define LPARA_KEY_BYTES 32
#define LPARA_NONCE_BYTES 16 /* one side's half of the session */
#define LPARA_HELLO_BYTES 17 /* what each side sends first: its half, its ciphers */
#define LPARA_TAG_BYTES 16   /* after each sealed payload */

typedef enum lparA_role { LPARA_CLIENT = 1, LPARA_CONTROLLER = 2 } lparA_role;

typedef enum lparA_cipher {
  LPARA_NONE = 0, /* no session yet */
  LPARA_AES256GCM = 1,
  LPARA_XCHACHA20POLY1305 = 2
} lparA_cipher;

typedef struct lparA_channel {
  unsigned char key[LPARA_KEY_BYTES]; /* the cluster's, until the session starts */
  unsigned char send_key[LPARA_KEY_BYTES], recv_key[LPARA_KEY_BYTES];
  unsigned char hello[LPARA_HELLO_BYTES]; /* ours */
  lparA_role role;
  lparA_cipher cipher;
  uint64_t sent;     /* frames sealed */
  uint64_t received; /* frames opened */
  uint64_t dropped;  /* frames refused */
} lparA_channel;

/* A new random key (libsodium's randombytes). 0 or LPAR_ESYS. */
int lparA_keygen(unsigned char key[LPARA_KEY_BYTES]);
/*
** A channel for one connection, with a fresh hello in c->hello (send it
** first). `aes` 0 declines AES-256-GCM even where the CPU has it (tests).
*/
void lparA_init(lparA_channel *c, const unsigned char key[LPARA_KEY_BYTES], lparA_role role,
                int aes);
/*
** Start the session from the peer's hello: derive both keys, pick the
** cipher, forget the cluster key. 0, or LPAR_EAUTH for a malformed hello.
*/
int lparA_start(lparA_channel *c, const unsigned char theirs[LPARA_HELLO_BYTES]);
/*
** Seal the next frame: `len` bytes of payload encrypted into `out` (which
** may be `payload` itself) and its tag, `head` authenticated as it is.
*/
void lparA_seal(lparA_channel *c, const void *head, size_t head_len, const void *payload,
                size_t len, void *out, unsigned char tag[LPARA_TAG_BYTES]);
/*
** Open the next frame in place: 0, or LPAR_EAUTH with *why set (forged,
** altered, replayed, reordered, reflected or sealed with another key); a
** refused frame is counted and the payload is then garbage.
*/
int lparA_open(lparA_channel *c, const void *head, size_t head_len, void *payload, size_t len,
               const unsigned char tag[LPARA_TAG_BYTES], const char **why);
/* "AES-256-GCM", "XChaCha20-Poly1305", or "none" before the session. */
const char *lparA_cipher_name(lparA_cipher cipher);

#endif
