/*
** funcache.c: functions sent once per engine, then by slot (see funcache.h).
*/
#include "funcache.h"

#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <sodium.h>

#include "lpar.h"

#define REG_FUNCS "lpar.functions" /* (nonce .. slot) -> bytecode; n, received */
#define MAX_ENGINE (1 << 20)
/*
** Functions remembered before the table starts afresh: a caller who makes a
** new closure for every call would otherwise fill it faster than the
** collector empties it.
*/
#define MAX_REMEMBERED 1024

void lparF_init(lparF_sender *s) {
  memset(s, 0, sizeof *s);
  s->memo_ref = LUA_NOREF;
  if (sodium_init() < 0) abort(); /* no randomness: nothing safe to do */
  randombytes_buf(s->nonce, sizeof s->nonce);
  lparB_init(&s->scratch);
}

void lparF_free(lparF_sender *s) {
  for (int i = 0; i < s->nknown; i++) free(s->known[i]);
  free(s->known);
  lparB_free(&s->scratch);
  s->known = NULL;
  s->nknown = 0;
}

void lparF_forget_engine(lparF_sender *s, int engine) {
  if (engine >= 0 && engine < s->nknown && s->known[engine])
    memset(s->known[engine], 0, sizeof(uint32_t) * LPARF_SLOTS);
}

/* The generations `engine` holds, made on first use; NULL without memory. */
static uint32_t *known_by(lparF_sender *s, int engine) {
  if (engine < 0 || engine >= MAX_ENGINE) return NULL;
  if (engine >= s->nknown) {
    int n = s->nknown ? s->nknown : 8;
    while (n <= engine) n *= 2;
    uint32_t **k = realloc(s->known, sizeof *k * (size_t)n);
    if (k == NULL) return NULL;
    memset(k + s->nknown, 0, sizeof *k * (size_t)(n - s->nknown));
    s->known = k;
    s->nknown = n;
  }
  if (s->known[engine] == NULL) s->known[engine] = calloc(LPARF_SLOTS, sizeof(uint32_t));
  return s->known[engine];
}

int lparF_slot(lparF_sender *s, int engine, const void *code, size_t len, int *known) {
  uint32_t *held = known_by(s, engine);
  if (held == NULL || s->npending == LPARF_MAX_PENDING) return -1;
  unsigned char d[LPARF_DIGEST_BYTES];
  crypto_generichash(d, sizeof d, code, len, NULL, 0);
  int k = -1, free_slot = -1;
  for (int i = 0; i < LPARF_SLOTS && k < 0; i++) {
    if (s->gen[i] == 0) {
      if (free_slot < 0) free_slot = i;
    } else if (memcmp(s->digest[i], d, sizeof d) == 0) {
      k = i;
    }
  }
  if (k < 0) { /* a new function: a free slot, or the next in turn */
    k = free_slot >= 0 ? free_slot : s->next;
    if (free_slot < 0) s->next = (s->next + 1) % LPARF_SLOTS;
    memcpy(s->digest[k], d, sizeof d);
    s->gen[k] = ++s->clock;
  }
  *known = held[k] == s->gen[k];
  if (!*known) {
    for (int i = 0; i < s->npending; i++)
      if (s->pending[i] == k) return k; /* set earlier in this message */
    s->pending[s->npending++] = k;
  }
  return k;
}

int lparF_recall(lua_State *L, lparF_sender *s, int idx, int engine) {
  if (s->memo_ref == LUA_NOREF || engine < 0 || engine >= s->nknown || s->known[engine] == NULL ||
      !lua_checkstack(L, 3))
    return -1;
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->memo_ref);
  lua_pushvalue(L, idx);
  int ok = lua_rawget(L, -2) == LUA_TNUMBER;
  lua_Integer v = ok ? lua_tointeger(L, -1) : -1;
  lua_pop(L, 2);
  if (v < 0) return -1;
  int k = (int)(v % LPARF_SLOTS);
  uint32_t gen = (uint32_t)(v / LPARF_SLOTS);
  /* The slot still holds this function's digest, and the engine holds that generation. */
  if (s->gen[k] != gen || s->known[engine][k] != gen) return -1;
  return k;
}

