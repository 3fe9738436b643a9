/*
** cluster.h: what tests and the controller's relay reach of a cluster
** beyond lpar.h (internal, prefix lparK_).
*/
#ifndef LPAR_CLUSTER_H
#define LPAR_CLUSTER_H

#include <stddef.h>

#include "lpar.h"
#include "route.h"

/* Bytes as they are on the route to `engine`: for tests of bad input. */
int lparK_send_raw(lpar_cluster *c, int engine, const void *bytes, size_t len);
/* 1 for a cluster made by lpar_cluster_connect. */
int lparK_connected(const lpar_cluster *c);
/* A connected cluster's link to its controller, or NULL. */
lparR_route *lparK_link(lpar_cluster *c);
/*
** Take a connected cluster's link away from it, its handlers cleared, for
** a host's relay to own (hostrelay.h); the cluster is left with no link.
** NULL when it has none.
*/
lparR_route *lparK_take_link(lpar_cluster *c);

#endif
