-- Reliability (issue 18): no hang, no lost task, no stale clock.
local lpar = require "lpar"
local uv = require "luv"
local helpers = require "helpers"

local function spin(seconds)
  local t = os.clock()
  while os.clock() - t < seconds do end
end

local function seconds_since(t0) return (uv.hrtime() - t0) / 1e9 end

describe("reliability", function()
  local cluster, rc

  before_each(function()
    cluster = lpar.Cluster { n = 4 }
    rc = cluster:start_and_connect()
  end)

  after_each(function()
    -- A stopped engine cannot exit: let it go on before the cluster stops.
    pcall(cluster.signal_engines, cluster, "CONT")
    rc:close()
    cluster:stop()
  end)

  it("loses no task of a retried map when an engine dies under it", function()
    local lb = rc:load_balanced_view()
    lb.retries = 3
    local list = {}
    for i = 1, 1000 do list[i] = i end
    local ar = lb:map_async(function(x) return x * 2 end, list)
    -- The client is busy while engine 2 answers and dies: its replies and
    -- its end wait unread, and settling them hands it more tasks.
    local victim = rc:queue_status()[2].pid
    uv.sleep(100)
    uv.kill(victim, "sigkill")
    uv.sleep(50)
    local ok, out = pcall(ar.get, ar, 60)
    assert.is_true(ok, tostring(out))
    assert.equal(1000, #out)
    for i = 1, 1000 do assert.equal(2 * i, out[i]) end
    assert.equal("dead", rc:queue_status()[2].state)
  end)

  it("loses no task when an engine is killed 100 ms into a map", function()
    local lb = rc:load_balanced_view()
    lb.retries = 3
    local list = {}
    for i = 1, 1000 do list[i] = i end
    local ar = lb:map_async(function(x)
      local t = os.clock() while os.clock() - t < 0.001 do end
      return x * 2
    end, list)
    local victim = rc:queue_status()[1].pid
    local killer = uv.new_timer()
    killer:start(100, 0, function() uv.kill(victim, "sigkill") end)
    local ok, out = pcall(ar.get, ar, 60)
    killer:stop()
    killer:close()
    uv.run("nowait")
    assert.is_true(ok, tostring(out))
    assert.equal(1000, #out)
    for i = 1, 1000 do assert.equal(2 * i, out[i]) end
  end)

  it("times a wait from now, not from the loop's last wake-up", function()
    local ar = rc[0]:apply_async(function()
      local t = os.clock() while os.clock() - t < 3 do end
      return "late"
    end)
    spin(0.5) -- the client computes; libuv's cached time goes stale
    local t0 = uv.hrtime()
    local ok, err = pcall(ar.get, ar, 0.1)
    local waited = seconds_since(t0)
    assert.is_false(ok)
    assert.equal(lpar.TimeoutError, getmetatable(err))
    assert.is_true(waited < 1, "get(0.1) returned after " .. waited .. " s")
    assert.is_true(waited >= 0.09, "get(0.1) returned after " .. waited .. " s")
  end)

  it("waits the whole timeout on a stopped engine after client compute", function()
    cluster:signal_engines("STOP", { 1 })
    local ar = rc[1]:apply_async(function() return 1 end)
    spin(0.5)
    local t0 = uv.hrtime()
    local ok = pcall(ar.get, ar, 1)
    local waited = seconds_since(t0)
    assert.is_false(ok)
    assert.is_true(waited >= 0.95, "get(1) gave up after " .. waited .. " s")
    assert.is_true(waited < 3, "get(1) gave up after " .. waited .. " s")
  end)

  it("fails a queued task on its timeout measured from submission", function()
    local lb = rc:load_balanced_view({ 0 })
    lb.queue_depth = 1
    local blocker = lb:apply(function() local t = os.clock() while os.clock() - t < 2 do end end)
    spin(0.5)
    local t0 = uv.hrtime()
    local queued = lb:with { timeout = 0.3 }:apply(function() return 1 end)
    local ok, err = pcall(queued.get, queued, 5)
    local waited = seconds_since(t0)
    assert.is_false(ok)
    assert.matches("did not start within its timeout", tostring(err))
    assert.is_true(waited >= 0.25, "the timeout came after " .. waited .. " s")
    assert.is_true(waited < 1.5, "the timeout came after " .. waited .. " s")
    blocker:wait(5)
  end)

  it("fails a reply with more values than a Lua stack holds, and carries on", function()
    local ar = rc[0]:apply_async(function()
      local t = {}
      for i = 1, 999000 do t[i] = i end
      return table.unpack(t)
    end)
    local t0 = uv.hrtime()
    local ok, err = pcall(ar.get, ar, 20)
    assert.is_false(ok)
    assert.is_true(seconds_since(t0) < 15)
    assert.not_equal(lpar.TimeoutError, getmetatable(err))
    assert.matches("could not be decoded", tostring(err))
    assert.equal(0, rc[0]:apply_sync(function() return lpar.engine.id end))
  end)

  it("refuses a load-balanced view over no engines", function()
    local ok, err = pcall(rc.load_balanced_view, rc, {})
    assert.is_false(ok)
    assert.matches("no engines", tostring(err))
  end)

  it("refuses a call on a view whose slice names no engine", function()
    local v = rc:view("5:9")
    local ok, err = pcall(v.execute, v, "x = 1")
    assert.is_false(ok)
    assert.matches('no engines in targets "5:9"', tostring(err))
  end)

  it("fails a retried task whose engines can never come back", function()
    local lb = rc:load_balanced_view({ 3 })
    lb.retries = 2
    local ar = lb:apply(function() os.exit(5) end)
    local t0 = uv.hrtime()
    local ok, err = pcall(ar.get, ar, 10)
    assert.is_false(ok)
    assert.is_true(seconds_since(t0) < 9, "failed after " .. seconds_since(t0) .. " s")
    assert.not_equal(lpar.TimeoutError, getmetatable(err))
    assert.matches("engine 3 exited with status 5", tostring(err))
    assert.matches("no engine", tostring(err))
  end)

  it("shows a stopped engine as not responding, a busy one as ready, and balances around it", function()
    cluster:signal_engines("STOP", { 1 })
    local busy = rc[0]:apply(function() local t = os.clock() while os.clock() - t < 1.5 do end return 0 end)
    assert.is_true(helpers.wait_until(function()
      return rc:queue_status()[1].state == "not responding"
    end, 5), "engine 1 still shows as " .. rc:queue_status()[1].state)
    assert.equal("ready", rc:queue_status()[0].state) -- busy in Lua, still beating
    local list = {}
    for i = 1, 40 do list[i] = i end
    local ar = rc:load_balanced_view():map(function() return lpar.engine.id end, list)
    local ran = ar:get(10)
    assert.equal(40, #ran)
    for _, id in ipairs(ran) do assert.not_equal(1, id) end
    assert.equal(0, busy:get(5))
    cluster:signal_engines("CONT", { 1 })
    assert.is_true(helpers.wait_until(function() return rc:queue_status()[1].state == "ready" end, 5))
    assert.equal(1, rc[1]:apply_sync(function() return lpar.engine.id end))
  end)

  it("ends a wait on Ctrl-C, interrupting that call's tasks, and the engines keep their state", function()
    local wait = require "lpar.wait"
    rc:view():execute("kept = 7", { block = true })
    local ctrl_c = uv.new_timer()
    ctrl_c:start(300, 0, wait.interrupt)
    local ar = rc:view():execute("while true do end")
    local ok, err = pcall(ar.get, ar, 10)
    assert.is_false(ok)
    assert.matches("interrupted", tostring(err))
    -- A load-balanced map: running tasks interrupted and not retried, queued ones dropped.
    local lb = rc:load_balanced_view()
    lb.retries = 5
    local list = {}
    for i = 1, 20 do list[i] = i end
    local m = lb:map_async(function() while true do end end, list)
    ctrl_c:start(300, 0, wait.interrupt)
    local t0 = uv.hrtime()
    local ok2, err2 = pcall(m.get, m, 10)
    helpers.close(ctrl_c)
    assert.is_false(ok2)
    assert.matches("interrupted", tostring(err2))
    assert.is_true(seconds_since(t0) < 5)
    assert.same({ 7, 7, 7, 7 }, rc:view():pull("kept"):get(5))
  end)

  it("raises a NameError naming a name pull finds undefined", function()
    rc[1]:execute("only_here = 1", { block = true })
    local ok, err = pcall(function() return rc:view("0:2"):pull("only_here"):get(5) end)
    assert.is_false(ok)
    assert.matches("%[0:pull%] NameError: name 'only_here' is not defined", tostring(err))
    assert.equal(1, rc[1]:pull("only_here"):get(5))
    local ok2, err2 = pcall(function() return rc[1]:pull({ "only_here", "nope" }):get(5) end)
    assert.is_false(ok2)
    assert.matches("name 'nope' is not defined", tostring(err2))
  end)

  it("refuses, on the engine, a result over 1 GiB, and the engine keeps its globals", function()
    rc[0]:execute("kept_big = 5", { block = true })
    local ok, err = pcall(function()
      return rc[0]:apply(function() return string.rep("x", (1 << 30) + 1) end):get(60)
    end)
    assert.is_false(ok)
    assert.matches("cannot send the result: %d+ bytes, more than the 1 GiB", tostring(err))
    assert.equal(5, rc[0]:pull("kept_big"):get(5))
  end)

  it("names a timeout that is not a number", function()
    local ar = rc[0]:apply_async(function() return 1 end)
    local ok, err = pcall(ar.get, ar, "x")
    assert.is_false(ok)
    assert.matches("timeout must be a number", tostring(err))
    assert.equal(1, ar:get(5))
  end)
end)

describe("a wait on an empty loop", function()
  it("waits the whole timeout when nothing on the loop can end the wait", function()
    -- A result no event will settle: nothing is pending anywhere.
    local ar = require("lpar.asyncresult").new("apply", { single = true })
    ar:_slot(0)
    local t0 = uv.hrtime()
    local ok, err = pcall(ar.get, ar, 0.5)
    assert.is_false(ok)
    assert.matches("not ready after 0.5s", tostring(err))
    assert.is_true(seconds_since(t0) >= 0.45, "gave up after " .. seconds_since(t0) .. " s")
    -- Without a timeout, it says the wait could never end instead of hanging.
    local ok2, err2 = pcall(ar.get, ar)
    assert.is_false(ok2)
    assert.matches("can never be ready", tostring(err2))
  end)
end)

describe("engines without heartbeats", function()
  it("are never called not responding, and take load-balanced tasks after idling", function()
    local rc <close> = lpar.Cluster { n = 1, engine_env = { LPAR_HEARTBEAT_MS = "0" } }:start_and_connect()
    uv.sleep(1200) -- past the ten periods of silence that mark an engine that beats
    assert.equal("ready", rc:queue_status()[0].state)
    assert.equal(7, rc:load_balanced_view():apply(function() return 7 end):get(5))
  end)
end)

describe("an engine's memory limit", function()
  it("fails a task past it with the limit named, and the engine serves on with its globals", function()
    local rc <close> = lpar.Cluster { n = 1, mem_limit = 64 * 1024 * 1024 }:start_and_connect()
    rc[0]:execute("kept = 'still here'", { block = true })
    local ok, err = pcall(function()
      return rc[0]:apply(function() return #string.rep("x", 100 * 1024 * 1024) end):get(10)
    end)
    assert.is_false(ok)
    assert.matches("not enough memory %(limit 64 MB%)", tostring(err))
    assert.equal("still here", rc[0]:pull("kept"):get(5))
    assert.equal(1000, rc[0]:apply(function() return #string.rep("x", 1000) end):get(5))
  end)
end)

describe("--mem-limit", function()
  local clusters = helpers.scratch_clusters()
  setup(clusters.setup)
  teardown(clusters.teardown)

  local function big_task() return #string.rep("x", 100 * 1024 * 1024) end

  it("refuses a size that is not one, or too small for an engine, and starts nothing", function()
    for _, case in ipairs {
      { "12Q", "%-%-mem%-limit must be a size in bytes, with an optional K, M or G suffix %(256M%), not '12Q'" },
      { "0", "at least 1M %(1048576 bytes%): an engine needs that much to start, not 0" },
      { "1000", "%-%-mem%-limit must be at least 1M %(1048576 bytes%)" },
    } do
      local out, code = clusters.sh(string.format("%s cluster start --daemonize --profile bad --mem-limit %s 2>&1",
        helpers.lpar, case[1]))
      assert.equal(1, code, out)
      assert.matches(case[2], out)
      assert.is_nil(helpers.read_file(clusters.conn_file("bad")))
    end
    local out, code = clusters.sh(helpers.lpar .. " engine --profile bad --mem-limit 3X 2>&1")
    assert.equal(1, code, out)
    assert.matches("%-%-mem%-limit must be a size in bytes", out)
    assert.has_error(function() lpar.Cluster { n = 1, mem_limit = 1000 } end,
      "Cluster: mem_limit must be at least 1M (1048576 bytes): an engine needs that much to start, not 1000")
  end)

  it("caps the engines of `lpar cluster start` and of `lpar engine`; they serve on", function()
    clusters.start("mem", "-n 1 --mem-limit 64M")
    local rc <close> = lpar.Client { profile = "mem" }
    rc[0]:execute("kept = 'still here'", { block = true })
    local ok, err = pcall(function() return rc[0]:apply(big_task):get(10) end)
    assert.is_false(ok)
    assert.matches("not enough memory %(limit 64 MB%)", tostring(err))
    assert.equal("still here", rc[0]:pull("kept"):get(5))
    assert.equal(1000, rc[0]:apply(function() return #string.rep("x", 1000) end):get(5))
    -- A restarted engine keeps the cap.
    lpar.Cluster { profile = "mem" }:restart_engines { 0 }
    -- rc hears of the engine on its own link: wait for it there.
    assert.is_true(helpers.wait_until(function()
      return rc:queue_status()[0] and rc:queue_status()[0].state == "ready" end, 5))
    assert.is_false((pcall(function() return rc[0]:apply(big_task):get(10) end)))

    local out = clusters.base .. "/engine.out"
    local command = string.format("exec %s engine --profile mem --mem-limit 1.5M > '%s' 2>&1", helpers.lpar, out)
    local bad = assert(io.popen(command:gsub("^exec ", "") .. "; echo $?"))
    assert.equal("1", bad:read("a"):match("(%d+)%s*$"))
    bad:close()
    assert.matches("not '1.5M'", helpers.read_file(out))
    command = string.format("exec %s engine --profile mem --mem-limit 1536K > '%s' 2>&1", helpers.lpar, out)
    local handle, pid = uv.spawn("/bin/sh", { args = { "-c", command } }, function() end)
    assert.is_truthy(handle)
    assert.is_true(helpers.wait_until(function() return #rc == 2 end, 10))
    rc[1]:execute("mine = 1", { block = true })
    local ok2, err2 = pcall(function() return rc[1]:apply(big_task):get(10) end)
    assert.is_false(ok2)
    assert.matches("not enough memory %(limit 1.5 MB%)", tostring(err2))
    assert.equal(1, rc[1]:pull("mine"):get(5))
    uv.kill(pid, "sigterm")
    assert.is_true(helpers.wait_until(function() return #rc == 1 end, 5))
    helpers.close(handle)
  end)

  it("is passed on by Cluster{profile = P, mem_limit = bytes}", function()
    local cluster = lpar.Cluster { profile = "memc", n = 1, mem_limit = 48 * 1024 * 1024 }
    local rc <close> = cluster:start_and_connect()
    local ok, err = pcall(function() return rc[0]:apply(big_task):get(10) end)
    assert.is_false(ok)
    assert.matches("not enough memory %(limit 48 MB%)", tostring(err))
    assert.equal(2, rc[0]:apply(function() return 1 + 1 end):get(5))
  end)
end)

describe("a standalone controller's strangers and descriptors", function()
  local clusters = helpers.scratch_clusters()
  setup(clusters.setup)
  teardown(clusters.teardown)

  -- `count` idle TCP connections to `port` from address `from`; the list,
  -- each with .eof set once the controller cuts it off.
  local function strangers(from, port, count)
    local list, connected = {}, 0
    for i = 1, count do
      local t = uv.new_tcp()
      assert(t:bind(from, 0))
      local s = { handle = t }
      t:connect("127.0.0.1", port, function(err)
        connected = connected + 1
        if err then s.eof = true return end
        t:read_start(function(rerr, chunk) if rerr or not chunk then s.eof = true end end)
      end)
      list[i] = s
    end
    assert.is_true(helpers.wait_until(function() return connected == count end, 10))
    return list
  end

  local function still_open(list)
    local n = 0
    for _, s in ipairs(list) do if not s.eof then n = n + 1 end end
    return n
  end

  local function close_all(list)
    for _, s in ipairs(list) do s.handle:close() end
    uv.run("nowait")
  end

  -- A connection file for the cluster's TCP address only.
  local function tcp_only(name)
    local path = clusters.base .. "/" .. name .. "-tcp.json"
    local f = assert(io.open(path, "w"))
    f:write((helpers.read_file(clusters.conn_file(name)):gsub('  "socket":"[^"]*",\n', "")))
    f:close()
    uv.fs_chmod(path, tonumber("600", 8))
    return path
  end

  it("caps one address's idle connections, so another address and a real client keep theirs", function()
    clusters.start("src", "-n 1 --port 0")
    local port = math.tointeger(tonumber(helpers.read_file(clusters.conn_file("src")):match('"port":(%d+)')))
    local flood = strangers("127.0.0.2", port, 100)
    local few = strangers("127.0.0.3", port, 5)
    local ok, err = pcall(function()
      -- The real client, over TCP too, is served after the controller took every connection before it.
      local rc <close> = lpar.Client { connection_file = tcp_only("src") }
      assert.equal(0, rc[0]:apply_sync(function() return lpar.engine.id end))
      assert.is_true(helpers.wait_until(function() return still_open(flood) <= 16 end, 5),
        still_open(flood) .. " of one address's 100 idle connections still open")
      assert.equal(16, still_open(flood)) -- its own oldest made room: the newest stay
      assert.equal(5, still_open(few))
      assert.is_true(rc:queue_status().refused >= 84)
    end)
    close_all(flood)
    close_all(few)
    assert(ok, err)
  end)

  local function cpu_ticks(pid)
    local stat = helpers.read_file("/proc/" .. pid .. "/stat")
    local utime, stime = stat:match("^%d+ %b() %a" .. string.rep(" %S+", 10) .. " (%d+) (%d+)")
    return tonumber(utime) + tonumber(stime)
  end

  it("tells a client when the controller is out of file descriptors, without spinning", function()
    clusters.start("fds", "-n 1")
    local pid = clusters.controller_pid("fds")
    -- Room for a few more descriptors than it holds now: new ones take the
    -- lowest free numbers, and the limit bounds those.
    local held = 0
    for _ in uv.fs_scandir_next, uv.fs_scandir("/proc/" .. pid .. "/fd") do held = held + 1 end
    local _, code = helpers.run(string.format("prlimit --pid %d --nofile=%d:%d", pid, held + 6, held + 6))
    assert.equal(0, code)
    local clients, refusal = {}, nil
    for _ = 1, 40 do
      local ok, rc = pcall(lpar.Client, { profile = "fds" })
      if not ok then refusal = rc break end
      clients[#clients + 1] = rc
    end
    local ok, err = pcall(function()
      assert.is_truthy(refusal, "40 clients got in")
      assert.is_true(#clients >= 1)
      assert.matches("the controller refused the connection: it is out of file descriptors %(Too many open " ..
        "files; pid " .. pid .. "%): raise its limit %(ulimit %-n%)", refusal)
      local before = cpu_ticks(pid)
      uv.sleep(500)
      assert.is_true(cpu_ticks(pid) - before < 10, "the controller spins: " .. (cpu_ticks(pid) - before) ..
        " ticks in 0.5 s")
      -- Those in are served, and see it counted; once one leaves, the next gets in.
      assert.equal(0, clients[1][0]:apply_sync(function() return lpar.engine.id end))
      assert.is_true(clients[1]:queue_status().no_fds >= 1)
      clients[1]:close()
      table.remove(clients, 1)
      local rc <close> = lpar.Client { profile = "fds" }
      assert.equal(0, rc[0]:apply_sync(function() return lpar.engine.id end))
    end)
    for _, c in ipairs(clients) do c:close() end
    assert(ok, err)
  end)

  it("says a controller that takes no connection took none, not that it did not answer", function()
    clusters.start("stopped", "-n 1")
    local pid = clusters.controller_pid("stopped")
    uv.kill(pid, "sigstop")
    local ok, err = pcall(lpar.Client, { profile = "stopped" })
    uv.kill(pid, "sigcont")
    assert.is_false(ok)
    assert.matches("the controller did not take the connection within 10 s %(its hello never came", err)
    local rc <close> = lpar.Client { profile = "stopped" }
    assert.equal(0, rc[0]:apply_sync(function() return lpar.engine.id end))
  end)

  it("says so when this process's own descriptor table is full", function()
    clusters.start("own", "-n 1")
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    f:write([[
      local lpar = require "lpar"
      local keep = {}
      while true do
        local h = io.open("/dev/null")
        if not h then break end
        keep[#keep + 1] = h
      end
      local ok, err = pcall(lpar.Client, { profile = "own" })
      print(ok, err)
    ]])
    f:close()
    local out, code = clusters.sh(string.format("ulimit -n 64; %s %s 2>&1", helpers.lpar, script))
    os.remove(script)
    assert.equal(0, code, out)
    assert.matches("^false\tcannot connect to the cluster in %S+: this process has too many open files %(EMFILE%): " ..
      "close some files or raise the limit %(ulimit %-n%)", out)
  end)
end)
