/*
** serialize.h: the value encoding, Lua values to bytes and back.
** Internal to liblpar (prefix lparS_); the engine and the Lua binding use it.
*/
#ifndef LPAR_SERIALIZE_H
#define LPAR_SERIALIZE_H

#include <stddef.h>

#include <lua.h>

#include "buffer.h"
#include "shm.h"

/* Deepest nesting of tables and functions that encode and decode accept. */
#define LPAR_MAX_DEPTH 200

/* Decoding flags. */
#define LPARS_ALLOW_CODE 1u /* load Lua bytecode: only for an authenticated peer */

/*
** Append the encoding of the `count` values at stack slots first..first+count-1
** to `out`, as one tuple. `root` names the tuple in error messages: the i-th
** value is "root[i]", and nested paths read like "args[1].upvalue 'fh'".
** Returns 0, or a negative LPAR_E* code with a message in err (NUL-terminated,
** at most errlen bytes), e.g. "cannot send args[1].upvalue 'fh': userdata FILE*".
** On failure `out` is left at its original length. The stack is unchanged.
*/
int lparS_encode(lua_State *L, int first, int count, const char *root,
                 lparB_buffer *out, char *err, size_t errlen);

/*
** Decode one tuple from data[0..len), push its values and set *count.
** Every length, count and depth is checked; no input crashes it. Returns 0,
** or LPAR_EBADMSG (or LPAR_ENOMEM) with a message in err, pushing nothing.
*/
int lparS_decode(lua_State *L, const void *data, size_t len, unsigned flags,
                 int *count, char *err, size_t errlen);

/*
** Shared memory for matrices. On encode, a matrix of at least `min_bytes`
** (0: never) goes as a memfd listed in fds[] (owned[i]: the encoder made it,
** and the caller closes it once sent); other matrices go inline. On decode,
** fds[] are the descriptors that came with the message (the caller closes
** them; storages keep duplicates).
*/
typedef struct lparS_shm {
  size_t min_bytes;
  int fds[LPARH_MAX_FDS];
  int owned[LPARH_MAX_FDS];
  int nfds;
} lparS_shm;

int lparS_encode_shm(lua_State *L, int first, int count, const char *root, lparB_buffer *out,
                     lparS_shm *shm, char *err, size_t errlen);
/*
** The same, for a message to `engine` from a sender with function slots
** (funcache.h; NULL: none): its functions go as FUNCSET or FUNCREF. The
** caller calls lparF_commit(funcs, engine) once the message is sent.
*/
struct lparF_sender;
int lparS_encode_for(lua_State *L, int first, int count, const char *root, lparB_buffer *out,
                     lparS_shm *shm, struct lparF_sender *funcs, int engine, char *err,
                     size_t errlen);
int lparS_decode_shm(lua_State *L, const void *data, size_t len, unsigned flags,
                     const lparS_shm *shm, int *count, char *err, size_t errlen);
/* Close the descriptors the encoder made (after sending) and forget all. */
void lparS_shm_done(lparS_shm *shm);

/*
** lua_CFunction (name, metatable): register a metatable under a name, so
** tables (and later userdata) that carry it are sent by that name and get
** the metatable registered under the same name on the receiver.
*/
int lparS_register_metatable(lua_State *L);

#endif