void lparF_remember(lua_State *L, lparF_sender *s, int idx, int slot) {
  if (!lua_checkstack(L, 4)) return; /* not remembered: dumped again next time */
  idx = lua_absindex(L, idx);
  if (s->memo_ref == LUA_NOREF || s->memo_count >= MAX_REMEMBERED) {
    if (s->memo_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, s->memo_ref);
    lua_createtable(L, 0, 8);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    s->memo_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    s->memo_count = 0;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->memo_ref);
  lua_pushvalue(L, idx);
  lua_pushinteger(L, (lua_Integer)s->gen[slot] * LPARF_SLOTS + slot);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  s->memo_count++;
}

void lparF_release(lua_State *L, lparF_sender *s) {
  if (s->memo_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, s->memo_ref);
  s->memo_ref = LUA_NOREF;
  s->memo_count = 0;
}

void lparF_commit(lparF_sender *s, int engine) {
  uint32_t *held = known_by(s, engine);
  for (int i = 0; held && i < s->npending; i++) held[s->pending[i]] = s->gen[s->pending[i]];
  s->npending = 0;
}

void lparF_discard(lparF_sender *s) { s->npending = 0; }

/* ---- receiving ---- */

/* Push the registry's table of kept functions, made if missing. */
static void push_table(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, REG_FUNCS) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, 0);
  lua_setfield(L, -2, "n");
  lua_pushinteger(L, 0);
  lua_setfield(L, -2, "received");
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, REG_FUNCS);
}

static lua_Integer get_count(lua_State *L, int t, const char *name) {
  lua_getfield(L, t, name);
  lua_Integer n = lua_tointeger(L, -1);
  lua_pop(L, 1);
  return n;
}

static void set_count(lua_State *L, int t, const char *name, lua_Integer n) {
  lua_pushinteger(L, n);
  lua_setfield(L, t, name);
}

static void push_key(lua_State *L, const unsigned char *nonce, unsigned slot) {
  char key[LPARF_NONCE_BYTES + 1];
  memcpy(key, nonce, LPARF_NONCE_BYTES);
  key[LPARF_NONCE_BYTES] = (char)slot;
  lua_pushlstring(L, key, sizeof key);
}

void lparF_count(lua_State *L) {
  push_table(L);
  int t = lua_gettop(L);
  set_count(L, t, "received", get_count(L, t, "received") + 1);
  lua_pop(L, 1);
}

void lparF_keep(lua_State *L, const unsigned char *nonce, unsigned slot, const char *code, size_t len) {
  push_table(L);
  int t = lua_gettop(L);
  lua_Integer received = get_count(L, t, "received") + 1, n = get_count(L, t, "n");
  if (n >= LPARF_MAX_KEPT) { /* forget them all: senders set them again when they must */
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_FUNCS);
    push_table(L);
    n = 0;
  }
  set_count(L, t, "received", received);
  push_key(L, nonce, slot);
  lua_pushvalue(L, -1);
  if (lua_rawget(L, t) == LUA_TNIL) n++;
  lua_pop(L, 1);
  lua_pushlstring(L, code, len);
  lua_rawset(L, t);
  set_count(L, t, "n", n);
  lua_pop(L, 1);
}

int lparF_push(lua_State *L, const unsigned char *nonce, unsigned slot) {
  push_table(L);
  push_key(L, nonce, slot);
  if (lua_rawget(L, -2) != LUA_TSTRING) {
    lua_pop(L, 2);
    return 0;
  }
  lua_remove(L, -2);
  return 1;
}

lua_Integer lparF_received(lua_State *L) {
  push_table(L);
  lua_Integer n = get_count(L, lua_gettop(L), "received");
  lua_pop(L, 1);
  return n;
}
