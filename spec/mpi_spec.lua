-- lpar.mpi: engines of the MPI launcher exchange values among themselves.
-- One MPI cluster of 4 engines (oversubscribed on small machines) serves
-- every test here; the last one kills a rank, which ends the MPI job.
local lpar = require "lpar"
local uv = require "luv"
local helpers = require "helpers"

-- On the engines, `mpi` and `matrix` are globals (set in setup).
-- luacheck: globals mpi matrix

-- OpenMPI refuses to run as root unless told twice.
if uv.getuid() == 0 then
  uv.os_setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")
  uv.os_setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
end

describe("lpar.mpi", function()
  local scratch = helpers.scratch_clusters()
  local cluster, rc, view

  setup(function()
    scratch.setup()
    cluster = lpar.Cluster { launcher = "mpi", n = 4, profile = "mpi" }
    rc = cluster:start_and_connect()
    view = rc:view()
    view.block = true
    view:execute("mpi = require 'lpar.mpi'; matrix = require 'lpar.matrix'")
  end)

  teardown(function()
    if rc then rc:close() end
    if cluster then cluster:stop() end
    scratch.teardown()
  end)

  it("gives each engine its rank: rank = engine id, size = engines", function()
    assert.same({ "0/4", "1/4", "2/4", "3/4" },
      view:apply(function() return mpi.rank .. "/" .. mpi.size end))
    assert.same({ 0, 1, 2, 3 }, view:apply(function() return lpar.engine.id end))
  end)

  it("allreduces numbers with sum, prod, max and min, and matrices elementwise", function()
    local got = view:apply(function()
      local r = mpi.rank
      return { mpi.allreduce(r, "sum"), mpi.allreduce(r + 1, "prod"), mpi.allreduce(r * 1.5, "max"),
               mpi.allreduce(r - 0.5, "min"), math.type(mpi.allreduce(r)) }
    end)
    for e = 1, 4 do assert.same({ 6, 24, 4.5, -0.5, "integer" }, got[e]) end
    local sums = view:apply(function()
      local m = matrix.zeros(3, 2)
      m:set(1, 1, mpi.rank)
      m:set(3, 2, 1)
      return mpi.allreduce(m, "sum")
    end)
    for e = 1, 4 do
      assert.equal(6, sums[e]:get(1, 1))
      assert.equal(4, sums[e]:get(3, 2))
      assert.equal(0, sums[e]:get(2, 1))
    end
    -- reduce: on the root only
    assert.same({ 3, nil, nil, nil }, view:apply(function() return mpi.reduce(mpi.rank, "max", 0) end))
  end)

  it("broadcasts a table from any root, and gathers, scatters and allgathers any values", function()
    local got = view:apply(function()
      local t = mpi.rank == 2 and { name = "from 2", list = { 1, 2.5, "x" }, nested = { deep = true } } or nil
      return mpi.bcast(t, 2)
    end)
    for e = 1, 4 do
      assert.same({ name = "from 2", list = { 1, 2.5, "x" }, nested = { deep = true } }, got[e])
    end
    local gathered = view:apply(function() return mpi.gather({ r = mpi.rank }, 1) end)
    assert.same({ r = 0 }, gathered[2][1])
    assert.same({ r = 3 }, gathered[2][4])
    assert.is_nil(gathered[1])
    local scattered = view:apply(function()
      return mpi.scatter(mpi.rank == 0 and { "a", "b", "c", "d" } or nil, 0)
    end)
    assert.same({ "a", "b", "c", "d" }, scattered)
    local all = view:apply(function() return mpi.allgather(mpi.rank * 10) end)
    for e = 1, 4 do assert.same({ 0, 10, 20, 30 }, all[e]) end
  end)

  it("passes a ring of 1 MiB matrices with send and recv, into fresh matrices or a given view", function()
    local got = view:apply(function()
      local nxt, prv = (mpi.rank + 1) % mpi.size, (mpi.rank - 1) % mpi.size
      local m = matrix.zeros(128, 1024) -- 1 MiB of doubles
      m:set(1, 1, mpi.rank)
      m:set(128, 1024, mpi.rank * 2)
      local r -- even ranks send first, so no rank waits on another that also waits
      local src, tag
      if mpi.rank % 2 == 0 then
        mpi.send(m, nxt, 5)
        r, src, tag = mpi.recv(prv, 5)
      else
        r, src, tag = mpi.recv(prv, 5)
        mpi.send(m, nxt, 5)
      end
      -- the same through a strided view, received into another view
      local big = matrix.zeros(256, 1100)
      local into = big:sub(101, 228, 51, 1074)
      local back = mpi.sendrecv(m:sub(1, 128, 1, 1024), prv, 6, nxt, 6, into)
      -- numbers and nil travel in the message's head
      local x, y, z = mpi.sendrecv(mpi.rank + 0.5, nxt, 7, prv, 7), mpi.sendrecv(mpi.rank, nxt, 8, prv, 8),
        mpi.sendrecv(nil, nxt, 9, prv, 9)
      return { r:get(1, 1), r:get(128, 1024), r.rows, r.cols, src, tag, rawequal(back, into),
               big:get(101, 51), big:get(228, 1074), big:get(100, 51), x, math.type(y), y, z == nil }
    end)
    for e = 0, 3 do
      local prv, nxt = (e - 1) % 4, (e + 1) % 4
      assert.same({ prv, prv * 2, 128, 1024, prv, 5, true, nxt, nxt * 2, 0, prv + 0.5, "integer", prv, true },
        got[e + 1])
    end
  end)

  it("splits into row and column communicators, and receives from any source with isend/irecv", function()
    local got = view:apply(function()
      local row = mpi.split(mpi.rank // 2, mpi.rank % 2)
      local col = mpi.split(mpi.rank % 2, mpi.rank // 2)
      local req = mpi.irecv() -- any source, any tag
      local sreq = mpi.isend("hello from " .. mpi.rank, (mpi.rank + 1) % mpi.size, 10 + mpi.rank)
      local v, src, tag = req:wait()
      sreq:wait()
      return { row.rank, row.size, row:allreduce(mpi.rank), col:allreduce(mpi.rank), v, src, tag }
    end)
    assert.same({ 0, 2, 1, 2, "hello from 3", 3, 13 }, got[1])
    assert.same({ 1, 2, 1, 4, "hello from 0", 0, 10 }, got[2])
    assert.same({ 0, 2, 5, 2, "hello from 1", 1, 11 }, got[3])
    assert.same({ 1, 2, 5, 4, "hello from 2", 2, 12 }, got[4])
  end)

  it("interrupts a recv that never gets a message within 1 s, and an allreduce works after", function()
    local ar = rc[1]:apply(function() return mpi.recv(0, 99) end)
    assert.is_false(ar:wait(0.3)) -- blocked in recv
    local t0 = uv.hrtime()
    rc:interrupt(1)
    local ok, err = pcall(ar.get, ar, 1)
    local took = (uv.hrtime() - t0) / 1e9
    assert.is_false(ok)
    assert.matches("interrupted", tostring(err))
    assert.is_true(took < 1, "took " .. took .. " s")
    assert.same({ 4, 4, 4, 4 }, view:apply(function() return mpi.allreduce(1) end))
  end)

  it("says an interrupted collective left its communicator out of step, until reset on every rank", function()
    local ars = rc:view("0:3"):apply(function() return mpi.allreduce(1) end) -- engine 3 never joins
    assert.is_false(ars:wait(0.3))
    rc:interrupt { 0, 1, 2 }
    assert.has_error(function() ars:get(2) end)
    local ok, err = pcall(rc[0].apply_sync, rc[0], function() return mpi.barrier() end)
    assert.is_false(ok)
    assert.matches("an interrupted allreduce left this communicator out of step", tostring(err))
    assert.matches("reset%(%) on every rank", tostring(err))
    assert.same({ 4, 4, 4, 4 }, view:apply(function() mpi.reset(); return mpi.allreduce(1) end))
  end)

  it("runs summa.lua on this cluster: C equal to A:dot(B), the client moving A, B and C once", function()
    local out, code = scratch.sh(helpers.lpar .. " examples/summa.lua --profile mpi -n 256 2>&1")
    assert.equal(0, code, out)
    assert.matches("SUMMA n=256 on 4 engines %(2x2 grid%)", out)
    local diff = tonumber(out:match("max difference against A:dot%(B%): (%S+)"))
    assert.is_true(diff ~= nil and diff < 1e-9, out)
    local bytes, abc = out:match("bytes through the client: (%d+) %(A, B and C once: (%d+)%)")
    assert.is_true(tonumber(bytes) <= tonumber(abc) * 1.01, out)
  end)

  it("runs psum.lua, ipyparallel's MPI parallel sum, on a cluster of its own", function()
    local out, code = scratch.sh(helpers.lpar .. " examples/psum.lua 2 1000 2>&1")
    assert.equal(0, code, out)
    assert.matches("psum of 1..1000 over 2 engines: 500500 on each of them %(n%(n%+1%)/2 = 500500%)", out)
  end)

  it("raises a clear error for require 'lpar.mpi' outside MPI: on a plain engine and in plain Lua", function()
    local plain <close> = lpar.Cluster { n = 1 }:start_and_connect()
    local ok, err = pcall(plain[0].apply_sync, plain[0], function() return require "lpar.mpi" end)
    assert.is_false(ok)
    assert.matches("lpar.mpi: this engine was not started under MPI: start the cluster with the MPI launcher",
      tostring(err))
    local out, code = helpers.run("env -u OMPI_COMM_WORLD_SIZE -u PMIX_RANK -u PMI_RANK lua5.4 -e " ..
      "\"package.cpath = 'build/lib/?.so;' .. package.cpath; require 'lpar.mpi'\" 2>&1")
    assert.are_not.equal(0, code)
    assert.matches("lpar.mpi: not started by mpiexec", out)
  end)

  it("reports a rank that dies as an engine error, and the others as gone with the MPI job, not hung", function()
    local waiting = rc:view { 0, 1, 3 }:apply(function() return mpi.recv(2) end)
    assert.is_false(waiting:wait(0.2))
    local killed = rc[2]:apply(function() os.execute("kill -9 " .. lpar.engine.pid) end)
    local ok, err = pcall(killed.get, killed, 5)
    assert.is_false(ok)
    assert.matches("engine 2 was killed by signal 9", tostring(err))
    -- mpiexec ends the whole job once the dead rank's process exits.
    ok, err = pcall(waiting.get, waiting, 10)
    assert.is_false(ok)
    for _, id in ipairs { 0, 1, 3 } do assert.matches("engine " .. id .. " is unreachable", tostring(err)) end
  end)
end)
