/*
** matrix_module.c: lpar.matrix as a loadable C module (build/lib/lpar/matrix.so).
*/
#include <lua.h>

#include "matrix.h"

int luaopen_lpar_matrix(lua_State *L);

int luaopen_lpar_matrix(lua_State *L) {
  return lparM_open(L);
}
