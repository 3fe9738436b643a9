local lpar = require "lpar"
local core = require "lpar.core"

local function range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

describe("a load-balanced view", function()
  local cluster, rc, lb
  lazy_setup(function()
    cluster = lpar.Cluster { n = 3 }
    rc = cluster:start_and_connect()
    lb = rc:load_balanced_view()
  end)
  lazy_teardown(function() rc:close() end)

  it("applies on some engine and says which", function()
    local ar = lb:apply_async(function(x) return x * 2 end, 21)
    assert.equal(42, ar:get())
    assert.is_number(ar.metadata.engine_id)
    assert.is_true(ar.metadata.submitted <= ar.metadata.started)
  end)

  it("maps like the serial map, ordered and unordered, in any chunk size", function()
    local f = function(x) return x * x + 1 end
    local want = {}
    for i = 1, 50 do want[i] = f(i) end
    assert.same(want, lb:map_sync(f, range(50)))
    assert.same(want, lb:map_sync(f, range(50), { chunksize = 7 }))
    local got = lb:map_sync(f, range(50), { ordered = false, chunksize = 3 })
    table.sort(got)
    assert.same(want, got)
  end)

  it("spreads tasks over the engines", function()
    local ar = lb:map_async(function() local t = os.clock() while os.clock() - t < 0.01 do end
      return lpar.engine.id end, range(12))
    local seen = {}
    for _, id in ipairs(ar:get()) do seen[id] = true end
    assert.same({ [0] = true, [1] = true, [2] = true }, seen)
  end)

  it("iterates an ordered map in order and an unordered one as tasks finish", function()
    local slow_first = function(x) local t = os.clock() while os.clock() - t < (x == 1 and 0.1 or 0) do end
      return x end
    local out = {}
    for v in lb:map_async(slow_first, range(6)):iter() do out[#out + 1] = v end
    assert.same(range(6), out)
    out = {}
    for v in lb:map_async(slow_first, range(6), { ordered = false }):iter() do out[#out + 1] = v end
    assert.are_not.equal(1, out[1])
    table.sort(out)
    assert.same(range(6), out)
  end)

  it("returns errors in place when asked, and raises them otherwise", function()
    local f = function(x) if x == 3 then error("three") end return x end
    local ar = lb:map_async(f, range(4))
    local got = ar:get { return_errors = true }
    assert.equal(1, got[1])
    assert.equal(lpar.RemoteError, getmetatable(got[3]))
    assert.matches("three", got[3].message)
    assert.has_error(function() ar:get() end)
  end)

  it("labels a task's error with its engine and what it was", function()
    local ar = lb:apply_async(function() error("boom") end)
    local ok, err = pcall(ar.get, ar, 5)
    assert.is_false(ok)
    assert.matches("^%[" .. ar.metadata.engine_id .. ":apply%] .*boom", tostring(err))
  end)

  it("retries a task whose engine was SIGKILLed, elsewhere", function()
    local victim = lb:apply_sync(function() return lpar.engine.pid end)
    local f = function(x)
      if x == 5 and lpar.engine.pid == victim then os.execute("kill -KILL " .. victim) end
      local t = os.clock() while os.clock() - t < 0.005 do end
      return x * 10
    end
    local got = lb:with { retries = 1 }:map_sync(f, range(30))
    local want = {}
    for i = 1, 30 do want[i] = i * 10 end
    assert.same(want, got)
    cluster:restart_engines()
  end)

  it("interrupts a task past its timeout, and the engine serves the next", function()
    local ar = lb:with { timeout = 0.2 }:apply(function() while true do end end)
    local ok, err = pcall(ar.get, ar, 5)
    assert.is_false(ok)
    assert.equal(lpar.TaskError, getmetatable(err))
    assert.equal("timeout", err.reason)
    assert.same({ 0, 1, 2 }, rc:view():apply_sync(function() return lpar.engine.id end))
  end)

  it("fails a queued task past its timeout without running it", function()
    local one = rc:load_balanced_view(0)
    rc[0]:execute("runs = 0", { block = true })
    local blocker = one:apply(function() local t = os.clock() while os.clock() - t < 0.4 do end end)
    local queued = {}
    for i = 1, 4 do queued[i] = one:with { timeout = 0.1 }:apply(function() runs = runs + 1 end) end -- luacheck: ignore
    blocker:get(5)
    for i = 2, 4 do
      local ok, err = pcall(queued[i].get, queued[i], 5)
      assert.is_false(ok)
      assert.matches("did not start within its timeout of 0.1s", tostring(err))
    end
    -- The task already handed to the engine's queue (depth 2) is
    -- interrupted as it starts: none ran.
    assert.is_false(pcall(queued[1].get, queued[1], 5))
    assert.equal(0, rc[0]:pull("runs"):get())
  end)

  it("fails a task queued on a busy engine at its deadline, naming the engine, and never runs it", function()
    local one = rc:load_balanced_view(0)
    rc[0]:execute("ran = false", { block = true })
    -- The engine is busy with a direct task the scheduler does not count.
    local busy = rc[0]:execute("local t = os.clock() while os.clock() - t < 0.8 do end")
    local t0 = core.now()
    local ar = one:with { timeout = 0.2 }:apply(function() ran = true end) -- luacheck: ignore
    local ok, err = pcall(ar.get, ar, 5)
    local waited = core.now() - t0
    assert.is_false(ok)
    assert.equal("timeout", err.reason)
    assert.matches("timed out while queued on engine 0", tostring(err))
    assert.matches("%[engine 0, task %d+%]", tostring(err))
    assert.is_true(waited >= 0.15 and waited < 0.5, "failed after " .. waited .. " s")
    busy:get(5)
    -- The engine dropped it when it got to it: it never ran, and it serves on.
    assert.is_false(rc[0]:pull("ran"):get(5))
    assert.equal(42, one:apply_sync(function() return 42 end))
  end)

  it("interrupts a running task at its deadline, not later", function()
    local t0 = core.now()
    local ar = lb:with { timeout = 0.2 }:apply(function() while true do end end)
    local ok, err = pcall(ar.get, ar, 5)
    local waited = core.now() - t0
    assert.is_false(ok)
    assert.equal("timeout", err.reason)
    -- "and was interrupted", or, on a machine too busy for the interrupt to
    -- come back within 0.1 s, "it was interrupted, but engine N has not
    -- stopped it yet": either way at its deadline.
    assert.matches("ran past its timeout of 0.2s", tostring(err))
    assert.is_true(waited >= 0.15 and waited < 0.5, "failed after " .. waited .. " s")
  end)

  it("holds `after` tasks until their dependencies are done, and `follow` to their engine", function()
    local first = lb:apply(function() local t = os.clock() while os.clock() - t < 0.1 do end
      return os.clock() end)
    local second = lb:with { after = first }:apply(function() return os.clock() end)
    assert.is_true(second:get(5) ~= nil)
    assert.is_true(second.metadata.started >= first.metadata.completed)
    local here = lb:apply(function() return lpar.engine.id end)
    local follow = lb:with { follow = here }:map_async(function() return lpar.engine.id end, range(6))
    for _, id in ipairs(follow:get()) do assert.equal(here:get(), id) end
  end)

  it("maps 100,000 tasks in order, submitting them as the window has room", function()
    local n = 100000
    local list = range(n)
    collectgarbage()
    local before = collectgarbage("count")
    local ar = lb:map_async(function(x) return x * 2 end, list)
    -- Only a window of tasks is made at once (all of them took 150 MB).
    local grown = (collectgarbage("count") - before) / 1024
    assert.is_true(grown < 10, string.format("the heap grew %.1f MB", grown))
    assert.equal(n, #ar)
    local out = ar:get(120)
    -- Settled tasks are kept compactly: results and a few numbers each.
    collectgarbage()
    grown = (collectgarbage("count") - before) / 1024
    assert.is_true(grown < 20, string.format("the heap grew %.1f MB", grown))
    assert.equal(n, #out)
    for i = 1, n, 997 do assert.equal(2 * i, out[i]) end
    assert.equal(2 * n, out[n])
  end)

  it("keeps a task's false or nil result as it is", function()
    local out = lb:map_sync(function(x)
      if x == 1 then return false end
      if x == 2 then return nil end
      return x
    end, { 1, 2, 3 })
    assert.is_false(out[1])
    assert.is_nil(out[2])
    assert.equal(3, out[3])
  end)

  it("sends tiny tasks several to a request, each keeping its own result, error and output", function()
    local n = 20000
    local requests_before = rc[0]:apply_sync(function() return lpar.engine.functions_received() end)
    assert.is_number(requests_before)
    local ar = lb:map_async(function(x)
      if x % 1000 == 0 then error("bad " .. x) end
      if x % 5000 == 1 then print("item " .. x) end
      return x + 1
    end, range(n))
    local out = ar:get { timeout = 60, return_errors = true }
    assert.equal(n, #out)
    for i = 1, n do
      if i % 1000 == 0 then
        assert.equal(lpar.RemoteError, getmetatable(out[i]))
        assert.matches("bad " .. i, out[i].message)
        assert.is_number(out[i].engine)
      else
        assert.equal(i + 1, out[i])
      end
    end
    assert.is_false(ar:successful())
    -- Nothing printed is lost, whichever task of its request it lands on.
    local printed = table.concat(ar.stdout)
    for _, x in ipairs { 1, 5001, 10001, 15001 } do assert.matches("item " .. x .. "\n", printed) end
    local ids = ar.engine_ids
    assert.equal(n, #ids)
    for i = 1, n, 1999 do assert.is_number(ids[i]) end
    -- The errors raise as one CompositeError naming each.
    local ok, err = pcall(ar.get, ar, 1)
    assert.is_false(ok)
    assert.equal(lpar.CompositeError, getmetatable(err))
    assert.equal(n // 1000, #err.errors)
  end)

  it("takes a copy of a map's list, and aborts the tasks it has not made yet", function()
    local one = rc:load_balanced_view(0)
    local blocker = one:apply(function() local t = os.clock() while os.clock() - t < 0.3 do end end)
    local list = range(3000)
    local ar = one:map_async(function(x) return x end, list)
    list[2999] = "changed"
    local aborted = rc:abort(ar)
    assert.is_true(aborted >= 2990, aborted .. " aborted")
    blocker:get(5)
    local out = ar:get { timeout = 5, return_errors = true }
    assert.equal(3000, #out)
    assert.equal("aborted", out[3000].reason)
    -- Tasks already on the engine ran, with the items as they were; the rest were aborted.
    for i = 1, 3000 do
      if out[i] ~= i then assert.equal("aborted", out[i].reason) end
    end
    local ran = lb:map_sync(function(x) return x end, { 1, 2, 3 })
    assert.same({ 1, 2, 3 }, ran)
  end)

  it("aborts exactly the queued tasks asked for", function()
    local one = rc:load_balanced_view({ 1 })
    local busy = one:apply(function() local t = os.clock() while os.clock() - t < 0.3 do end return "ran" end)
    local ars = {}
    for i = 1, 6 do ars[i] = one:apply(function() return "ran" end) end
    local aborted = rc:abort({ ars[5], ars[6] })
    assert.equal(2, aborted)
    assert.equal("ran", busy:get(5))
    for i = 1, 4 do assert.equal("ran", ars[i]:get(5)) end
    for i = 5, 6 do
      local ok, err = pcall(ars[i].get, ars[i], 5)
      assert.is_false(ok)
      assert.equal("aborted", err.reason)
    end
  end)

  it("consumes an endless iterator lazily with imap, within max_outstanding", function()
    local n = 0
    local source = function() n = n + 1 return n end
    local it, stats = lb:imap(function(x) return x * 2 end, source, { max_outstanding = 4 })
    local got = {}
    for _ = 1, 40 do got[#got + 1] = it() end
    assert.equal(40, #got)
    assert.is_true(stats.max_in_flight <= 4)
    assert.is_true(n <= 44)
    table.sort(got)
    assert.equal(2, got[1])
  end)

  it("names bad options and queues nothing", function()
    local sched = rc._hub.scheduler
    local queued = sched.tail
    assert.has_error(function() lb:with { scheme = "fastest" }:apply(print) end,
      'unknown scheme "fastest" (least, lru, random)')
    assert.has_error(function() lb:with { retry = 1 } end, "with: unknown view flag 'retry' (did you mean 'retries'?)")
    assert.has_error(function() lb:map(print, {}, { chunksize = 0 }) end, "map: chunksize must be a positive integer")
    assert.equal(queued, sched.tail)
    assert.equal(7, lb:apply_sync(function() return 7 end))
  end)

  it("waits interactively, silent when output is not a terminal", function()
    local ar = lb:map_async(function(x) return x end, range(20))
    local written = {}
    local real = io.stdout
    local sink = setmetatable({ write = function(_, s) written[#written + 1] = s end, flush = function() end },
      { __index = real })
    io.stdout = sink -- luacheck: ignore
    local ok = ar:wait_interactive()
    io.stdout = real -- luacheck: ignore
    assert.is_true(ok)
    assert.equal(20, ar.progress)
    assert.same({}, written)
  end)

  it("keeps the client's memory flat over many tiny tasks", function()
    collectgarbage()
    local before = collectgarbage("count")
    for _ = 1, 5 do lb:map_sync(function(x) return x end, range(5000)) end
    collectgarbage()
    collectgarbage()
    assert.is_true(collectgarbage("count") - before < 2048, "grew by " .. (collectgarbage("count") - before) .. " KB")
    assert.is_nil(next(rc._hub.pending))
  end)
end)
