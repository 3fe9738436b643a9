/*
** shm.c: memfds, copy-on-write mappings and descriptor passing.
*/
#define _GNU_SOURCE /* memfd_create */
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lpar.h"

int lparH_create(size_t bytes, int *fd, void **map) {
  int f = memfd_create("lpar-matrix", MFD_CLOEXEC);
  if (f < 0) return LPAR_ESYS;
  if (bytes > 0 && ftruncate(f, (off_t)bytes) != 0) {
    close(f);
    return LPAR_ENOMEM;
  }
  void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
  if (p == MAP_FAILED) {
    close(f);
    return LPAR_ENOMEM;
  }
  *fd = f;
  *map = p;
  return LPAR_OK;
}

int lparH_create_sealed(const void *bytes, size_t len, int *fd) {
  int f = memfd_create("lpar-request", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (f < 0) return LPAR_ESYS;
  /* Written, not mapped: no page tables to fill and tear down here. */
  const char *p = bytes;
  size_t done = 0;
  while (done < len) {
    ssize_t k = write(f, p + done, len - done);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) {
      close(f);
      return LPAR_ENOMEM;
    }
    done += (size_t)k;
  }
  if (fcntl(f, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    close(f);
    return LPAR_ESYS;
  }
  *fd = f;
  return LPAR_OK;
}

int lparH_map_private(int fd, size_t bytes, void **map) {
  struct stat st;
  if (fstat(fd, &st) != 0 || (uint64_t)st.st_size < bytes) return LPAR_EBADMSG;
  void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) return LPAR_ENOMEM;
  *map = p;
  return LPAR_OK;
}

int lparH_unshare(void *map, size_t bytes, int *fd) {
  int f;
  void *tmp;
  int rc = lparH_create(bytes, &f, &tmp);
  if (rc < 0) return rc;
  memcpy(tmp, map, bytes);
  munmap(tmp, bytes ? bytes : 1);
  /* Same address, so every view's pointers stay valid. */
  void *p = mmap(map, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, f, 0);
  if (p == MAP_FAILED) {
    close(f);
    return LPAR_ENOMEM;
  }
  *fd = f;
  return LPAR_OK;
}

int lparH_send_fds(int sock, const int *fds, int n) {
  if (n < 1 || n > LPARH_MAX_FDS) return LPAR_EINVAL;
  char byte = 'F';
  struct iovec iov = {&byte, 1};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * LPARH_MAX_FDS)];
  } u;
  memset(&u, 0, sizeof u);
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                       .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n)};
  struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
  memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)n);
  ssize_t k;
  do {
    k = sendmsg(sock, &msg, MSG_NOSIGNAL);
  } while (k < 0 && errno == EINTR);
  return k == 1 ? LPAR_OK : LPAR_ESYS;
}

int lparH_recv_fds(int sock, int *fds, int max, int wait) {
  char byte;
  struct iovec iov = {&byte, 1};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * LPARH_MAX_FDS)];
  } u;
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                       .msg_controllen = sizeof u.buf};
  ssize_t k;
  do {
    k = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | (wait ? 0 : MSG_DONTWAIT));
  } while (k < 0 && errno == EINTR);
  if (k != 1) return LPAR_EBADMSG;
  int n = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    int *in = (int *)CMSG_DATA(c);
    for (int i = 0; i < count; i++) {
      if (n < max) fds[n++] = in[i];
      else close(in[i]); /* more than promised: drop them */
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    for (int i = 0; i < n; i++) close(fds[i]);
    return LPAR_EBADMSG;
  }
  return n;
}
