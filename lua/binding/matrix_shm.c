/*
** matrix_shm.c: matrix storage in shared memory.
**
** Heap storage moves into a memfd when first sent. Then, three states:
**   shared, not exported: our own file, written in place;
**   shared, exported:     a peer may map the file, so before our next write
**                         we move to a fresh copy (lparH_unshare);
**   private:              a copy-on-write mapping of a peer's file; our first
**                         write makes our data differ from it, so we drop fd.
*/
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lpar.h"
#include "matrix.h"
#include "shm.h"

static void release_mapping(lparM_storage *s) {
  size_t bytes = s->count * sizeof(double);
  munmap(s->data, bytes ? bytes : 1);
  if (s->fd >= 0) close(s->fd);
  free(s);
}

static lparM_storage *wrap(double *data, size_t count, int fd, int shared) {
  lparM_storage *s = calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  s->data = data;
  s->count = count;
  s->refs = 1;
  s->release = release_mapping;
  s->fd = fd;
  s->shared = shared;
  s->mapped = 1;
  return s;
}

lparM_storage *lparM_storage_from_fd(int fd, size_t count) {
  void *map;
  if (count > SIZE_MAX / sizeof(double) ||
      lparH_map_private(fd, count * sizeof(double), &map) < 0) {
    close(fd);
    return NULL;
  }
  lparM_storage *s = wrap(map, count, fd, 0);
  if (s == NULL) {
    munmap(map, count ? count * sizeof(double) : 1);
    close(fd);
  }
  return s;
}

int lparM_will_write(lparM_storage *s) {
  if (s->fd < 0) return LPAR_OK;
  if (!s->shared) { /* our writes leave the peer's file behind */
    close(s->fd);
    s->fd = -1;
    return LPAR_OK;
  }
  if (!s->exported) return LPAR_OK;
  int fd;
  int rc = lparH_unshare(s->data, s->count * sizeof(double), &fd);
  if (rc < 0) return rc;
  close(s->fd);
  s->fd = fd;
  s->exported = 0;
  return LPAR_OK;
}

int lparM_export_fd(lparM_storage *s, int *owned) {
  *owned = 0;
  if (s->fd < 0) {
    /* Heap storage, or a private copy we wrote to: move it into a memfd. */
    int fd;
    void *map;
    size_t bytes = s->count * sizeof(double);
    if (lparH_create(bytes, &fd, &map) < 0) return -1;
    memcpy(map, s->data, bytes);
    if (s->mapped)
      munmap(s->data, bytes ? bytes : 1);
    else
      free(s->data);
    s->data = map; /* views find the data through s, so they follow */
    s->release = release_mapping;
    s->fd = fd;
    s->shared = s->mapped = 1;
  }
  s->exported = 1;
  return s->fd;
}
