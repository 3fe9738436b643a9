/*
** hostrelay.c: a joined host's relay (see hostrelay.h).
*/
#include "hostrelay.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shm.h"
#include "wire.h"

struct lparJ_relay {
  uv_loop_t *loop;
  lparR_route *link; /* NULL once closed */
  lpar_cluster *local;
  uv_timer_t watch;
  int open_handles; /* the link and the timer */
  int first, count, n;
  char host[64];
  uint64_t heard; /* loop time (ms) of the controller's last frame */
  int freeing;
  lparJ_stats stats;
  lparJ_event_cb on_event;
  void *ud;
};

static void emit(lparJ_relay *j, const lparJ_event *ev) {
  if (j->on_event && !j->freeing) j->on_event(j, ev, j->ud);
}

static void release(lparJ_relay *j) {
  if (--j->open_handles == 0) free(j);
}

/* ---- engines -> controller ---- */

static void send_up(lparJ_relay *j, int type, unsigned index, uint64_t id, const char *p,
                    size_t len) {
  if (j->link) lparR_send(j->link, type, LPAR_FLAG_RAW, index, id, p, len, NULL, 0);
}

static void engine_exit(lparJ_relay *j, int id, int status, int signal) {
  char text[32];
  int n = snprintf(text, sizeof text, "%d %d", status, signal);
  send_up(j, LPAR_MSG_EXIT, (unsigned)(id - j->first), 0, text, (size_t)n);
  lparJ_event ev = {.kind = LPARJ_EXIT, .engine = id, .status = status, .signal = signal};
  emit(j, &ev);
}

static void on_local_event(lpar_cluster *c, const lpar_event *ev, void *ud) {
  (void)c;
  lparJ_relay *j = ud;
  unsigned index = (unsigned)(ev->engine - j->first);
  switch (ev->kind) {
  case LPAR_EV_READY: {
    char hello[256];
    size_t len = ev->len < 128 ? ev->len : 128;
    memcpy(hello, ev->payload, len);
    int k = snprintf(hello + len, sizeof hello - len, " host=%s", j->host);
    send_up(j, LPAR_MSG_HELLO, index, 0, hello, len + (size_t)k);
    lparJ_event e = {.kind = LPARJ_READY, .engine = ev->engine};
    emit(j, &e);
    break;
  }
  case LPAR_EV_MESSAGE:
    /* Its replies come inline (the controller asks for it): no descriptor crosses. */
    if (j->link)
      lparR_send(j->link, ev->type, ev->flags & ~(unsigned)LPAR_FLAG_FDS, index, ev->id, ev->payload,
                 ev->len, NULL, 0);
    break;
  case LPAR_EV_EXIT: engine_exit(j, ev->engine, ev->exit_status, ev->term_signal); break;
  case LPAR_EV_BAD_MESSAGE: j->stats.bad_messages++; break;
  default: break;
  }
}

/* ---- controller -> engines ---- */

/*
** One request's payload as the host's engines get it: inline when small;
** else in a sealed memfd made once, which every engine maps (the frame
** carries its descriptor and, as its payload, the 8-byte length).
*/
typedef struct body {
  const char *p;
  size_t len;
  int fd; /* -1: inline */
  char size[8];
} body;

static int body_open(lparJ_relay *j, body *b, const char *p, size_t len) {
  *b = (body){.p = p, .len = len, .fd = -1};
  if (len < LPARJ_SHM_MIN) return LPAR_OK;
  int rc = lparH_create_sealed(p, len, &b->fd);
  if (rc < 0) return rc;
  for (int i = 0; i < 8; i++) b->size[i] = (char)((uint64_t)len >> (8 * i));
  j->stats.shared++;
  return LPAR_OK;
}

static void body_close(body *b) {
  if (b->fd >= 0) close(b->fd);
  b->fd = -1;
}

static void deliver(lparJ_relay *j, const lparW_header *h, unsigned index, uint64_t id,
                    const body *b) {
  if (index >= (unsigned)j->count) {
    j->stats.bad_messages++; /* not one of ours */
    return;
  }
  unsigned flags = h->flags & ~(unsigned)(LPAR_FLAG_FDS | LPAR_FLAG_ROUTES | LPAR_FLAG_SHM);
  int engine = j->first + (int)index;
  /* A dead engine's EXIT has gone up already; its request fails there. */
  if (b->fd >= 0)
    lpar_cluster_send_fds(j->local, engine, h->type, flags | LPAR_FLAG_SHM, id, b->size, 8, &b->fd, 1);
  else
    lpar_cluster_send(j->local, engine, h->type, flags, id, b->p, b->len);
  j->stats.deliveries++;
}

static void request(lparJ_relay *j, const lparW_header *h, const char *payload) {
  lparW_fanout f = {.n = 1, .body = payload, .body_len = (size_t)h->len};
  const char *why;
  if ((h->flags & LPAR_FLAG_ROUTES) && lparW_fanout_parse(payload, h->len, &f, &why) < 0) {
    j->stats.bad_messages++; /* a sound header with a malformed list: only it is dropped */
    return;
  }
  j->stats.requests++;
  j->stats.bytes_in += f.body_len;
  body b;
  if (body_open(j, &b, f.body, f.body_len) < 0) b = (body){.p = f.body, .len = f.body_len, .fd = -1};
  if (!(h->flags & LPAR_FLAG_ROUTES)) {
    deliver(j, h, h->route, h->id, &b);
  } else {
    for (size_t i = 0; i < f.n; i++) {
      unsigned route, offset;
      lparW_fanout_get(&f, i, &route, &offset);
      deliver(j, h, route, h->id + offset, &b);
    }
  }
  body_close(&b);
}

