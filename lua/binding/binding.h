/*
** binding.h: what the parts of the lpar.core binding share (internal,
** prefix lparC_).
*/
#ifndef LPAR_BINDING_H
#define LPAR_BINDING_H

#include <stdint.h>

#include <lua.h>

#include "lpar.h"

/* nil, "what: message", code: the luv way of failing. */
int lparC_push_failure(lua_State *L, int code, const char *what);
/* The same with a message of the caller's own: nil, message, code. */
int lparC_push_error(lua_State *L, const char *message, int code);
/* Message handler adding a traceback. */
int lparC_traceback(lua_State *L);
/* Release a registry reference, once: *ref becomes LUA_NOREF. */
void lparC_unref(lua_State *L, int *ref);
/* A signal given by number or name ("INT", "SIGKILL"). */
int lparC_check_signal(lua_State *L, int arg);
/* The key field of the options table at t: 32 bytes. */
int lparC_check_key(lua_State *L, int t, unsigned char key[32]);
/*
** The "NAME=value" strings of options table t's `env` list, NULL-ended, in
** a userdata pushed with the list (both stay on the stack while it is used).
*/
const char **lparC_check_env(lua_State *L, int t);
/*
** The link of the connected lpar.cluster at idx, taken from it (the
** cluster keeps no link): for a host's relay to own. Raises if it has none.
*/
struct lparR_route *lparC_take_link(lua_State *L, int idx);
/* Add the lpar.cluster type, new_cluster and connect (cluster.c) to the module on top. */
void lparC_open_cluster(lua_State *L);
/* Add the lpar.relay type and relay (relay.c) to the module on top. */
void lparC_open_relay(lua_State *L);
/* Add the lpar.hostrelay type and host_relay (relay.c) to the module on top. */
void lparC_open_hostrelay(lua_State *L);

#endif
