/*
** shm.h: shared memory for large values (internal, prefix lparH_).
**
** A large matrix lives in a memfd. To send it to a local peer, the memfd's
** descriptor travels over a side socket (SCM_RIGHTS) next to the message,
** and the receiver maps it copy-on-write: the receiver may write without
** touching the sender's copy, and sending costs the same for any size.
*/
#ifndef LPAR_SHM_H
#define LPAR_SHM_H

#include <stddef.h>

#define LPARH_MAX_FDS 64 /* descriptors one message may carry */

/* A new memfd of `bytes`, mapped shared read-write at *map. 0 or LPAR_E*. */
int lparH_create(size_t bytes, int *fd, void **map);
/*
** A new memfd holding a copy of bytes[0..len), sealed against any change
** (F_SEAL_WRITE, SHRINK, GROW): its readers share one copy that none of
** them can alter or cut short. 0 or LPAR_E*.
*/
int lparH_create_sealed(const void *bytes, size_t len, int *fd);
/* Map `bytes` of memfd `fd` privately (copy-on-write). 0 or LPAR_E*. */
int lparH_map_private(int fd, size_t bytes, void **map);
/* Replace the mapping at `map` by a fresh memfd holding the same bytes. */
int lparH_unshare(void *map, size_t bytes, int *fd);

/* Send `n` descriptors as one message on a unix socket. 0 or LPAR_E*. */
int lparH_send_fds(int sock, const int *fds, int n);
/*
** Receive one message of descriptors (at most `max`); returns how many, or
** LPAR_E*. With `wait` zero it does not block (a peer sends the descriptors
** before the frame that uses them, so they are there already).
*/
int lparH_recv_fds(int sock, int *fds, int max, int wait);

#endif
