/*
** interrupt.c: SIGINT interrupts the running task, as Ctrl-C does in lua5.4.
**
** The handler only sets a Lua hook (lua_sethook is safe in a signal handler,
** as lua.c relies on); the hook raises "interrupted" at the next Lua step,
** so the task fails with a normal error and the engine keeps its globals and
** goes on serving. A SIGINT that arrives while the engine is idle is ignored.
** A SIGINT sent with sigqueue carries a task id: it interrupts only that task,
** so a timeout never hits the task queued behind the one it was meant for.
**
** Heartbeats use the same hook: SIGALRM every LPAR_HEARTBEAT_MS sets it
** while a task runs, and the hook sends an empty HEARTBEAT frame between
** two Lua steps (never inside a C function, so never inside another frame's
** write). Idle, the main loop sends them. A stopped engine, or one wedged in
** C code, goes silent: that is what its host calls "not responding".
*/
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/time.h>

#include <lauxlib.h>
#include <lua.h>

#include "engine.h"
#include "lpar.h"
#include "wire.h"

/* A signal handler can reach nothing else: these two are the exception to
   "no globals", and are set only by the functions below. */
static lua_State *interruptible;
static volatile sig_atomic_t task_running;
static volatile uint64_t running_task; /* aligned 64-bit: read whole on the platforms we run on */
static volatile sig_atomic_t interrupt_wanted, beat_wanted;
/* An interrupt for a request that had not started (it waits in the socket):
   it applies when that request begins. */
static volatile uint64_t pending_interrupt;
static int beat_fd = -1;

static void step_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  if (beat_wanted) {
    beat_wanted = 0;
    lparW_send(beat_fd, LPAR_MSG_HEARTBEAT, 0, 0, NULL, 0);
  }
  if (interrupt_wanted) {
    interrupt_wanted = 0;
    luaL_error(L, "interrupted");
  }
}

static void set_step_hook(void) {
  lua_sethook(interruptible, step_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

static void on_sigint(int sig, siginfo_t *info, void *context) {
  (void)sig;
  (void)context;
  if (info->si_code == SI_QUEUE) {
    uint64_t id = (uint64_t)(uintptr_t)info->si_value.sival_ptr;
    if (!task_running || id != running_task) {
      pending_interrupt = id;
      return;
    }
  }
  if (task_running && interruptible) {
    interrupt_wanted = 1;
    set_step_hook();
  }
}

static void on_sigalrm(int sig) {
  (void)sig;
  beat_wanted = 1;
  if (task_running && interruptible) set_step_hook();
}

void lparE_heartbeat_init(int fd, int ms) {
  if (ms <= 0) return;
  beat_fd = fd;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigalrm;
  sa.sa_flags = SA_RESTART; /* blocking reads and writes go on; poll returns EINTR */
  sigemptyset(&sa.sa_mask);
  sigaction(SIGALRM, &sa, NULL);
  struct itimerval every = {{ms / 1000, (ms % 1000) * 1000}, {ms / 1000, (ms % 1000) * 1000}};
  setitimer(ITIMER_REAL, &every, NULL);
}

int lparE_beat_due(void) {
  if (!beat_wanted) return 0;
  beat_wanted = 0;
  return 1;
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
  if (task != 0 && pending_interrupt == task) {
    pending_interrupt = 0;
    interrupt_wanted = 1;
    set_step_hook();
  }
}

void lparE_task_end(lua_State *L) {
  task_running = 0;
  interrupt_wanted = 0;
  lua_sethook(L, NULL, 0, 0); /* an interrupt that came too late for the task */
}
