/*
** interrupt.c: SIGINT interrupts the running task, as Ctrl-C does in lua5.4.
**
** The handler only sets a Lua hook (lua_sethook is safe in a signal handler,
** as lua.c relies on); the hook raises "interrupted" at the next Lua step,
** so the task fails with a normal error and the engine keeps its globals and
** goes on serving. A SIGINT that arrives while the engine is idle is ignored.
** A SIGINT sent with sigqueue carries a task id: it interrupts only that task,
** so a timeout never hits the task queued behind the one it was meant for.
*/
#include <signal.h>
#include <stdint.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "engine.h"

/* A signal handler can reach nothing else: these two are the exception to
   "no globals", and are set only by the functions below. */
static lua_State *interruptible;
static volatile sig_atomic_t task_running;
static volatile uint64_t running_task; /* aligned 64-bit: read whole on the platforms we run on */

static void interrupt_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted");
}

static void on_sigint(int sig, siginfo_t *info, void *context) {
  (void)sig;
  (void)context;
  if (info->si_code == SI_QUEUE && (uint64_t)(uintptr_t)info->si_value.sival_ptr != running_task)
    return;
  if (task_running && interruptible)
    lua_sethook(interruptible, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

void lparE_interrupt_init(lua_State *L) {
  interruptible = L;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigint;
  sa.sa_flags = SA_SIGINFO | SA_RESTART; /* a blocking read of the next request goes on */
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
}

void lparE_task_begin(uint64_t task) {
  running_task = task;
  task_running = 1;
}

void lparE_task_end(lua_State *L) {
  task_running = 0;
  lua_sethook(L, NULL, 0, 0); /* an interrupt that came too late for the task */
}
