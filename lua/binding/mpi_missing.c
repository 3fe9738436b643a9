/*
** mpi_missing.c: lpar.mpi in a build that found no MPI. Requiring it raises
** an error that says what to install, rather than the module going missing.
*/
#include <lauxlib.h>
#include <lua.h>

int luaopen_lpar_mpi(lua_State *L);

int luaopen_lpar_mpi(lua_State *L) {
  return luaL_error(L, "lpar.mpi: lpar was built without MPI; install libopenmpi-dev and rebuild "
                       "(scripts/deps)");
}
