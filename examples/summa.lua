-- SUMMA: C = A B on a process grid of MPI engines (2x2 on 4), the blocks
-- moving between engines by row and column broadcasts (lpar.mpi), not
-- through the client: it sends each engine its blocks of A and B once and
-- gathers C. Prints GFLOP/s, the bytes that went through the client, and
-- the max difference against A:dot(B).
--   ./build/lpar examples/summa.lua [--profile P] [-n N] [--engines K]
-- Without --profile it starts its own MPI cluster of K engines (default 4).
local lpar = require "lpar"
local matrix = require "lpar.matrix"
local core = require "lpar.core"
local uv = require "luv"

local opts = { n = 1024, engines = 4 }
do
  local i = 1
  while i <= #arg do
    local a, v = arg[i], arg[i + 1]
    if a == "--profile" then opts.profile = v
    elseif a == "-n" then opts.n = math.tointeger(tonumber(v))
    elseif a == "--engines" then opts.engines = math.tointeger(tonumber(v))
    else error("summa.lua: unknown argument " .. tostring(a) .. " (--profile P, -n N, --engines K)", 0) end
    i = i + 2
  end
end

--- One engine's part: blocks (Ab, Bb) of rank (i, j) on a pr x pc grid;
-- its block of C, and the seconds it took (from a barrier: all had their blocks).
-- Panel k of width b: its column of A-blocks goes along each grid row from
-- the column that holds it, its row of B-blocks down each grid column.
local function summa_block(Ab, Bb, n, pr, pc)
  local mpi = require "lpar.mpi"
  local mat = require "lpar.matrix"
  local clock = require "luv"
  mpi.barrier()
  local t0 = clock.hrtime()
  local i, j = mpi.rank // pc, mpi.rank % pc
  local row = mpi.split(i, j)   -- my grid row: rank there = j
  local col = mpi.split(j + pr * pc, i) -- my grid column: rank there = i
  local h, w = n // pr, n // pc
  local b = math.min(h, w)
  local Abuf, Bbuf = mat.zeros(h, b), mat.zeros(b, w)
  local C
  for k = 0, n - 1, b do
    local ja, oa = k // w, k % w -- who holds A's panel, and where in its block
    local ib, ob = k // h, k % h
    local Ap = row:bcast(j == ja and Ab:sub(1, h, oa + 1, oa + b) or Abuf, ja)
    local Bp = col:bcast(i == ib and Bb:sub(ob + 1, ob + b, 1, w) or Bbuf, ib)
    local P = Ap:dot(Bp)
    C = C and C + P or P
  end
  return C, (clock.hrtime() - t0) / 1e9
end

local function grid(k)
  local pr = math.floor(math.sqrt(k))
  while k % pr ~= 0 do pr = pr - 1 end
  return pr, k // pr
end

local cluster, rc
if opts.profile then
  rc = lpar.Client { profile = opts.profile }
else
  cluster = lpar.Cluster { launcher = "mpi", n = opts.engines, profile = "summa" }
  rc = cluster:start_and_connect()
end
local ok, err = pcall(function()
  local k = #rc.ids
  local n = opts.n
  local pr, pc = grid(k)
  local h, w = n // pr, n // pc
  if n % pr ~= 0 or n % pc ~= 0 or math.max(h, w) % math.min(h, w) ~= 0 then
    error(string.format("summa.lua: n=%d does not split on a %dx%d grid", n, pr, pc), 0)
  end
  local A, B = matrix.random(n, n, 1), matrix.random(n, n, 2)
  local blocks = {}
  for r = 0, k - 1 do
    local i, j = r // pc, r % pc
    blocks[r] = { A:sub(i * h + 1, (i + 1) * h, j * w + 1, (j + 1) * w),
                  B:sub(i * h + 1, (i + 1) * h, j * w + 1, (j + 1) * w) }
  end
  local t0 = uv.hrtime()
  local ars = {}
  for r = 0, k - 1 do ars[r] = rc[r]:apply(summa_block, blocks[r][1], blocks[r][2], n, pr, pc) end
  local rows, inside = {}, 0
  for i = 0, pr - 1 do
    rows[i + 1] = {}
    for j = 0, pc - 1 do
      local Cb, secs = ars[i * pc + j]:get(600)
      rows[i + 1][j + 1], inside = Cb, math.max(inside, secs)
    end
  end
  local C = matrix.block(rows)
  local t = (uv.hrtime() - t0) / 1e9
  -- What went through the client: each request's and result's encoded values.
  local bytes = 0
  for r = 0, k - 1 do
    bytes = bytes + #assert(core.encode(blocks[r][1], blocks[r][2], n, pr, pc))
    bytes = bytes + #assert(core.encode(rows[r // pc + 1][r % pc + 1]))
  end
  local want = A:dot(B)
  print(string.format("SUMMA n=%d on %d engines (%dx%d grid): %.3f s, %.2f GFLOP/s", n, k, pr, pc, t,
    2 * n ^ 3 / t / 1e9))
  print(string.format("on the engines: %.3f s, %.2f GFLOP/s (the rest: blocks to and from the client)", inside,
    2 * n ^ 3 / inside / 1e9))
  print(string.format("bytes through the client: %d (A, B and C once: %d)", bytes, 3 * 8 * n * n))
  print(string.format("max difference against A:dot(B): %.3g", C:max_abs_diff(want)))
end)
if cluster then cluster:stop() else rc:close() end
if not ok then error(err, 0) end
