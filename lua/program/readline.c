/*
** readline.c: lpar.readline, line editing for the prompt (libedit).
**
**   readline(prompt) -> line; nil at end of input (Ctrl-D); nil, true when
**                       Ctrl-C interrupted the line
**   add_history(line), read_history(path), write_history(path)
**   set_completer(fn): fn(word, line) -> list of completions of word
*/
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <editline/readline.h>
#include <lauxlib.h>
#include <lua.h>

#include "readline_module.h"

/* libedit calls the completer with no user data: the state and the Lua
   function's reference live here, set once by set_completer. */
static lua_State *completer_state;
static int completer_ref = LUA_NOREF;

static int l_readline(lua_State *L) {
  const char *prompt = luaL_optstring(L, 1, "> ");
  errno = 0;
  char *line = readline(prompt);
  if (line == NULL) {
    lua_pushnil(L);
    lua_pushboolean(L, errno == EINTR);
    return 2;
  }
  lua_pushstring(L, line);
  free(line);
  return 1;
}

static int l_add_history(lua_State *L) {
  add_history(luaL_checkstring(L, 1));
  return 0;
}

static int l_read_history(lua_State *L) {
  lua_pushboolean(L, read_history(luaL_checkstring(L, 1)) == 0);
  return 1;
}

static int l_write_history(lua_State *L) {
  lua_pushboolean(L, write_history(luaL_checkstring(L, 1)) == 0);
  return 1;
}

/* Completions of the word in text, from the Lua completer's list. */
static char **complete(const char *text, int start, int end) {
  (void)start;
  (void)end;
  rl_attempted_completion_over = 1; /* no filename completion as a fallback */
  lua_State *L = completer_state;
  if (L == NULL || completer_ref == LUA_NOREF) return NULL;
  lua_rawgeti(L, LUA_REGISTRYINDEX, completer_ref);
  lua_pushstring(L, text);
  lua_pushstring(L, rl_line_buffer);
  if (lua_pcall(L, 2, 1, 0) != LUA_OK || !lua_istable(L, -1)) {
    lua_pop(L, 1);
    return NULL;
  }
  size_t n = (size_t)lua_rawlen(L, -1);
  if (n == 0) {
    lua_pop(L, 1);
    return NULL;
  }
  /* readline's convention: [0] is the common prefix, then the matches. */
  char **out = calloc(n + 2, sizeof *out);
  for (size_t i = 0; out && i < n; i++) {
    lua_rawgeti(L, -1, (lua_Integer)i + 1);
    const char *s = lua_tostring(L, -1);
    out[i + 1] = strdup(s ? s : "");
    lua_pop(L, 1);
  }
  if (out) {
    size_t common = strlen(out[1]);
    for (size_t i = 2; i <= n; i++) {
      size_t k = 0;
      while (k < common && out[i][k] == out[1][k]) k++;
      common = k;
    }
    out[0] = strndup(out[1], common);
  }
  lua_pop(L, 1);
  return out;
}

static int l_set_completer(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_pushvalue(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, completer_ref);
  completer_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  completer_state = L;
  rl_attempted_completion_function = complete;
  rl_basic_word_break_characters = " \t\n\"'`<>=;|&{}()[],+-*/%^~#";
  return 0;
}

int lparI_open(lua_State *L) {
  static const luaL_Reg functions[] = {
    {"readline", l_readline},         {"add_history", l_add_history},
    {"read_history", l_read_history}, {"write_history", l_write_history},
    {"set_completer", l_set_completer}, {NULL, NULL}};
  luaL_newlib(L, functions);
  return 1;
}
