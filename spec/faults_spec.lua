local lpar = require "lpar"
local uv = require "luv"
local helpers = require "helpers"

local function busy(seconds)
  return function() local t = os.clock() while os.clock() - t < seconds do end return lpar.engine.id end
end

describe("errors and faults", function()
  local cluster, rc, dview

  before_each(function()
    cluster = lpar.Cluster { n = 4 }
    rc = cluster:start_and_connect()
    dview = rc:view()
  end)

  after_each(function()
    rc:close()
  end)

  it("raise a remote Lua error from get() with the engine, message and traceback", function()
    local ar = rc[2]:apply_async(function() local t = nil; return t.field end)
    local ok, err = pcall(ar.get, ar)
    assert.is_false(ok)
    assert.equal(lpar.RemoteError, getmetatable(err))
    assert.equal(2, err.engine)
    assert.matches("attempt to index a nil value", err.message)
    assert.matches("stack traceback", err.traceback)
    assert.matches("^%[2:apply%] .*faults_spec.lua:%d+: attempt to index", tostring(err))
    assert.is_false(ar:successful())
  end)

  it("names a syntax error in executed code", function()
    local ok, err = pcall(function() rc[0]:execute("x = = 1", { block = true }) end)
    assert.is_false(ok)
    assert.matches("^%[0:execute%] %[execute%]:1: unexpected symbol", tostring(err))
  end)

  it("collects failures on several engines into one error", function()
    local ar = dview:apply_async(function()
      if lpar.engine.id % 2 == 1 then error("odd engine " .. lpar.engine.id) end
      return true
    end)
    local ok, err = pcall(ar.get, ar)
    assert.is_false(ok)
    assert.equal(lpar.CompositeError, getmetatable(err))
    assert.equal(2, #err.errors)
    assert.equal(1, err.errors[1].engine)
    assert.equal(3, err.errors[2].engine)
    assert.matches("odd engine 3", tostring(err))
  end)

  it("names a result that cannot be sent back", function()
    local ok, err = pcall(rc[1].apply_sync, rc[1], function() return coroutine.create(print) end)
    assert.is_false(ok)
    assert.matches("cannot send result%[1%]: coroutine", tostring(err))
    assert.equal(1, rc[1]:apply_sync(function() return 1 end))
  end)

  for _, case in ipairs {
    { "SIGKILL", function() os.execute("kill -KILL " .. lpar.engine.pid) end,
      "was killed by signal 9 %(SIGKILL%)" },
    { "a segfault", function() os.execute("kill -SEGV " .. lpar.engine.pid) end,
      "was killed by signal 11 %(SIGSEGV%)" },
    { "os.exit", function() os.exit(3) end, "exited with status 3" },
  } do
    it("turn an engine killed by " .. case[1] .. " mid-task into an EngineError", function()
      local others = rc:view("0:2"):apply_async(busy(0.2))
      local t0 = uv.hrtime()
      local ar = rc[3]:apply_async(case[2])
      local ok, err = pcall(ar.get, ar, 5)
      local ms = (uv.hrtime() - t0) / 1e6
      assert.is_false(ok)
      assert.equal(lpar.EngineError, getmetatable(err))
      assert.equal(3, err.engine)
      assert.is_number(err.task)
      assert.matches("engine 3 " .. case[3] .. " while running task %d+", tostring(err))
      -- Under the sanitizers an engine's exit runs LeakSanitizer's check first.
      local bound = helpers.sanitized and 1000 or 150
      assert.is_true(ms < bound, "engine death took " .. ms .. " ms to report")
      -- The others carry on, and the cluster stays usable.
      assert.same({ 0, 1 }, others:get(5))
      assert.same({ 0, 1, 2 }, rc.ids)
      assert.same({ 0, 1, 2 }, rc:view():apply_sync(function() return lpar.engine.id end))
      local ok2, err2 = pcall(rc[1].apply, rc[1], print)
      assert.is_true(ok2, err2)
      -- A call addressed to the dead engine says so at once.
      local ok3, err3 = pcall(function() rc:view({ 2, 3 }):apply(print) end)
      assert.is_false(ok3)
      assert.matches("engine 3 .*restart_engines", tostring(err3))
      local ok4, err4 = pcall(rc.load_balanced_view, rc, { 3 })
      assert.is_false(ok4)
      assert.matches("engine 3 .*restart_engines", tostring(err4))
      -- restart_engines brings it back.
      cluster:restart_engines({ 3 })
      assert.same({ 0, 1, 2, 3 }, rc.ids)
      assert.equal(3, rc[3]:apply_sync(function() return lpar.engine.id end))
    end)
  end

  it("restart_engines gives fresh engines that lost their globals", function()
    dview:execute("kept = true", { block = true })
    cluster:restart_engines()
    assert.same({ 0, 1, 2, 3 }, rc.ids)
    local ok, err = pcall(dview.pull, dview, "kept", { block = true })
    assert.is_false(ok)
    assert.matches("NameError: name 'kept' is not defined", tostring(err))
  end)

  it("rejects a malformed request on the engine, counted, and keeps serving", function()
    -- A valid frame whose payload is not an encoding.
    local frame = string.pack("<I4BBI2I8I8", 0x5241504c, 3, 0, 0, 1234567, 5) .. "\255junk"
    assert.is_true(rc._hub:send_raw(1, frame))
    assert.equal(1, rc[1]:apply_sync(function() return lpar.engine.bad_messages() end))
    assert.equal(1, rc[1]:apply_sync(function() return lpar.engine.id end))
  end)

  it("lose only the engine that is sent a broken frame", function()
    local huge = string.pack("<I4BBI2I8I8", 0x5241504c, 3, 0, 0, 1, 1 << 40)
    assert.is_true(rc._hub:send_raw(3, huge))
    local ok, err = pcall(function() rc[3]:execute("x = 1", { block = true }) end)
    assert.is_false(ok)
    assert.matches("engine 3 exited with status 3", tostring(err))
    assert.same({ 0, 1, 2 }, rc:view():apply_sync(function() return lpar.engine.id end))
  end)

  for _, case in ipairs {
    { "bad magic", "this is not an lpar frame at all......." },
    { "unknown message type", string.pack("<I4BBI2I8I8", 0x5241504c, 0x7f, 0, 0, 0, 0) },
    { "bad length", string.pack("<I4BBI2I8I8", 0x5241504c, 6, 0, 0, 0, 1 << 40) },
  } do
    it("drop the connection of an engine that sends a frame with " .. case[1] .. ", counted", function()
      local bytes = case[2]
      local ar = rc[2]:apply_async(function()
        lpar.engine._send_raw(bytes)
        local t = os.clock() while os.clock() - t < 5 do end
      end)
      local ok, err = pcall(ar.get, ar, 5)
      assert.is_false(ok)
      assert.matches("engine 2 sent a malformed message %(" .. case[1], tostring(err))
      assert.equal(1, rc:queue_status().bad_messages)
      assert.same({ 0, 1, 3 }, rc:view():apply_sync(function() return lpar.engine.id end))
    end)
  end

  it("fails a request whose reply cannot be decoded, counted, and carries on", function()
    local ar = rc[0]:apply_async(function()
      local reply = string.pack("<dd", 0, 0) .. "\255garbage"
      local task = 0
      lpar.engine._send_raw(string.pack("<I4BBI2I8I8", 0x5241504c, 6, 0, 0, task, #reply) .. reply)
      return "real"
    end)
    assert.equal("real", ar:get(5))
    helpers.wait_until(function() return rc:queue_status().undecodable > 0 end, 1)
    assert.equal(1, rc:queue_status().undecodable)
    assert.equal(0, rc[0]:apply_sync(function() return lpar.engine.id end))
  end)

  it("stop fails pending results and leaves no engine", function()
    local pids = {}
    for id = 0, 3 do pids[#pids + 1] = rc:queue_status()[id].pid end
    local ar = rc[0]:apply_async(busy(10))
    cluster:stop()
    local ok, err = pcall(ar.get, ar, 1)
    assert.is_false(ok)
    assert.matches("was stopped with its cluster", tostring(err))
    for _, pid in ipairs(pids) do assert.is_false(helpers.alive(pid)) end
  end)
end)

describe("engines outlive nothing", function()
  it("a to-be-closed cluster stops its engines at scope exit", function()
    local pids = {}
    do
      local rc <close> = lpar.Cluster { n = 2 }:start_and_connect()
      for id = 0, 1 do pids[#pids + 1] = rc:queue_status()[id].pid end
      assert.is_true(helpers.alive(pids[1]))
    end
    for _, pid in ipairs(pids) do assert.is_false(helpers.alive(pid)) end
  end)

  it("a garbage-collected cluster stops its engines", function()
    local rc = lpar.Cluster { n = 2 }:start_and_connect()
    local pids = { rc:queue_status()[0].pid, rc:queue_status()[1].pid }
    rc = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    for _, pid in ipairs(pids) do
      assert.is_true(helpers.poll(function() return not helpers.alive(pid) end, 2))
    end
  end)

  it("SIGKILL of the client leaves no engine behind, even a busy one", function()
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    f:write([[
      local lpar = require "lpar"
      local rc = lpar.Cluster { n = 3 }:start_and_connect()
      rc[0]:apply(function() while true do end end)
      for id = 0, 2 do io.write(rc:queue_status()[id].pid, " ") end
      io.write("\n") io.stdout:flush()
      require("luv").sleep(60000)
    ]])
    f:close()
    local p = io.popen(helpers.lpar .. " " .. script .. " & echo $!")
    local client = tonumber(p:read("l"))
    local line = p:read("l")
    local pids = {}
    for pid in line:gmatch("%d+") do pids[#pids + 1] = tonumber(pid) end
    assert.equal(3, #pids)
    for _, pid in ipairs(pids) do assert.is_true(helpers.alive(pid)) end
    os.execute("kill -KILL " .. client)
    p:close()
    os.remove(script)
    for _, pid in ipairs(pids) do
      assert.is_true(helpers.poll(function() return not helpers.alive(pid) end, 2),
        "engine " .. pid .. " outlived its client")
    end
  end)
end)

describe("interrupting engines", function()
  local rc
  lazy_setup(function() rc = lpar.Cluster { n = 2 }:start_and_connect() end)
  lazy_teardown(function() rc:close() end)

  it("stops a runaway task with an 'interrupted' error and keeps the engine", function()
    rc[1]:execute("kept = 42", { block = true })
    local ar = rc[1]:apply_async(function() while true do end end)
    local other = rc[0]:apply_async(function() return "untouched" end)
    require("luv").sleep(20)
    rc:interrupt(1)
    local ok, err = pcall(ar.get, ar, 2)
    assert.is_false(ok)
    assert.equal(lpar.RemoteError, getmetatable(err))
    assert.matches("interrupted", err.message)
    assert.equal("untouched", other:get(2))
    assert.equal(42, rc[1]:pull("kept"):get(2))
  end)

  it("does nothing to an idle engine", function()
    rc:interrupt()
    require("luv").sleep(20)
    assert.same({ 0, 1 }, rc:view():apply_sync(function() return lpar.engine.id end))
  end)
end)
