/*
** wire.h: message framing (internal, prefix lparW_).
**
** A frame is a 24-byte header followed by the payload:
**   magic u32 "LPAR" | type u8 | flags u8 | route u16 | id u64 | length u64
** little-endian. On an engine's socket the route is 0. On a controller's
** socket (see link.h) it names the engine a request is for or a reply came
** from, and the payload is sealed in segments, each followed by its tag
** (route.c, auth.h). A header that fails a check cannot be resynchronised,
** so the receiver drops the connection; a payload that fails to decode only
** fails its own request.
*/
#ifndef LPAR_WIRE_H
#define LPAR_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "buffer.h"

#define LPARW_HEADER_SIZE 24
#define LPARW_MAGIC 0x5241504cu /* "LPAR" read little-endian */

typedef struct lparW_header {
  int type;
  unsigned flags;
  unsigned route;
  uint64_t id;
  uint64_t len;
} lparW_header;

void lparW_pack_header(char out[LPARW_HEADER_SIZE], int type, unsigned flags,
                       uint64_t id, uint64_t len);
void lparW_pack_routed(char out[LPARW_HEADER_SIZE], int type, unsigned flags, unsigned route,
                       uint64_t id, uint64_t len);

/* 0, or LPAR_EBADMSG with *reason naming the fault. The route must be 0. */
int lparW_parse_header(const char in[LPARW_HEADER_SIZE], lparW_header *h,
                       const char **reason);
/* The same, for controller sockets: any route, and at most `max_len` bytes. */
int lparW_parse_routed(const char in[LPARW_HEADER_SIZE], lparW_header *h, uint64_t max_len,
                       const char **reason);

/*
** An incremental reader for non-blocking sockets: the caller asks for space,
** reads into it, then takes whole frames out.
*/
typedef struct lparW_reader {
  lparB_buffer buf;
  size_t pos;       /* start of the first unconsumed byte */
  int routed;       /* controller socket: routes allowed */
  size_t trailer;   /* bytes after each payload segment (a tag), 0 on engine sockets */
  size_t segment;   /* payload bytes per segment (each with its trailer), 0: one */
  uint64_t max_len; /* largest payload accepted */
} lparW_reader;

/* Segments of a payload of `len` bytes (at least one), `segment` bytes each (0: one). */
size_t lparW_segments(uint64_t len, size_t segment);
/* Bytes a frame of payload `len` takes on the wire, header included. */
size_t lparW_wire_size(const lparW_reader *r, uint64_t len);

void lparW_reader_init(lparW_reader *r);
void lparW_reader_free(lparW_reader *r);
/* Space to read into: at least 64 KiB, or the rest of a large frame at once. */
int lparW_reader_space(lparW_reader *r, char **p, size_t *n);
void lparW_reader_commit(lparW_reader *r, size_t n);
/*
** 1 with a frame (payload valid until the next call, its trailer right
** after it), 0 when more bytes are needed, LPAR_EBADMSG with *reason for a
** malformed header.
*/
int lparW_reader_next(lparW_reader *r, lparW_header *h, const char **payload,
                      const char **reason);
/*
** The header of the frame at the front, parsed, and how many of its bytes
** (header included) are in: 1, 0 when its header is not in yet, or
** LPAR_EBADMSG. For opening a frame's segments as they come.
*/
int lparW_reader_peek(lparW_reader *r, lparW_header *h, size_t *have, const char **reason);

/* The pid in an engine's HELLO ("lpar-engine VERSION id=N pid=P heartbeat=MS"), or -1. */
int lparW_hello_pid(const char *hello, size_t len);
/* Its heartbeat period in ms (0: it sends none); LPAR_HEARTBEAT_MS when it does not say. */
int lparW_hello_heartbeat(const char *hello, size_t len);
/*
** An EXIT's "status signal[ why]": status (-1 when malformed) and signal,
** and the why copied into why[0..whylen) ("" when none).
*/
void lparW_exit_parse(const char *text, size_t len, int *status, int *signal, char *why,
                      size_t whylen);

/*
** A route list (LPAR_FLAG_ROUTES): one request for several engines behind
** one link, sent once. The payload starts with the list, then the
** request's own payload:
**   count u16 | count x (route u16, offset u16) | payload
** little-endian. Entry i is for the engine its route names, under request
** id (header id + offset): each engine answers as for a request of its own.
** A client sends one to its controller, which sends each host's relay one
** with that host's entries (routes then index the host's engines); the
** relay hands the payload to each of its engines. A list with no entries,
** more than LPARW_MAX_FANOUT, or longer than the payload is malformed: the
** frame is dropped and counted (its header was sound, so the link stays).
*/
#define LPARW_MAX_FANOUT 4096

typedef struct lparW_fanout {
  size_t n;             /* entries */
  const char *entries;  /* n x 4 bytes */
  const char *body;     /* the request's own payload */
  size_t body_len;
} lparW_fanout;

/* Bytes a list of n entries takes. */
size_t lparW_fanout_bytes(size_t n);
/* 0, or LPAR_EBADMSG with *reason naming the fault. */
int lparW_fanout_parse(const char *payload, uint64_t len, lparW_fanout *f, const char **reason);
void lparW_fanout_get(const lparW_fanout *f, size_t i, unsigned *route, unsigned *offset);
/* Writing one into list[0 .. lparW_fanout_bytes(n)): the count, then each entry. */
void lparW_fanout_count(char *list, size_t n);
void lparW_fanout_put(char *list, size_t i, unsigned route, unsigned offset);

/* Blocking helpers for the engine: whole frames written to a blocking socket
   (it reads them with an lparW_reader). */
int lparW_write_all(int fd, const void *p, size_t n);
int lparW_send(int fd, int type, unsigned flags, uint64_t id, const void *payload,
               size_t len);

#endif
