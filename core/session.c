/*
** session.c: the synchronous layer of lpar.h, for hosts with no loop of
** their own. A session owns a private libuv loop and one lpar_cluster on
** it; each call runs that loop until its answer is in, so the event API
** underneath is the same one that hosts with a loop use.
**
** Connecting by profile reads the cluster's connection file, a flat JSON
** object written by lpar (profile.lua): only strings and numbers, one level.
** The small reader below accepts exactly that and nothing more.
*/
#include "lpar.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define START_TIMEOUT_MS 10000
#define CONNECT_TIMEOUT_MS 10000

struct lpar_session {
  uv_loop_t loop;
  uv_timer_t timer;
  lpar_cluster *c;
  int n;          /* engines expected */
  int ready;      /* engines that said hello */
  int exited;     /* engines that ended, or were reported dead */
  int timed_out;  /* the timer fired */
  int closed;     /* the controller's link closed */
  uint64_t next_id;
  /* The request being waited for. */
  uint64_t want;
  int want_engine, done, status;
  char *answer;
  char errmsg[512];
};

static int fail(lpar_session *s, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(s->errmsg, sizeof s->errmsg, fmt, ap);
  va_end(ap);
  return code;
}

static char *dup_bytes(const char *p, size_t n) {
  char *d = malloc(n + 1);
  if (d) {
    memcpy(d, p, n);
    d[n] = '\0';
  }
  return d;
}

static void on_event(lpar_cluster *c, const lpar_event *ev, void *ud) {
  (void)c;
  lpar_session *s = ud;
  switch (ev->kind) {
  case LPAR_EV_READY: s->ready++; break;
  case LPAR_EV_MESSAGE:
    if (ev->type == LPAR_MSG_STDOUT || ev->type == LPAR_MSG_STDERR) {
      fwrite(ev->payload, 1, ev->len, ev->type == LPAR_MSG_STDOUT ? stdout : stderr);
    } else if (ev->id == s->want && !s->done &&
               (ev->type == LPAR_MSG_RESULT || ev->type == LPAR_MSG_ERROR)) {
      s->answer = dup_bytes(ev->payload, ev->len);
      s->status = s->answer == NULL ? LPAR_ENOMEM
                  : ev->type == LPAR_MSG_RESULT ? LPAR_OK : LPAR_EREMOTE;
      s->done = 1;
    }
    break;
  case LPAR_EV_EXIT:
    s->exited++;
    if (!s->done && s->want && ev->engine == s->want_engine) {
      if (ev->term_signal)
        fail(s, 0, "engine %d died running the code (signal %d)", ev->engine, ev->term_signal);
      else
        fail(s, 0, "engine %d exited running the code (status %d)", ev->engine, ev->exit_status);
      s->status = LPAR_EDEAD;
      s->done = 1;
    }
    break;
  case LPAR_EV_CLOSED:
    s->closed = 1;
    fail(s, 0, "the link to the controller closed: %s", ev->reason ? ev->reason : "?");
    if (!s->done && s->want) {
      s->status = LPAR_ECLOSED;
      s->done = 1;
    }
    break;
  default: break;
  }
}

static void on_timer(uv_timer_t *t) {
  lpar_session *s = t->data;
  s->timed_out = 1;
}

/* Run the loop until pred(s) holds, the link closes or timeout_ms pass (0: no limit). */
static void run_until(lpar_session *s, int (*pred)(lpar_session *), uint64_t timeout_ms) {
  s->timed_out = 0;
  if (timeout_ms) uv_timer_start(&s->timer, on_timer, timeout_ms, 0);
  while (!pred(s) && !s->timed_out && !s->closed) uv_run(&s->loop, UV_RUN_ONCE);
  uv_timer_stop(&s->timer);
}

static int all_reported(lpar_session *s) { return s->ready + s->exited >= s->n; }
static int answered(lpar_session *s) { return s->done; }

static lpar_session *session_new(void) {
  lpar_session *s = calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  if (uv_loop_init(&s->loop) != 0) {
    free(s);
    return NULL;
  }
  uv_timer_init(&s->loop, &s->timer);
  s->timer.data = s;
  s->next_id = 1;
  return s;
}

