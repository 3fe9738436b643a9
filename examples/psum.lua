-- A parallel sum over MPI engines, as in ipyparallel's MPI tutorial
-- (psum with MPI.allreduce): the client scatters the numbers 1..n over the
-- engines, each adds its piece, and lpar.mpi's allreduce adds the pieces'
-- sums between the engines: every engine ends with the total.
--   ./build/lpar examples/psum.lua [engines=4] [n=100000]
local lpar = require "lpar"

local engines = math.tointeger(tonumber(arg[1])) or 4
local n = math.tointeger(tonumber(arg[2])) or 100000

--- The sum over all engines of each engine's list `a`.
local function psum(a)
  local mpi = require "lpar.mpi"
  local s = 0
  for _, x in ipairs(a) do s = s + x end
  return mpi.allreduce(s, "sum")
end

local cluster <close> = lpar.Cluster { launcher = "mpi", n = engines, profile = "psum" }
local rc <close> = cluster:start_and_connect()
local view = rc:view()
view.block = true
local numbers = {}
for i = 1, n do numbers[i] = i end
view:scatter("a", numbers)
local sums = view:apply(function() return psum(a) end) -- luacheck: globals a
print(string.format("psum of 1..%d over %d engines: %d on each of them (n(n+1)/2 = %d)", n, engines,
  sums[1], n * (n + 1) // 2))
for e = 2, #sums do assert(sums[e] == sums[1], "the engines disagree") end
