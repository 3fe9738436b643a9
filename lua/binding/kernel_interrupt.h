/*
** kernel_interrupt.h: SIGINT for the Jupyter kernel (internal, prefix lparK_).
*/
#ifndef LPAR_KERNEL_INTERRUPT_H
#define LPAR_KERNEL_INTERRUPT_H

#include <lua.h>

/* Adds interrupt_pipe, interrupt_target, interrupt and drain_interrupts to
** the module table on top of the stack. */
void lparK_open_interrupt(lua_State *L);

/* What SIGINT does: raise in the cell's coroutine (when it may be hooked)
** and wake the loop's interrupt pipe. Async-signal-safe, and callable from
** any thread (the control relay). */
void lparK_interrupt_now(void);
/* The same from another thread: SIGINT sent to the thread that installed
** the handler, so the hook is set where Lua runs, as lua.c does. */
void lparK_interrupt_main(void);
/* For the kernel's own threads: SIGINT is the main thread's. */
void lparK_block_sigint(void);

#endif
