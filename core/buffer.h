/*
** buffer.h: a growable byte buffer, the one allocation unit of the
** encoder and of the wire layer.
*/
#ifndef LPAR_BUFFER_H
#define LPAR_BUFFER_H

#include <stddef.h>

typedef struct lparB_buffer {
  char *data;
  size_t len; /* bytes in use */
  size_t cap; /* bytes allocated */
} lparB_buffer;

void lparB_init(lparB_buffer *b);
void lparB_free(lparB_buffer *b);
/* Make room for `extra` more bytes; 0 or LPAR_ENOMEM. */
int lparB_reserve(lparB_buffer *b, size_t extra);
int lparB_append(lparB_buffer *b, const void *p, size_t n);

#endif
