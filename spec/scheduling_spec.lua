--- Load balancing in a standalone controller: the controller places every
-- client's load-balanced tasks, so a client's task goes where the others
-- leave room, and what waits there can be taken back.
-- The cluster lives in a temporary LPAR_DIR and is stopped at the end.
local lpar = require "lpar"
local core = require "lpar.core"
local helpers = require "helpers"

local clusters = helpers.scratch_clusters()

setup(function()
  clusters.setup()
  clusters.start("sched", "-n 2")
end)

teardown(clusters.teardown)

local function client() return lpar.Client { profile = "sched" } end

-- Busy for `seconds` on its engine (not sleeping: an interrupt stops it).
local function spin(seconds)
  local t = os.clock()
  while os.clock() - t < seconds do end
  return lpar.engine.id
end

--- Tasks of `rc` that fill both engines' queues (two each, the default
-- depth), each busy for about `seconds`, once both engines have begun.
local function occupy(rc, seconds)
  local dir = os.tmpname()
  os.remove(dir)
  local tasks = {}
  for i = 1, 4 do
    tasks[i] = rc:load_balanced_view():apply(function(s, path)
      io.open(path .. lpar.engine.id, "w"):close()
      local t = os.clock()
      while os.clock() - t < s do end
      return lpar.engine.id
    end, seconds, dir)
  end
  assert(helpers.poll(function()
    return helpers.read_file(dir .. "0") ~= nil and helpers.read_file(dir .. "1") ~= nil
  end, 5), "the engines did not both begin")
  os.remove(dir .. "0")
  os.remove(dir .. "1")
  return tasks
end

--- What `name` is on each engine, as strings.
local function globals(rc, name)
  return rc:view():apply_sync(function(n) return tostring(_G[n]) end, name)
end

