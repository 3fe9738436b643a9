-- Matrix products split over engines, against OpenBLAS in one process, as
-- in the ipyparallel notebook.
--   ./build/lpar examples/matmul.lua [engines=4] [n_quad=1024] [n_tiled=4096]
-- 1. n=16 by one task per element: n^2 tiny tasks lose to one local product.
-- 2. quadrants: C = [A1;A2][B1 B2] as four products on four engines.
-- 3. row tiles over every engine, against OpenBLAS on all cores here.
local lpar = require "lpar"
local matrix = require "lpar.matrix"
local uv = require "luv"

local engines = tonumber(arg[1]) or 4
local n_quad = tonumber(arg[2]) or 1024
local n_tiled = tonumber(arg[3]) or 4096
local cores = #uv.cpu_info()

local function seconds(f)
  local t0 = uv.hrtime()
  local r = f()
  return (uv.hrtime() - t0) / 1e9, r
end

local function check(C, want, what)
  local err = C:max_abs_diff(want)
  assert(err < 1e-9 * want:norm(), string.format("%s: wrong result (max error %g)", what, err))
end

local rc <close> = lpar.Cluster { n = engines }:start_and_connect()
local dview = rc:view()
dview:execute("matrix = require 'lpar.matrix'", { block = true })
local dot = function(a, b) return a:dot(b) end

-- 1. One task per element.
do
  local n = 16
  local A, B = matrix.random(n, n, 1), matrix.random(n, n, 2)
  local t_local, want = seconds(function() return A:dot(B) end)
  local t_tasks, C = seconds(function()
    local ars = {}
    for i = 1, n do
      for j = 1, n do
        local k = ((i - 1) * n + j - 1) % engines
        ars[#ars + 1] = rc[k]:apply_async(dot, A:sub(i, i, 1, n), B:sub(1, n, j, j))
      end
    end
    local out = matrix.zeros(n, n)
    for idx, ar in ipairs(ars) do
      out:set((idx - 1) // n + 1, (idx - 1) % n + 1, ar:get():get(1, 1))
    end
    return out
  end)
  check(C, want, "n=16 per element")
  print(string.format("n=%d, %d tasks of one element: %.2f ms; one local dot: %.3f ms (%.0fx slower)",
    n, n * n, t_tasks * 1e3, t_local * 1e3, t_tasks / t_local))
end

local function gflops(n, t) return 2 * n ^ 3 / t / 1e9 end

-- 2. Quadrants on four engines.
do
  local n, h = n_quad, n_quad // 2
  local A, B = matrix.random(n, n, 3), matrix.random(n, n, 4)
  local A1, A2 = A:sub(1, h, 1, n), A:sub(h + 1, n, 1, n)
  local B1, B2 = B:sub(1, n, 1, h), B:sub(1, n, h + 1, n)
  local t_par, C = seconds(function()
    local q = {
      rc[0 % engines]:apply_async(dot, A1, B1), rc[1 % engines]:apply_async(dot, A1, B2),
      rc[2 % engines]:apply_async(dot, A2, B1), rc[3 % engines]:apply_async(dot, A2, B2),
    }
    return matrix.block { { q[1]:get(), q[2]:get() }, { q[3]:get(), q[4]:get() } }
  end)
  local t_local, want = seconds(function() return A:dot(B) end)
  check(C, want, "quadrants")
  print(string.format("n=%d by quadrants on %d engines: %.1f ms (%.1f GFLOP/s); "
    .. "local dot on %d thread(s): %.1f ms (%.1f GFLOP/s)", n, math.min(4, engines), t_par * 1e3,
    gflops(n, t_par), matrix.blas_threads(), t_local * 1e3, gflops(n, t_local)))
end

-- 3. Row tiles over every engine against OpenBLAS on every core.
do
  local n = n_tiled
  local A, B = matrix.random(n, n, 5), matrix.random(n, n, 6)
  dview:push({ B = B }, { block = true }) -- shared memory: costs the same for any size
  local rows = (n + engines - 1) // engines
  local t_par, C = seconds(function()
    local ars = {}
    for k = 0, engines - 1 do
      local r1 = k * rows + 1
      local r2 = math.min(n, r1 + rows - 1)
      ars[k + 1] = rc[k]:apply_async(function(a) return a:dot(B) end, A:sub(r1, r2, 1, n))
    end
    local parts = {}
    for k, ar in ipairs(ars) do parts[k] = { ar:get() } end
    return matrix.block(parts)
  end)
  local before = matrix.blas_threads()
  matrix.blas_threads(cores)
  local t_local, want = seconds(function() return A:dot(B) end)
  matrix.blas_threads(before)
  check(C, want, "tiles")
  print(string.format("n=%d tiled over %d engines: %.1f ms (%.1f GFLOP/s); "
    .. "OpenBLAS on %d threads: %.1f ms (%.1f GFLOP/s); ratio %.2f", n, engines, t_par * 1e3,
    gflops(n, t_par), cores, t_local * 1e3, gflops(n, t_local), t_local / t_par))
end
