/*
** output.c: capture of print and io.write on an engine.
**
** Output is buffered per task and sent as STDOUT/STDERR messages tagged
** with the task's id: before the task's reply, and every 50 ms (or 64 KiB)
** while a long task runs, so a client sees it stream.
*/
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>

#include "engine.h"
#include "lpar.h"
#include "wire.h"

#define FLUSH_BYTES 65536
#define FLUSH_SECONDS 0.05

double lparE_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void send_stream(lparE_state *st, int type, lparB_buffer *b) {
  if (b->len == 0) return;
  lparW_send(st->fd, type, LPAR_FLAG_RAW, st->task, b->data, b->len);
  b->len = 0;
}

void lparE_flush_output(lparE_state *st) {
  send_stream(st, LPAR_MSG_STDOUT, &st->out);
  send_stream(st, LPAR_MSG_STDERR, &st->err);
  st->last_flush = lparE_now();
}

static void maybe_flush(lparE_state *st) {
  if (st->out.len + st->err.len >= FLUSH_BYTES || lparE_now() - st->last_flush >= FLUSH_SECONDS)
    lparE_flush_output(st);
}

static lparB_buffer *stream_of(lua_State *L, lparE_state **st) {
  *st = lua_touserdata(L, lua_upvalueindex(1));
  return lua_tointeger(L, lua_upvalueindex(2)) == 2 ? &(*st)->err : &(*st)->out;
}

static void append(lua_State *L, lparB_buffer *b, const char *s, size_t n) {
  if (lparB_append(b, s, n) < 0) luaL_error(L, "out of memory capturing output");
}

static int capture_print(lua_State *L) {
  lparE_state *st;
  lparB_buffer *b = stream_of(L, &st);
  int n = lua_gettop(L);
  for (int i = 1; i <= n; i++) {
    size_t len;
    const char *s = luaL_tolstring(L, i, &len);
    if (i > 1) append(L, b, "\t", 1);
    append(L, b, s, len);
    lua_pop(L, 1);
  }
  append(L, b, "\n", 1);
  maybe_flush(st);
  return 0;
}

/* io.write(...) and file:write(...): `first` skips the self argument. */
static int write_from(lua_State *L, int first) {
  lparE_state *st;
  lparB_buffer *b = stream_of(L, &st);
  int n = lua_gettop(L);
  for (int i = first; i <= n; i++) {
    size_t len;
    const char *s = luaL_checklstring(L, i, &len); /* numbers convert, as io.write */
    append(L, b, s, len);
  }
  maybe_flush(st);
  lua_pushvalue(L, lua_upvalueindex(3)); /* the file proxy, for chaining */
  return 1;
}

static int capture_io_write(lua_State *L) { return write_from(L, 1); }
static int capture_file_write(lua_State *L) { return write_from(L, 2); }
static int file_noop(lua_State *L) {
  lua_pushvalue(L, 1);
  return 1;
}

/* Push a file-like proxy table whose write goes to stream `which`. */
static void push_proxy(lua_State *L, lparE_state *st, int which, const char *name) {
  lua_newtable(L);
  int proxy = lua_gettop(L);
  lua_pushlightuserdata(L, st);
  lua_pushinteger(L, which);
  lua_pushvalue(L, proxy);
  lua_pushcclosure(L, capture_file_write, 3);
  lua_setfield(L, proxy, "write");
  lua_pushcfunction(L, file_noop);
  lua_setfield(L, proxy, "flush");
  lua_pushcfunction(L, file_noop);
  lua_setfield(L, proxy, "setvbuf");
  lua_newtable(L); /* metatable: a readable name */
  lua_pushstring(L, name);
  lua_setfield(L, -2, "__name");
  lua_setmetatable(L, proxy);
}

void lparE_capture_output(lua_State *L, lparE_state *st) {
  lua_getglobal(L, "io");
  int io = lua_gettop(L);
  push_proxy(L, st, 1, "lpar.stdout");
  int out = lua_gettop(L);
  push_proxy(L, st, 2, "lpar.stderr");
  lua_setfield(L, io, "stderr");
  lua_pushlightuserdata(L, st);
  lua_pushinteger(L, 1);
  lua_pushvalue(L, out);
  lua_pushcclosure(L, capture_io_write, 3);
  lua_setfield(L, io, "write");
  lua_pushlightuserdata(L, st);
  lua_pushinteger(L, 1);
  lua_pushcclosure(L, capture_print, 2);
  lua_setglobal(L, "print");
  lua_setfield(L, io, "stdout");
  lua_pop(L, 1);
}
