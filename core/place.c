/*
** place.c: where this copy of lpar lives (see place.h).
**
** Compiled in (core/CMakeLists.txt): LPAR_BUILD_DIR and LPAR_SOURCE_LUA_DIR,
** used only when this code runs from the build tree, and the install
** layout relative to the prefix: LPAR_REL_BINDIR, LPAR_REL_LIBDIR,
** LPAR_REL_ENGINEDIR, LPAR_REL_LMODDIR, LPAR_REL_CMODDIR, and LPAR_INSTALLED_ENGINE, the
** engine's configured install path, for a host linked with liblpar.a.
*/
#define _GNU_SOURCE /* dladdr */
#include "place.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void copy(char *dst, size_t n, const char *src) { snprintf(dst, n, "%s", src); }

/* Is `path` a shared object's: NAME.so or NAME.so.VERSION? */
static int shared_object(const char *path) {
  const char *base = strrchr(path, '/');
  base = base ? base + 1 : path;
  const char *so = strstr(base, ".so");
  return so && (so[3] == '\0' || so[3] == '.');
}

/* The directory of the file holding this function: a shared object or the executable. */
static void self_dir(char *out, size_t n) {
  char path[PATH_MAX];
  Dl_info info;
  out[0] = '\0';
  const char *f = NULL;
  if (dladdr((void *)self_dir, &info) && info.dli_fname && shared_object(info.dli_fname))
    f = info.dli_fname; /* liblpar.so, or a Lua binding holding liblpar.a */
  if (f == NULL) {
    ssize_t len = readlink("/proc/self/exe", path, sizeof path - 1);
    if (len <= 0) return;
    path[len] = '\0';
    f = path;
  }
  char real[PATH_MAX];
  if (realpath(f, real) == NULL) return;
  char *slash = strrchr(real, '/');
  if (slash == NULL) return;
  *slash = '\0';
  copy(out, n, real[0] ? real : "/");
}

/* If dir ends with "/" rel, the part before it, in prefix. */
static int strip(const char *dir, const char *rel, char *prefix, size_t n) {
  size_t d = strlen(dir), r = strlen(rel);
  if (r == 0 || rel[0] == '/' || d <= r || dir[d - r - 1] != '/' || strcmp(dir + d - r, rel))
    return 0;
  snprintf(prefix, n, "%.*s", (int)(d - r - 1), dir);
  if (prefix[0] == '\0') copy(prefix, n, "/");
  return 1;
}

/* Is directory `dir` (a real path) `top` or inside it? */
static int inside(const char *dir, const char *top) {
  char rt[PATH_MAX];
  if (realpath(top, rt) == NULL) return 0;
  size_t n = strlen(rt);
  return strncmp(dir, rt, n) == 0 && (dir[n] == '\0' || dir[n] == '/');
}

void lparL_locate(lparL_place *p) {
  p->build_tree = 0;
  p->prefix[0] = '\0';
  self_dir(p->self, sizeof p->self);
  if (!p->self[0]) return;
  if (inside(p->self, LPAR_BUILD_DIR)) { /* build/, build/lib/lpar, build/core, build/examples */
    p->build_tree = 1;
    return;
  }
  /* Longest first: lib/lua/5.4/lpar before lib. */
  const char *rels[] = {LPAR_REL_CMODDIR "/lpar", LPAR_REL_ENGINEDIR, LPAR_REL_BINDIR,
                        LPAR_REL_LIBDIR};
  for (size_t i = 0; i < sizeof rels / sizeof *rels; i++)
    if (strip(p->self, rels[i], p->prefix, sizeof p->prefix)) return;
}

/* prefix/rel, or rel alone when it is absolute (a cache variable set so). */
static const char *under(const lparL_place *p, const char *rel, const char *name, char *buf,
                         size_t n) {
  if (rel[0] == '/') snprintf(buf, n, "%s%s%s", rel, *name ? "/" : "", name);
  else if (p->prefix[0]) snprintf(buf, n, "%s/%s%s%s", p->prefix, rel, *name ? "/" : "", name);
  else return NULL;
  return buf;
}

const char *lparL_path(const char *kind, char *buf, size_t n) {
  static const struct {
    const char *kind, *env, *built, *rel, *name;
  } parts[] = {
    {"engine", "LPAR_ENGINE", LPAR_BUILD_DIR "/lpar-engine", LPAR_REL_ENGINEDIR, "lpar-engine"},
    {"command", "LPAR_COMMAND", LPAR_BUILD_DIR "/lpar", LPAR_REL_BINDIR, "lpar"},
    {"lua", "LPAR_LUA_DIR", LPAR_SOURCE_LUA_DIR, LPAR_REL_LMODDIR, ""},
    {"cmod", "LPAR_CMOD_DIR", LPAR_BUILD_DIR "/lib", LPAR_REL_CMODDIR, ""},
  };
  for (size_t i = 0; i < sizeof parts / sizeof *parts; i++) {
    if (strcmp(kind, parts[i].kind)) continue;
    const char *env = getenv(parts[i].env);
    if (env && *env) {
      copy(buf, n, env);
      return buf;
    }
    lparL_place p;
    lparL_locate(&p);
    if (p.build_tree) {
      copy(buf, n, parts[i].built);
      return buf;
    }
    /* A rock keeps the engine beside its binding, in lib/lua/5.4/lpar/. */
    if (strcmp(kind, "engine") == 0) {
      snprintf(buf, n, "%s/lpar-engine", p.self);
      if (p.self[0] && access(buf, X_OK) == 0) return buf;
      if (under(&p, LPAR_REL_CMODDIR "/lpar", "lpar-engine", buf, n) && access(buf, X_OK) == 0)
        return buf;
    }
    if (under(&p, parts[i].rel, parts[i].name, buf, n)) return buf;
    /* A host linked with liblpar.a: the engine where `cmake --install` put it. */
    if (strcmp(kind, "engine") == 0) {
      copy(buf, n, LPAR_INSTALLED_ENGINE);
      return buf;
    }
    return NULL;
  }
  return NULL;
}
