/*
** buffer.c: growable byte buffer.
*/
#include "buffer.h"

#include <stdlib.h>
#include <string.h>

#include "lpar.h"

void lparB_init(lparB_buffer *b) {
  b->data = NULL;
  b->len = 0;
  b->cap = 0;
}

void lparB_free(lparB_buffer *b) {
  free(b->data);
  lparB_init(b);
}

int lparB_reserve(lparB_buffer *b, size_t extra) {
  if (extra <= b->cap - b->len) return LPAR_OK;
  if (extra > SIZE_MAX / 2 - b->len) return LPAR_ENOMEM;
  size_t need = b->len + extra;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < need) cap *= 2; /* doubling keeps appends amortized O(1) */
  char *p = realloc(b->data, cap);
  if (p == NULL) return LPAR_ENOMEM;
  b->data = p;
  b->cap = cap;
  return LPAR_OK;
}

int lparB_append(lparB_buffer *b, const void *p, size_t n) {
  if (n == 0) return LPAR_OK;
  int rc = lparB_reserve(b, n);
  if (rc < 0) return rc;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return LPAR_OK;
}
