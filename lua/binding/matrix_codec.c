/*
** matrix_codec.c: the memory side of a matrix in the value encoding (see
** matrix_codec.h). Every size from the wire is checked against the memfd's
** real size before it is mapped.
*/
#include "matrix_codec.h"

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "shm.h"

static int shm_slot(lparS_shm *shm, int fd, int owned) {
  for (int i = 0; i < shm->nfds; i++)
    if (shm->fds[i] == fd) return i;
  if (shm->nfds == LPARH_MAX_FDS) return -1;
  shm->fds[shm->nfds] = fd;
  shm->owned[shm->nfds] = owned;
  return shm->nfds++;
}

/* A memfd for the matrix's elements and the offset of (1,1) in it, or -1. */
static int matrix_fd(const lparM_matrix *m, size_t *off, int *owned) {
  if (lparM_contiguous(m)) {
    *off = m->offset;
    return lparM_export_fd(m->st, owned);
  }
  /* A strided view: copy its rows into a new memfd of its own. */
  int fd;
  void *map;
  size_t bytes = m->rows * m->cols * sizeof(double);
  if (lparH_create(bytes, &fd, &map) < 0) return -1;
  lparS_matrix_copy(m, map);
  munmap(map, bytes ? bytes : 1);
  *off = 0;
  *owned = 1;
  return fd;
}

int lparS_matrix_slot(lparS_shm *shm, const lparM_matrix *m, size_t *off) {
  int owned;
  int fd = matrix_fd(m, off, &owned);
  if (fd < 0) return -1;
  int slot = shm_slot(shm, fd, owned);
  if (slot < 0 && owned) close(fd);
  return slot;
}

void lparS_matrix_copy(const lparM_matrix *m, void *dst) {
  size_t row = m->cols * sizeof(double);
  if (lparM_contiguous(m)) {
    memcpy(dst, lparM_at(m, 0, 0), m->rows * row);
    return;
  }
  for (size_t i = 0; i < m->rows; i++) memcpy((char *)dst + i * row, lparM_at(m, i, 0), row);
}

lparM_storage *lparS_matrix_mapped(const lparS_shm *shm, uint64_t slot, uint64_t off,
                                   uint64_t count, char *why, size_t whylen) {
  if (shm == NULL || slot >= (uint64_t)shm->nfds) {
    snprintf(why, whylen, "matrix in shared memory %llu, but %d descriptors came",
             (unsigned long long)slot, shm ? shm->nfds : 0);
    return NULL;
  }
  struct stat st;
  int fd = shm->fds[slot];
  if (fstat(fd, &st) != 0 || st.st_size < 0 || off > (uint64_t)st.st_size / sizeof(double) ||
      count > (uint64_t)st.st_size / sizeof(double) - off) {
    snprintf(why, whylen, "shared matrix does not fit its memory");
    return NULL;
  }
  int mine = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  /* lparM_storage_from_fd owns `mine` from here, and closes it if it fails. */
  lparM_storage *s = mine < 0 ? NULL : lparM_storage_from_fd(mine, (size_t)st.st_size / sizeof(double));
  if (s == NULL) snprintf(why, whylen, "cannot map the shared matrix");
  return s;
}
