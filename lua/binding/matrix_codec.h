/*
** matrix_codec.h: the memory side of a matrix in the value encoding
** (internal, prefix lparS_): its elements inline, or its memfd shared with
** the receiver (serialize.c writes and reads the bytes around them).
*/
#ifndef LPAR_MATRIX_CODEC_H
#define LPAR_MATRIX_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "matrix.h"
#include "serialize.h"

/*
** The slot in shm->fds of a memfd holding m's elements, from element
** (1,1) at *off (in doubles): the storage's own memfd, or a new one for a
** strided view. -1 when there is none (or no room): send it inline.
*/
int lparS_matrix_slot(lparS_shm *shm, const lparM_matrix *m, size_t *off);
/* Copy m's elements, row-major and contiguous, to dst (rows * cols doubles). */
void lparS_matrix_copy(const lparM_matrix *m, void *dst);
/*
** A storage mapping descriptor `slot` of shm (copy-on-write) that holds
** `count` doubles from `off`; NULL with `why` set when the slot is not
** there, the memory is too small for them, or it cannot be mapped.
*/
lparM_storage *lparS_matrix_mapped(const lparS_shm *shm, uint64_t slot, uint64_t off,
                                   uint64_t count, char *why, size_t whylen);

#endif