static void link_frame(lparR_route *r, const lparW_header *h, const char *payload, int *fds,
                       int nfds, void *ud) {
  (void)r, (void)fds, (void)nfds;
  lparJ_relay *j = ud;
  j->heard = uv_now(j->loop);
  int engine = j->first + (int)h->route;
  switch (h->type) {
  case LPAR_MSG_PING: send_up(j, LPAR_MSG_PING, 0, 0, "", 0); break;
  case LPAR_MSG_EXECUTE:
  case LPAR_MSG_APPLY:
  case LPAR_MSG_PUSH:
  case LPAR_MSG_PULL: request(j, h, payload); break;
  case LPAR_MSG_SIGNAL: {
    char text[16];
    size_t n = h->len < sizeof text - 1 ? (size_t)h->len : sizeof text - 1;
    memcpy(text, payload, n);
    text[n] = 0;
    if (h->route < (unsigned)j->count) lpar_cluster_signal(j->local, engine, atoi(text));
    break;
  }
  case LPAR_MSG_INTERRUPT:
    if (h->route < (unsigned)j->count) lpar_cluster_interrupt(j->local, engine, h->id);
    break;
  case LPAR_MSG_HELLO:
  case LPAR_MSG_EXIT:
  case LPAR_MSG_CONTROL: break; /* the controller's news of other engines: not ours */
  default: j->stats.bad_messages++;
  }
}

static void link_closed(lparR_route *r, const char *reason, int refused, void *ud) {
  (void)r, (void)refused;
  lparJ_relay *j = ud;
  j->link = NULL;
  lparJ_event ev = {.kind = LPARJ_CLOSED, .reason = reason,
                    .silent = strstr(reason, "nothing heard") != NULL};
  emit(j, &ev);
  release(j);
}

static const lparR_handlers link_handlers = {link_frame, link_closed, NULL, NULL};

/* A link gone quiet (a network cut) is a controller gone: the engines go too. */
static void on_watch(uv_timer_t *t) {
  lparJ_relay *j = t->data;
  if (j->link == NULL || uv_now(j->loop) - j->heard <= LPARJ_SILENT_MS) return;
  char why[96];
  snprintf(why, sizeof why, "nothing heard from the controller for %d s", LPARJ_SILENT_MS / 1000);
  lparR_close(j->link, why);
}

static void on_watch_closed(uv_handle_t *h) { release(h->data); }

/* ---- the relay ---- */

int lparJ_new(uv_loop_t *loop, lparR_route *link, const lparJ_config *cfg, lparJ_relay **out,
              char *err, size_t errlen) {
  lparJ_relay *j = calloc(1, sizeof *j);
  if (cfg->count < 1 || cfg->first < 0 || cfg->count > LPARW_MAX_FANOUT || cfg->n < 1) {
    snprintf(err, errlen, "a host relay needs 1 to %d engines", LPARW_MAX_FANOUT);
    free(j);
    lparR_close(link, "bad host relay");
    return LPAR_EINVAL;
  }
  if (j == NULL) {
    snprintf(err, errlen, "out of memory");
    lparR_close(link, "out of memory");
    return LPAR_ENOMEM;
  }
  lpar_config ec = cfg->engines;
  ec.on_event = on_local_event;
  ec.ud = j;
  int rc = lpar_cluster_new(loop, &ec, &j->local);
  if (rc < 0) {
    snprintf(err, errlen, "cannot create the engines: %s", lpar_strerror(rc));
    free(j);
    lparR_close(link, "cannot create the engines");
    return rc;
  }
  j->loop = loop;
  j->link = link;
  j->first = cfg->first;
  j->count = cfg->count;
  j->n = cfg->n;
  snprintf(j->host, sizeof j->host, "%s", cfg->host ? cfg->host : "?");
  j->on_event = cfg->on_event;
  j->ud = cfg->ud;
  uv_update_time(loop);
  j->heard = uv_now(loop);
  j->open_handles = 2;
  lparR_set_handlers(link, &link_handlers, j);
  uv_timer_init(loop, &j->watch);
  j->watch.data = j;
  uv_timer_start(&j->watch, on_watch, 1000, 1000);
  *out = j;
  return LPAR_OK;
}

int lparJ_spawn(lparJ_relay *j, int index, char *err, size_t errlen) {
  if (index < 0 || index >= j->count) {
    snprintf(err, errlen, "engine index %d is out of range", index);
    return LPAR_EINVAL;
  }
  int rc = lpar_cluster_spawn(j->local, j->first + index, j->n);
  if (rc < 0) {
    snprintf(err, errlen, "%s", lpar_cluster_errmsg(j->local));
    char text[] = "127 0";
    send_up(j, LPAR_MSG_EXIT, (unsigned)index, 0, text, sizeof text - 1);
  }
  return rc;
}

void lparJ_get_stats(const lparJ_relay *j, lparJ_stats *out) { *out = j->stats; }

void lparJ_free(lparJ_relay *j) {
  if (j == NULL || j->freeing) return;
  j->freeing = 1;
  lpar_cluster_free(j->local); /* closes every engine's socket: they exit on EOF */
  j->local = NULL;
  if (j->link) lparR_close(j->link, "the host relay stopped");
  uv_timer_stop(&j->watch);
  uv_close((uv_handle_t *)&j->watch, on_watch_closed);
}