int lpar_session_start(int n, lpar_session **out) {
  *out = NULL;
  if (n < 1) return LPAR_EINVAL;
  lpar_session *s = session_new();
  if (s == NULL) return LPAR_ENOMEM;
  *out = s;
  s->n = n;
  lpar_config cfg = {.on_event = on_event, .ud = s};
  int rc = lpar_cluster_new(&s->loop, &cfg, &s->c);
  if (rc < 0) return fail(s, rc, "cannot create the cluster: %s", lpar_strerror(rc));
  for (int i = 0; i < n; i++) {
    rc = lpar_cluster_spawn(s->c, i, n);
    if (rc < 0) return fail(s, rc, "%s", lpar_cluster_errmsg(s->c));
  }
  run_until(s, all_reported, START_TIMEOUT_MS);
  if (s->ready < n)
    return fail(s, s->exited ? LPAR_ESPAWN : LPAR_ETIMEDOUT, "only %d of %d engines were ready%s",
                s->ready, n, s->exited ? " (the others exited)" : " after 10 s");
  return LPAR_OK;
}

/* ---- the connection file: {"name": "string" or number, ...} ---- */

typedef struct conn_info {
  char socket[1024], ip[256], key_hex[65];
  long port, engines;
} conn_info;

static const char *skip_ws(const char *p) {
  while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
  return p;
}

/* A JSON string at p (after its opening quote) into out; the end, or NULL. */
static const char *read_string(const char *p, char *out, size_t n) {
  size_t k = 0;
  for (; *p && *p != '"'; p++) {
    char ch = *p;
    if ((unsigned char)ch < 0x20) return NULL;
    if (ch == '\\') {
      p++;
      switch (*p) {
      case '"': case '\\': case '/': ch = *p; break;
      case 'b': ch = '\b'; break;
      case 'f': ch = '\f'; break;
      case 'n': ch = '\n'; break;
      case 'r': ch = '\r'; break;
      case 't': ch = '\t'; break;
      case 'u': { /* only \u00XX, which is all lpar writes */
        unsigned v;
        if (sscanf(p + 1, "%4x", &v) != 1 || v > 0xff || v == 0) return NULL;
        ch = (char)v;
        p += 4;
        break;
      }
      default: return NULL;
      }
    }
    if (k + 1 >= n) return NULL;
    out[k++] = ch;
  }
  if (*p != '"') return NULL;
  out[k] = '\0';
  return p + 1;
}

/* Copy a field's value; -1 when it does not fit. */
static int set_field(char *dst, size_t n, const char *v) {
  size_t len = strlen(v);
  if (len >= n) return -1;
  memcpy(dst, v, len + 1);
  return 0;
}

static int parse_connection(const char *text, conn_info *ci) {
  memset(ci, 0, sizeof *ci);
  const char *p = skip_ws(text);
  if (*p++ != '{') return -1;
  for (;;) {
    char name[64], value[1024];
    p = skip_ws(p);
    if (*p == '}') break;
    if (*p++ != '"' || !(p = read_string(p, name, sizeof name))) return -1;
    p = skip_ws(p);
    if (*p++ != ':') return -1;
    p = skip_ws(p);
    if (*p == '"') {
      if (!(p = read_string(p + 1, value, sizeof value))) return -1;
      int bad = 0;
      if (strcmp(name, "socket") == 0) bad = set_field(ci->socket, sizeof ci->socket, value);
      else if (strcmp(name, "ip") == 0) bad = set_field(ci->ip, sizeof ci->ip, value);
      else if (strcmp(name, "key") == 0) bad = set_field(ci->key_hex, sizeof ci->key_hex, value);
      if (bad) return -1;
    } else {
      char *end;
      double v = strtod(p, &end);
      if (end == p) return -1;
      if (strcmp(name, "port") == 0) ci->port = (long)v;
      else if (strcmp(name, "engines") == 0) ci->engines = (long)v;
      p = end;
    }
    p = skip_ws(p);
    if (*p == ',') p++;
    else if (*p != '}') return -1;
  }
  return strlen(ci->key_hex) == 64 && (ci->socket[0] || ci->port > 0) ? 0 : -1;
}

