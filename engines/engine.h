/*
** engine.h: state shared by the engine's files (internal, prefix lparE_).
*/
#ifndef LPAR_ENGINE_H
#define LPAR_ENGINE_H

#include <stdint.h>

#include <lua.h>

#include "buffer.h"

typedef struct lparE_state {
  int fd;           /* socket to the controller */
  int side;         /* socket for descriptors of shared matrices, or -1 */
  int id, n;        /* engine id, engines in the cluster */
  uint64_t task;    /* id of the request being served */
  int inline_reply; /* its answer carries matrices inline (LPAR_FLAG_INLINE) */
  lparB_buffer out; /* captured stdout not yet sent */
  lparB_buffer err; /* captured stderr not yet sent */
  double last_flush;
  uint64_t bad_messages;
  int gone; /* the controller's socket failed: leave */
  size_t mem_limit; /* bytes the Lua state may hold (LPAR_MEM_LIMIT), or 0 */
} lparE_state;

double lparE_now(void);
/* Replace print, io.write, io.stdout and io.stderr with capturing versions. */
void lparE_capture_output(lua_State *L, lparE_state *st);
/* Send what was captured, as STDOUT/STDERR messages of the current task. */
void lparE_flush_output(lparE_state *st);

/* SIGINT interrupts a running task with the error "interrupted" (interrupt.c). */
void lparE_interrupt_init(lua_State *L);
void lparE_task_begin(uint64_t task);
void lparE_task_end(lua_State *L);
/* SIGALRM every `ms` ms: a HEARTBEAT frame on `fd` while a task's Lua runs;
   idle, the main loop sends one when lparE_beat_due() says so. */
void lparE_heartbeat_init(int fd, int ms);
int lparE_beat_due(void);

#endif
