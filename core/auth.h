/*
** auth.h: message authentication for sockets that others could reach
** (named unix sockets, TCP), internal, prefix lparA_.
**
** Each frame sent on such a socket is followed by a 40-byte trailer: a
** sequence number (u64, little-endian) and an HMAC-SHA256 (libsodium) over
** the connection's session (a random nonce from each side, exchanged when it
** opens), the sender's role, the sequence number and the whole frame, header
** and payload. The session keeps a frame recorded on one connection from
** being accepted on another. The receiver drops a frame whose MAC is wrong (forged, altered,
** or made with another key), whose sequence number does not grow (replayed),
** or that comes from its own role (reflected back at it).
*/
#ifndef LPAR_AUTH_H
#define LPAR_AUTH_H

#include <stddef.h>
#include <stdint.h>

#define LPARA_KEY_BYTES 32
#define LPARA_TRAILER_BYTES 40
#define LPARA_NONCE_BYTES 16

typedef enum lparA_role { LPARA_CLIENT = 1, LPARA_CONTROLLER = 2 } lparA_role;

typedef struct lparA_channel {
  unsigned char key[LPARA_KEY_BYTES];
  unsigned char session[2 * LPARA_NONCE_BYTES]; /* controller's nonce, then client's */
  lparA_role role;   /* ours; the peer's is the other */
  uint64_t sent;     /* sequence number of the last frame sent */
  uint64_t received; /* ... and of the last frame accepted */
  uint64_t dropped;  /* frames refused */
} lparA_channel;

/* A new random key (libsodium's randombytes). 0 or LPAR_ESYS. */
int lparA_keygen(unsigned char key[LPARA_KEY_BYTES]);
void lparA_init(lparA_channel *c, const unsigned char key[LPARA_KEY_BYTES], lparA_role role);
/* Fresh random bytes for our side of the session. */
void lparA_nonce(unsigned char nonce[LPARA_NONCE_BYTES]);
/* Bind the channel to one connection, once both nonces are known. */
void lparA_set_session(lparA_channel *c, const unsigned char ours[LPARA_NONCE_BYTES],
                       const unsigned char theirs[LPARA_NONCE_BYTES]);
/* The trailer for the next frame we send. */
void lparA_sign(lparA_channel *c, const void *frame, size_t len,
                unsigned char trailer[LPARA_TRAILER_BYTES]);
/* The same for a frame in two pieces (header, payload), without copying them. */
void lparA_sign2(lparA_channel *c, const void *head, size_t head_len, const void *payload,
                 size_t len, unsigned char trailer[LPARA_TRAILER_BYTES]);
/*
** Check a received frame and its trailer: 0, or LPAR_EAUTH with *why set
** ("bad MAC", "replayed or out of order"); a refused frame is counted.
*/
int lparA_verify(lparA_channel *c, const void *frame, size_t len,
                 const unsigned char trailer[LPARA_TRAILER_BYTES], const char **why);

#endif
