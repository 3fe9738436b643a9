/*
** funcache.h: a function's bytecode goes to an engine once, then by slot
** (internal, prefix lparF_).
**
** Each sender (a client's cluster) has a random 8-byte nonce and LPARF_SLOTS
** slots, each holding the digest of one function's bytecode. The first
** message that carries a function to an engine sets the slot there (the
** bytecode travels, FUNCSET); later ones name it (FUNCREF). The sender
** remembers, per engine, which slots it has set since that engine last
** said hello, so an engine that restarts gets its functions again. A slot
** given to another function gets a new generation, and every engine then
** gets the new one set before it is named.
**
** The receiving side keeps the bytecode by (nonce, slot) in a registry
** table, at most LPARF_MAX_KEPT entries, all forgotten at once past that.
*/
#ifndef LPAR_FUNCACHE_H
#define LPAR_FUNCACHE_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "buffer.h"

#define LPARF_SLOTS 64
#define LPARF_NONCE_BYTES 8
#define LPARF_DIGEST_BYTES 16
#define LPARF_MAX_KEPT 4096
#define LPARF_MAX_PENDING 16

typedef struct lparF_sender {
  unsigned char nonce[LPARF_NONCE_BYTES];
  unsigned char digest[LPARF_SLOTS][LPARF_DIGEST_BYTES];
  uint32_t gen[LPARF_SLOTS]; /* 0: the slot is free */
  uint32_t clock;            /* the last generation given */
  int next;                  /* the slot to give next when all are taken */
  uint32_t **known;          /* known[engine][slot]: generation the engine holds, 0 none */
  int nknown;
  lparB_buffer scratch;      /* a function's bytecode, while its slot is looked up */
  int pending[LPARF_MAX_PENDING], npending; /* slots set by the message being encoded */
  int memo_ref;              /* registry ref of {function = slot and generation}, weak keys; LUA_NOREF */
  int memo_count;            /* entries put in it (dead ones go with their functions) */
} lparF_sender;

void lparF_init(lparF_sender *s);
void lparF_free(lparF_sender *s);
/* The engine said hello (it is new, or started again): it holds nothing. */
void lparF_forget_engine(lparF_sender *s, int engine);

/*
** The slot for bytecode code[0..len) sent to `engine`, given if it is new,
** and in *known whether the engine holds it already. -1 when slots cannot be
** used (no memory, or too many set by one message): send the bytecode plainly.
*/
int lparF_slot(lparF_sender *s, int engine, const void *code, size_t len, int *known);
/*
** The message is sent: the engine holds what it set (lparF_commit), or it
** was not, and holds nothing new (lparF_discard).
*/
void lparF_commit(lparF_sender *s, int engine);
void lparF_discard(lparF_sender *s);

/*
** The same function sent again: its slot is remembered by the function
** itself (a table with weak keys, so a function collected takes its entry
** with it and its address means nothing to a later one), sparing a dump
** and a digest at each send. lparF_recall: the slot of the function at idx
** when `engine` holds it already (the message names it, FUNCREF), else -1.
** lparF_remember: the function at idx was given `slot` by lparF_slot.
** lparF_release: let the table go (the sender is freed).
*/
int lparF_recall(lua_State *L, lparF_sender *s, int idx, int engine);
void lparF_remember(lua_State *L, lparF_sender *s, int idx, int slot);
void lparF_release(lua_State *L, lparF_sender *s);

/*
** Receiving. lparF_keep: bytecode code[0..len) for (nonce, slot), kept
** for later references. lparF_push: push the bytecode kept for (nonce,
** slot) as a string and return 1, or return 0 when it is not kept.
** lparF_received: function bodies this Lua state has received so far.
*/
void lparF_keep(lua_State *L, const unsigned char *nonce, unsigned slot, const char *code, size_t len);
int lparF_push(lua_State *L, const unsigned char *nonce, unsigned slot);
lua_Integer lparF_received(lua_State *L);
/* Count a function body received plainly (FUNC). */
void lparF_count(lua_State *L);

#endif
