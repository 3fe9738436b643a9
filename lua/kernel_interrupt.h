/*
** kernel_interrupt.h: SIGINT for the Jupyter kernel (internal, prefix lparK_).
*/
#ifndef LPAR_KERNEL_INTERRUPT_H
#define LPAR_KERNEL_INTERRUPT_H

#include <lua.h>

/* Adds interrupt_pipe, interrupt_target, interrupt and drain_interrupts to
** the module table on top of the stack. */
void lparK_open_interrupt(lua_State *L);

#endif