describe("the controller's load balancing", function()
  it("sends a task to the engine another client leaves idle", function()
    local a <close> = client()
    local b <close> = client()
    local dir = os.tmpname()
    local busy = a[0]:apply(function(path)
      io.open(path, "w"):close()
      local t = os.clock()
      while os.clock() - t < 0.8 do end
    end, dir .. ".began")
    assert.is_true(helpers.poll(function() return helpers.read_file(dir .. ".began") ~= nil end, 5))
    os.remove(dir .. ".began")
    -- b's own view of the engines is idle: only the controller knows 0 is busy.
    local ar = b:load_balanced_view():apply(function() return lpar.engine.id end)
    assert.equal(1, ar:get(5))
    assert.equal(1, ar.metadata.engine_id)
    assert.is_false(busy:ready())
    busy:get(5)
  end)

  it("gives two clients mapping at once every result, in order", function()
    local a <close> = client()
    local b <close> = client()
    local n = 20000
    local list = {}
    for i = 1, n do list[i] = i end
    local ma = a:load_balanced_view():map(function(x) return 2 * x end, list)
    local mb = b:load_balanced_view():map(function(x) return x + 1 end, list)
    local ra, rb = ma:get(60), mb:get(60)
    assert.equal(n, #ra)
    assert.equal(n, #rb)
    for i = 1, n do
      if ra[i] ~= 2 * i or rb[i] ~= i + 1 then
        error(string.format("result %d: %s and %s", i, tostring(ra[i]), tostring(rb[i])))
      end
    end
    assert.equal(0, a:queue_status().waiting)
  end)

  it("times out a task waiting there, which then never runs", function()
    local a <close> = client()
    local b <close> = client()
    local busy = occupy(a, 0.8)
    local t0 = core.now()
    local ar = b:load_balanced_view():with { timeout = 0.2 }:apply(function() _G.late = true end)
    assert.equal(1, b:queue_status().waiting)
    local ok, err = pcall(ar.get, ar, 5)
    local waited = core.now() - t0
    assert.is_false(ok)
    assert.matches("TaskError %(timeout%).*timed out while queued in the controller", tostring(err))
    assert.is_true(waited >= 0.15 and waited < 0.5, "failed after " .. waited .. " s")
    assert.is_true(helpers.wait_until(function() return b:queue_status().waiting == 0 end, 2))
    a:wait(busy, 5)
    assert.same({ "nil", "nil" }, globals(a, "late"))
  end)

  it("takes back on abort and on interrupt what waits there, which never runs", function()
    local a <close> = client()
    local b <close> = client()
    local busy = occupy(a, 0.8)
    local lb = b:load_balanced_view()
    local set = function(name) _G[name] = true end
    local aborted = lb:map(set, { "ab1", "ab2", "ab3" })
    local interrupted = lb:map(set, { "in1", "in2" })
    assert.is_true(helpers.wait_until(function() return b:queue_status().waiting == 5 end, 2))
    assert.equal(3, b:abort(aborted))
    local ok, err = pcall(aborted.get, aborted, 5)
    assert.is_false(ok)
    assert.matches("aborted before it ran", tostring(err))
    -- Ctrl-C while waiting on it (rc:interrupt does the same for an engine).
    interrupted:_interrupt()
    ok, err = pcall(interrupted.get, interrupted, 5)
    assert.is_false(ok)
    assert.matches("interrupted before it ran", tostring(err))
    assert.is_true(helpers.wait_until(function() return b:queue_status().waiting == 0 end, 2))
    a:wait(busy, 5)
    for _, name in ipairs { "ab1", "ab2", "ab3", "in1", "in2" } do
      assert.same({ "nil", "nil" }, globals(a, name))
    end
  end)

  it("drops what a client that left had waiting; the others go on", function()
    local a <close> = client()
    local busy = occupy(a, 0.6)
    local b = client()
    b:load_balanced_view():map(function(name) _G[name] = true end, { "gone1", "gone2", "gone3" })
    assert.is_true(helpers.wait_until(function() return a:queue_status().waiting == 3 end, 2))
    b:close()
    assert.is_true(helpers.wait_until(function() return a:queue_status().waiting == 0 end, 2))
    a:wait(busy, 5)
    assert.same({ 2, 4, 6 }, a:load_balanced_view():map_sync(function(x) return 2 * x end, { 1, 2, 3 }))
    for _, name in ipairs { "gone1", "gone2", "gone3" } do
      assert.same({ "nil", "nil" }, globals(a, name))
    end
  end)

  it("passes over a stopped engine, and uses it again once it is back", function()
    local rc <close> = client()
    local cluster = lpar.Cluster { profile = "sched" }
    cluster:signal_engines("STOP", { 0 })
    local ok, err = pcall(function()
      assert.is_true(helpers.wait_until(function() return rc:queue_status()[0].state == "not responding" end, 5))
      local list = {}
      for i = 1, 20 do list[i] = i end
      local ran = rc:load_balanced_view():map(function() return lpar.engine.id end, list):get(10)
      assert.equal(20, #ran)
      for _, id in ipairs(ran) do assert.equal(1, id) end
    end)
    cluster:signal_engines("CONT", { 0 })
    assert(ok, err)
    assert.is_true(helpers.wait_until(function() return rc:queue_status()[0].state == "ready" end, 5))
    local busy = { rc[1]:apply(spin, 0.5), rc[1]:apply(spin, 0.5) }
    assert.equal(0, rc:load_balanced_view():apply(function() return lpar.engine.id end):get(5))
    rc:wait(busy, 5)
  end)

  it("keeps a task waiting while every engine is stopped, and places it when one is back", function()
    local rc <close> = client()
    local cluster = lpar.Cluster { profile = "sched" }
    cluster:signal_engines("STOP")
    local ar
    local ok, err = pcall(function()
      assert.is_true(helpers.wait_until(function()
        local st = rc:queue_status()
        return st[0].state == "not responding" and st[1].state == "not responding"
      end, 5))
      ar = rc:load_balanced_view():apply(function() return "ran" end)
      assert.is_false(ar:wait(0.3))
      assert.equal(1, rc:queue_status().waiting)
    end)
    cluster:signal_engines("CONT")
    assert(ok, err)
    assert.equal("ran", ar:get(5))
  end)

  it("fails a task whose engine dies, naming it, and places the others elsewhere", function()
    local rc <close> = client()
    local cluster = lpar.Cluster { profile = "sched" }
    local lb = rc:load_balanced_view()
    local tasks = {}
    for i = 1, 6 do tasks[i] = lb:apply(spin, 0.3) end
    assert.is_true(helpers.wait_until(function() return tasks[1].metadata.engine_id ~= nil end, 2))
    local victim = tasks[1].metadata.engine_id
    cluster:signal_engines("KILL", victim)
    local failed, ran = 0, {}
    for _, ar in ipairs(tasks) do
      local ok, v = pcall(ar.get, ar, 10)
      if ok then
        ran[#ran + 1] = v
      else
        failed = failed + 1
        assert.matches("EngineError: engine " .. victim .. " was killed by signal 9", tostring(v))
      end
    end
    assert.is_true(failed >= 1 and failed <= 2, failed .. " failed")
    for _, id in ipairs(ran) do assert.equal(1 - victim, id) end
    cluster:restart_engines(victim)
    assert.is_true(helpers.wait_until(function() return #rc == 2 end, 5))
  end)

  it("with every engine gone, gives its waiting tasks back to fail after their grace", function()
    local rc <close> = client()
    local cluster = lpar.Cluster { profile = "sched" }
    local tasks = {}
    for i = 1, 6 do tasks[i] = rc:load_balanced_view():apply(spin, 1) end
    assert.is_true(helpers.wait_until(function() return rc:queue_status().waiting == 2 end, 2))
    cluster:signal_engines("KILL")
    local t0 = core.now()
    local ok, err = pcall(tasks[6].get, tasks[6], 10)
    assert.is_false(ok)
    assert.matches("no engine it may run on was up for 3s", tostring(err))
    assert.is_true(core.now() - t0 < 5)
    assert.equal(0, rc:queue_status().waiting)
    cluster:restart_engines()
    cluster:wait_for_engines(5)
  end)

  it("fails what waits there, clearly, when the controller dies", function()
    clusters.start("doomed", "-n 1")
    local rc <close> = lpar.Client { profile = "doomed" }
    local busy = {}
    for i = 1, 2 do busy[i] = rc[0]:apply(spin, 5) end
    local ar = rc:load_balanced_view():apply(function() return 1 end)
    assert.is_true(helpers.wait_until(function() return rc:queue_status().waiting == 1 end, 2))
    require("luv").kill(clusters.controller_pid("doomed"), "sigkill")
    local ok, err = pcall(ar.get, ar, 5)
    assert.is_false(ok)
    assert.matches("EngineError: task %d+ waited in the controller for an engine, and every engine is " ..
      "unreachable: the connection to its controller was lost", tostring(err))
    assert.is_false(pcall(busy[1].get, busy[1], 5))
  end)
end)
