-- OpenBLAS benchmarks, shared by scripts/bench.lua and `scripts/bench --blas`:
-- which library and kernel run (matrix.blas_info, here and on the engines),
-- A:dot(B) on 1 and 2 threads, and the tiled product on 2 engines against
-- OpenBLAS on 2 threads, measured in the same run with the same kernel.
--   ./build/lpar scripts/bench_blas.lua [--quick]   (prints the rows only)
local lpar = require "lpar"
local matrix = require "lpar.matrix"
local uv = require "luv"

local M = {}

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

--- blas_info() of the client, plus the engines' kernels, for results.json.
function M.info(rc)
  local info = assert(matrix.blas_info())
  if rc then
    local kernels = rc:view():apply_sync(function() return require("lpar.matrix").blas_info().kernel end)
    info.engine_kernels = kernels
  end
  return info
end

--- Print what BLAS runs and why, once, above the figures.
function M.describe(info)
  print(string.format("BLAS: %s %s (%s), kernel %s, chosen by %s", info.vendor, info.version or "?",
    info.file or info.path or "?", info.kernel or "?", info.chosen_by))
  print("      " .. info.reason)
  if info.engine_kernels then print("      engines' kernel: " .. table.concat(info.engine_kernels, " ")) end
end

--- Seconds for f(), median of `reps` after one warm-up call.
local function time(f, reps)
  f()
  local t = {}
  for i = 1, reps do
    local t0 = uv.hrtime()
    f()
    t[i] = (uv.hrtime() - t0) / 1e9
  end
  return median(t)
end

--- The figures, through row(key, name, value, unit, target), below what BLAS
-- runs (and `header()`, if given). Returns the client's blas_info with the
-- engines' kernels, for results.json.
function M.run(row, quick, header)
  M.describe(M.info())
  if header then header() end
  local before = matrix.blas_threads()
  for _, n in ipairs(quick and { 512 } or { 2048, 4096 }) do
    local A, B = matrix.random(n, n, 1), matrix.random(n, n, 2)
    for _, threads in ipairs { 1, 2 } do
      matrix.blas_threads(threads)
      local dt = time(function() return A:dot(B) end, quick and 2 or (n > 2048 and 3 or 5))
      row(string.format("dot_%d_t%d", n, threads),
        string.format("A:dot(B) n=%d, %d thread%s", n, threads, threads > 1 and "s" or ""),
        2 * n ^ 3 / dt / 1e9, "GFLOP/s")
    end
  end
  matrix.blas_threads(before)

  -- Tiled over 2 engines (row blocks of A, B pushed once per product) against
  -- OpenBLAS on 2 threads here; transfers included, alternating so both see
  -- the same machine.
  local n = quick and 512 or 4096
  local rc2 <close> = lpar.Cluster { n = 2 }:start_and_connect()
  local info = M.info(rc2)
  local A, B = matrix.random(n, n, 1), matrix.random(n, n, 2)
  local function tiled()
    rc2:view():push({ B = B }, { block = true })
    local h = n // 2
    local times_b = function(a) return a:dot(B) end
    local top = rc2[0]:apply_async(times_b, A:sub(1, h, 1, n))
    local bottom = rc2[1]:apply_async(times_b, A:sub(h + 1, n, 1, n))
    return matrix.block { { top:get() }, { bottom:get() } }
  end
  local reps = quick and 3 or 5
  local tp, tl = {}, {}
  local C, want
  for i = 1, reps do
    local t0 = uv.hrtime()
    C = tiled()
    tp[i] = (uv.hrtime() - t0) / 1e9
    matrix.blas_threads(2)
    t0 = uv.hrtime()
    want = A:dot(B)
    tl[i] = (uv.hrtime() - t0) / 1e9
    matrix.blas_threads(before)
  end
  assert(C:max_abs_diff(want) < 1e-9 * want:norm(), "tiled product is wrong")
  local gp, gl = 2 * n ^ 3 / median(tp) / 1e9, 2 * n ^ 3 / median(tl) / 1e9
  local kernel = " [" .. tostring(info.kernel) .. "]"
  row("dgemm2_tiled", string.format("dgemm n=%d tiled on 2 engines", n) .. kernel, gp, "GFLOP/s")
  row("dgemm2_blas", string.format("dgemm n=%d OpenBLAS, 2 threads", n) .. kernel, gl, "GFLOP/s")
  row("dgemm2_ratio", "tiled / OpenBLAS", gp / gl, "x", ">= 0.9x")
  print("engines' kernel: " .. table.concat(info.engine_kernels, " "))
  return info
end

if arg and arg[0] and arg[0]:match("bench_blas%.lua$") then
  local quick = arg[1] == "--quick"
  print(string.format("lpar %s OpenBLAS benchmarks, %s, %d CPUs%s", lpar.version, os.date("%Y-%m-%d %H:%M"),
    #uv.cpu_info(), quick and " (quick mode: figures are rough)" or ""))
  M.run(function(_, name, value, unit, target)
    print(string.format("%-52s %12.2f %-8s %s", name, value, unit, target or ""))
    io.stdout:flush()
  end, quick, function() print(string.format("%-52s %12s %-8s %s", "measure", "median", "unit", "target")) end)
end

return M
