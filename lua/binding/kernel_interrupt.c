/*
** kernel_interrupt.c: the notebook's stop button, for lpar.zmq.
**
** Jupyter interrupts a kernel with SIGINT (or an interrupt_request, which
** comes to the same). Two things must happen: a cell's local Lua code stops
** with an error, and a cell waiting on engines has their tasks interrupted.
** The first is lua.c's trick: the handler sets a count hook that raises at
** the next Lua instruction. The hook goes on the cell's own coroutine only,
** never on the main thread, where luv runs its callbacks (an error there
** would escape into the loop). The second needs the loop: the handler
** writes a byte to a pipe that the kernel polls with luv, and Lua
** interrupts the engines from there. The state is static because a signal
** handler has no other way to reach it; one kernel runs per process.
*/
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "kernel_interrupt.h"

static int pipe_fds[2] = {-1, -1};
static lua_State *volatile target;     /* the running cell's coroutine, or NULL */
static volatile sig_atomic_t hookable; /* raise in the cell, or leave it to the engines */
static int target_ref = LUA_NOREF;
static pthread_t main_thread; /* where the handler runs, for lparK_interrupt_main */
static volatile sig_atomic_t installed;

static void raise_interrupt(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "KeyboardInterrupt");
}

/* Async-signal-safe: lua_sethook is, as lua.c relies on; so is write. */
void lparK_interrupt_now(void) {
  int saved = errno;
  lua_State *co = target;
  if (co != NULL && hookable)
    lua_sethook(co, raise_interrupt, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
  if (pipe_fds[1] >= 0) {
    ssize_t n = write(pipe_fds[1], "!", 1);
    (void)n; /* a full pipe already holds a pending interrupt */
  }
  errno = saved;
}

void lparK_interrupt_main(void) {
  if (installed) pthread_kill(main_thread, SIGINT);
  else lparK_interrupt_now();
}

void lparK_block_sigint(void) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
}

static void on_sigint(int sig) {
  (void)sig;
  /* A process-wide SIGINT may land on one of libzmq's threads: pass it on. */
  if (!pthread_equal(pthread_self(), main_thread)) {
    pthread_kill(main_thread, SIGINT);
    return;
  }
  lparK_interrupt_now();
}

/* interrupt_pipe() -> fd to poll: one byte arrives per interrupt. Installs
** the SIGINT handler on first use. */
static int l_interrupt_pipe(lua_State *L) {
  if (pipe_fds[0] < 0) {
    if (pipe(pipe_fds) != 0) {
      lua_pushnil(L);
      lua_pushfstring(L, "pipe: %s", strerror(errno));
      lua_pushinteger(L, errno);
      return 3;
    }
    for (int i = 0; i < 2; i++) {
      fcntl(pipe_fds[i], F_SETFL, fcntl(pipe_fds[i], F_GETFL) | O_NONBLOCK);
      fcntl(pipe_fds[i], F_SETFD, FD_CLOEXEC);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    main_thread = pthread_self();
    if (sigaction(SIGINT, &sa, NULL) != 0) {
      lua_pushnil(L);
      lua_pushfstring(L, "sigaction: %s", strerror(errno));
      lua_pushinteger(L, errno);
      return 3;
    }
    installed = 1;
  }
  lua_pushinteger(L, pipe_fds[0]);
  return 1;
}

/* interrupt_target(co | nil, hookable): the coroutine an interrupt raises
** in, when `hookable`; else the interrupt only reaches the pipe. */
static int l_interrupt_target(lua_State *L) {
  lua_State *co = lua_isnoneornil(L, 1) ? NULL : lua_tothread(L, 1);
  if (!lua_isnoneornil(L, 1) && co == NULL) return luaL_argerror(L, 1, "expected a coroutine");
  target = NULL; /* never a half-updated pair in the handler */
  luaL_unref(L, LUA_REGISTRYINDEX, target_ref);
  target_ref = LUA_NOREF;
  if (co != NULL) {
    lua_pushvalue(L, 1);
    target_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* kept alive while targeted */
  }
  hookable = lua_toboolean(L, 2);
  target = co;
  return 0;
}

/* interrupt(): what SIGINT does, for an interrupt_request message. */
static int l_interrupt(lua_State *L) {
  (void)L;
  lparK_interrupt_now();
  return 0;
}

/* drain_interrupts() -> how many interrupts arrived since the last call */
static int l_drain_interrupts(lua_State *L) {
  char buf[64];
  lua_Integer total = 0;
  ssize_t n;
  while (pipe_fds[0] >= 0 && (n = read(pipe_fds[0], buf, sizeof buf)) > 0) total += n;
  lua_pushinteger(L, total);
  return 1;
}

void lparK_open_interrupt(lua_State *L) {
  static const luaL_Reg fns[] = {{"interrupt_pipe", l_interrupt_pipe},
                                 {"interrupt_target", l_interrupt_target},
                                 {"interrupt", l_interrupt},
                                 {"drain_interrupts", l_drain_interrupts},
                                 {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
}
