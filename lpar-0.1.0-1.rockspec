-- luarocks --lua-version 5.4 make: builds with CMake and installs the Lua
-- modules, the C modules (lpar.core, lpar.matrix), lpar-engine (beside
-- lpar/core.so, where an installed binding looks first) and the lpar
-- command into the tree. The C libraries come from the system (Debian:
-- scripts/deps); on Debian, where lua-luv, lua-argparse and lua-dkjson come
-- from apt, add --deps-mode none.
rockspec_format = "3.0"
package = "lpar"
version = "0.1.0-1"
source = {
  url = "git+file:///lpar", -- `luarocks make` builds the checked-out tree; nothing is fetched
}
description = {
  summary = "Interactive parallel computing for Lua 5.4 (ipyparallel for Lua), with a C core",
  detailed = [[
    Start a cluster of Lua 5.4 engines, each in its own process, and drive them
    with views and asynchronous results; round trips of tens of microseconds,
    matrices on OpenBLAS passed to local engines as shared memory.
  ]],
  license = "MIT",
  labels = { "parallel", "cluster", "ipyparallel", "matrix" },
}
dependencies = {
  "lua >= 5.4, < 5.5",
  "luv",
  "argparse",
  "dkjson",
}
external_dependencies = {
  LIBUV = { header = "uv.h" },
  LIBSODIUM = { header = "sodium.h" },
  PNG = { header = "png.h" },
  EDIT = { header = "histedit.h" },
}
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    CMAKE_INSTALL_PREFIX = "$(PREFIX)",
    LPAR_TESTS = "OFF",
    LPAR_LUAROCKS_LUADIR = "$(LUADIR)",
    LPAR_LUAROCKS_LIBDIR = "$(LIBDIR)",
    LPAR_LUAROCKS_BINDIR = "$(BINDIR)",
  },
}
