/*
** place.h: where this copy of lpar lives, built or installed (internal,
** prefix lparL_).
**
** Nothing is looked up through paths of the build tree unless the code runs
** from the build tree itself. An installed copy works out its prefix from
** the file that holds this code (the executable, through /proc/self/exe, or
** the shared object, through dladdr) by taking off that file's directory
** relative to the prefix (bin, libexec/lpar, lib, lib/lua/5.4/lpar, as
** configured), then finds its other parts under that prefix. So a tree can
** be moved as a whole, and luarocks' deploy step (which moves the files out
** of the rock's own directory) keeps it working.
*/
#ifndef LPAR_PLACE_H
#define LPAR_PLACE_H

#include <stddef.h>

typedef struct lparL_place {
  int build_tree;   /* running from the build tree */
  char self[4096];  /* directory of the file holding this code; "" if unknown */
  char prefix[4096]; /* install prefix; "" in the build tree or when unknown */
} lparL_place;

/* Fill *p. Never fails: what cannot be known is left "". */
void lparL_locate(lparL_place *p);

/*
** The path of one of lpar's parts, written to buf (size n): kind is
** "engine" (lpar-engine), "command" (lpar), "lua" (the Lua module
** directory) or "cmod" (the C module directory, holding lpar/core.so).
** Environment overrides: LPAR_ENGINE, LPAR_COMMAND, LPAR_LUA_DIR,
** LPAR_CMOD_DIR. Returns buf, or NULL when the part cannot be placed.
*/
const char *lparL_path(const char *kind, char *buf, size_t n);

#endif