static int read_connection(lpar_session *s, const char *path, conn_info *ci) {
  struct stat st;
  if (stat(path, &st) != 0)
    return fail(s, LPAR_ESYS, "cannot read connection file %s: %s", path, strerror(errno));
  if (st.st_mode & 077)
    return fail(s, LPAR_EAUTH, "connection file %s can be read by other users (mode %o): it holds "
                "the cluster's key", path, (unsigned)(st.st_mode & 0777));
  FILE *f = fopen(path, "r");
  if (f == NULL) return fail(s, LPAR_ESYS, "cannot read connection file %s: %s", path, strerror(errno));
  char text[8192];
  size_t len = fread(text, 1, sizeof text - 1, f);
  fclose(f);
  text[len] = '\0';
  if (parse_connection(text, ci) < 0)
    return fail(s, LPAR_EBADMSG, "%s is not an lpar connection file", path);
  return LPAR_OK;
}

int lpar_session_connect(const char *where, lpar_session **out) {
  *out = NULL;
  if (where == NULL || !*where) where = "default";
  lpar_session *s = session_new();
  if (s == NULL) return LPAR_ENOMEM;
  *out = s;
  char path[2048];
  if (strchr(where, '/')) {
    snprintf(path, sizeof path, "%s", where);
  } else {
    const char *dir = getenv("LPAR_DIR"), *home = getenv("HOME");
    if (dir && *dir) snprintf(path, sizeof path, "%s/profile_%s/connection.json", dir, where);
    else if (home && *home) snprintf(path, sizeof path, "%s/.lpar/profile_%s/connection.json", home, where);
    else return fail(s, LPAR_EINVAL, "neither LPAR_DIR nor HOME is set: no place for profiles");
  }
  conn_info ci;
  int rc = read_connection(s, path, &ci);
  if (rc < 0) return rc;
  lpar_connect_config cfg = {.path = ci.socket[0] ? ci.socket : NULL,
                             .host = ci.ip[0] ? ci.ip : "127.0.0.1",
                             .port = (int)ci.port, .on_event = on_event, .ud = s};
  for (int i = 0; i < 32; i++) {
    unsigned v;
    if (sscanf(ci.key_hex + 2 * i, "%2x", &v) != 1) return fail(s, LPAR_EBADMSG, "bad key in %s", path);
    cfg.key[i] = (unsigned char)v;
  }
  rc = lpar_cluster_connect(&s->loop, &cfg, &s->c);
  if (rc < 0) return fail(s, rc, "%s", lpar_cluster_errmsg(s->c));
  s->n = ci.engines > 0 ? (int)ci.engines : 1;
  run_until(s, all_reported, CONNECT_TIMEOUT_MS);
  if (s->closed) return LPAR_ECLOSED;
  if (s->ready == 0)
    return fail(s, LPAR_ETIMEDOUT, "no engine of the cluster in %s was ready after %d s", path,
                CONNECT_TIMEOUT_MS / 1000);
  return LPAR_OK;
}

int lpar_session_engines(const lpar_session *s) { return s ? s->ready : 0; }

int lpar_session_run(lpar_session *s, int engine, const char *code, char **result) {
  *result = NULL;
  if (s == NULL || s->c == NULL || code == NULL) return LPAR_EINVAL;
  s->want = s->next_id++;
  s->want_engine = engine;
  s->done = 0;
  s->answer = NULL;
  int rc = lpar_cluster_execute(s->c, engine, s->want, code, strlen(code));
  if (rc < 0) {
    s->want = 0;
    return fail(s, rc, "cannot run code on engine %d: %s", engine, lpar_cluster_errmsg(s->c));
  }
  run_until(s, answered, 0);
  s->want = 0;
  if (!s->done) return LPAR_ECLOSED;
  *result = s->answer;
  if (s->status == LPAR_EREMOTE) fail(s, 0, "engine %d: %s", engine, s->answer);
  return s->status;
}

const char *lpar_session_errmsg(const lpar_session *s) {
  if (s == NULL) return "out of memory";
  return s->errmsg[0] ? s->errmsg : "no error";
}

void lpar_session_close(lpar_session *s) {
  if (s == NULL) return;
  if (s->c) lpar_cluster_free(s->c);
  uv_close((uv_handle_t *)&s->timer, NULL);
  uv_run(&s->loop, UV_RUN_DEFAULT); /* let libuv close the handles */
  uv_loop_close(&s->loop);
  free(s);
}
