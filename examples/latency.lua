-- The latency and bandwidth experiment of the ipyparallel notebook, in lpar.
--   ./build/lpar examples/latency.lua [engines=4] [quick]
-- Times blocking and non-blocking execute and apply, then pushes vectors
-- of 1K to 256K doubles to one engine and prints the bandwidth table.
local lpar = require "lpar"
local matrix = require "lpar.matrix"

local n = tonumber(arg[1]) or 4
local quick = arg[2] == "quick"
local rc <close> = lpar.Cluster { n = n }:start_and_connect()
local dview = rc:view()
local e0 = rc[0]
local opts = quick and { number = 20, rep = 3, quiet = true } or { rep = 3, quiet = true }

local function show(label, r)
  print(string.format("%-40s %6d loops, best of %d: %s per loop", label, r.loops, r.rep,
    require("lpar.timeit").format_time(r.best)))
end

print(string.format("latency on %d engines", n))
show("execute('') blocking, 1 engine", lpar.timeit(function() e0:execute("", { block = true }) end, opts))
show("execute('') non-blocking, 1 engine", lpar.timeit(function() e0:execute("") end, opts))
e0:wait()
show("execute('') blocking, all engines", lpar.timeit(function() dview:execute("", { block = true }) end, opts))
local id = function(x) return x end
show("apply(identity) blocking, 1 engine", lpar.timeit(function() e0:apply_sync(id, "") end, opts))
show("apply(identity) non-blocking, 1 engine", lpar.timeit(function() e0:apply_async(id, "") end, opts))
e0:wait()

print()
print("push of a vector of doubles to one engine")
print(string.format("%10s %10s %12s %12s", "doubles", "bytes", "time", "bandwidth"))
local lo, hi = math.huge, 0
local size = 1024
while size <= 256 * 1024 do
  local a = matrix.random(size, 1)
  local r = lpar.timeit(function() e0:push({ a = a }, { block = true }) end,
    quick and { number = 5, rep = 3, quiet = true } or { rep = 3, quiet = true })
  local bytes = size * 8
  local bw = bytes / r.best / 1e9
  lo, hi = math.min(lo, bw), math.max(hi, bw)
  print(string.format("%10d %10d %12s %9.2f GB/s", size, bytes,
    require("lpar.timeit").format_time(r.best), bw))
  size = size * 2
end
-- The engine got a copy: changing it there leaves ours alone.
local a = matrix.random(256 * 1024, 1, 7)
e0:push({ a = a }, { block = true })
e0:execute("a:set(1, 1, -1)", { block = true })
assert(a:get(1, 1) >= 0, "the engine's write reached the client's matrix")
assert(e0:pull("a"):get():get(1, 1) == -1)
print(string.format("bandwidth from %.2f to %.2f GB/s", lo, hi))
