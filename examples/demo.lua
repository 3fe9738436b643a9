-- The README's first command runs this: four local engines, the calls of
-- the ipyparallel tutorial, a tiled matrix product checked against OpenBLAS,
-- and a small latency and bandwidth table.
--   ./build/lpar examples/demo.lua
local lpar = require "lpar"
local matrix = require "lpar.matrix"
local uv = require "luv"

local function ms(ns) return ns / 1e6 end

local t0 = uv.hrtime()
local rc <close> = lpar.Cluster { n = 4 }:start_and_connect()
print(string.format("started %d engines in %.1f ms: ids %s", #rc, ms(uv.hrtime() - t0),
  table.concat(rc.ids, " ")))

local dview = rc:view()
dview.block = true

-- execute and pull: each engine computes with its own id
dview:execute("x = lpar.engine.id ^ 2")
print("x on each engine:        " .. table.concat(dview:pull("x"), " "))

-- apply: a closure with its upvalue travels to every engine
local greeting = "hello from engine"
local hellos = dview:apply(function() return greeting .. " " .. lpar.engine.id end)
print("apply with an upvalue:   " .. table.concat(hellos, ", "))

-- scatter, compute, gather
local list = {}
for i = 1, 16 do list[i] = i end
dview:scatter("part", list)
dview:execute("for i, v in ipairs(part) do part[i] = v * v end")
print("scatter/square/gather:   " .. table.concat(dview:gather("part"), " "))

-- map over the engines, equal to the serial map
local squares = dview:map(function(x) return x * x end, list)
print("map:                     " .. table.concat(squares, " "))

-- captured output, shown with its engine's label
rc:view("0:2"):execute("print('printed on engine ' .. lpar.engine.id)"):display_outputs()

-- a remote error comes back as an object naming the engine and the line
local ok, err = pcall(function() rc[1]:execute("local t = nil; t.x = 1", { block = true }) end)
print("remote error:            " .. (ok and "none?" or tostring(err):match("^[^\n]*")))

-- a 1024x1024 product split into four row tiles, one per engine
do
  local n = 1024
  local A, B = matrix.random(n, n, 1), matrix.random(n, n, 2)
  local start = uv.hrtime()
  dview:push { B = B } -- 8 MiB, as shared memory
  local rows, ars = n // 4, {}
  for k = 0, 3 do
    ars[k + 1] = rc[k]:apply_async(function(a) return a:dot(B) end,
      A:sub(k * rows + 1, (k + 1) * rows, 1, n))
  end
  local tiles = {}
  for k, ar in ipairs(ars) do tiles[k] = { ar:get() } end
  local C = matrix.block(tiles)
  local t_tiled = (uv.hrtime() - start) / 1e9
  start = uv.hrtime()
  local want = A:dot(B)
  local t_local = (uv.hrtime() - start) / 1e9
  print(string.format("tiled %dx%d product on 4 engines: %.1f ms (%.1f GFLOP/s); "
    .. "OpenBLAS here, %d thread(s): %.1f ms; max difference %.1e", n, n, t_tiled * 1e3,
    2 * n ^ 3 / t_tiled / 1e9, matrix.blas_threads(), t_local * 1e3, C:max_abs_diff(want)))
end

-- latency: apply(identity) round trips on one engine and on all four
local function percentile(sorted, p) return sorted[math.max(1, math.ceil(#sorted * p))] end
local function round_trips(view, n)
  local id = function(x) return x end
  local times = {}
  for i = 1, n do
    local s = uv.hrtime()
    view:apply_sync(id, "")
    times[i] = uv.hrtime() - s
  end
  table.sort(times)
  return percentile(times, 0.5) / 1e3, percentile(times, 0.99) / 1e3
end
local p50, p99 = round_trips(rc[0], 2000)
local q50, q99 = round_trips(dview, 1000)
print()
print("latency of apply(identity)        p50        p99")
print(string.format("  1 engine                  %7.1f us %7.1f us", p50, p99))
print(string.format("  4 engines                 %7.1f us %7.1f us", q50, q99))

-- bandwidth: push vectors of doubles of growing size to one engine (from
-- 256 KiB they go as shared memory)
print()
print("push to one engine      size       time   bandwidth")
local e0 = rc[0]
for _, kib in ipairs { 8, 64, 512, 2048, 65536 } do
  local s = matrix.random(kib * 128, 1)
  local best = math.huge
  for _ = 1, 20 do
    local start = uv.hrtime()
    e0:push({ blob = s }, { block = true })
    best = math.min(best, uv.hrtime() - start)
  end
  print(string.format("                  %7d KiB %7.1f us %7.2f GB/s", kib, best / 1e3,
    kib * 1024 / best))
end
