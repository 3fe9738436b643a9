--- Standalone clusters: `lpar cluster`, profiles and connection files,
-- the authenticated socket, several clients, engines that join.
-- Every cluster here lives in a temporary LPAR_DIR and is stopped at the end.
local uv = require "luv"
local core = require "lpar.core"
local lpar = require "lpar"
local helpers = require "helpers"

local clusters = helpers.scratch_clusters()
local base, sh, start, conn_file, controller_pid = clusters.base, clusters.sh, clusters.start,
  clusters.conn_file, clusters.controller_pid
local read_file = helpers.read_file

local function mode(path)
  return string.format("%o", uv.fs_stat(path).mode % 512)
end

setup(function()
  clusters.setup()
  start("main", "-n 2")
end)

teardown(clusters.teardown)

describe("lpar cluster start", function()
  it("keeps the key in a 0600 file inside a 0700 directory, next to a 0600 socket", function()
    assert.equal("700", mode(base))
    assert.equal("700", mode(base .. "/profile_main"))
    assert.equal("600", mode(conn_file("main")))
    assert.equal("600", mode(base .. "/profile_main/controller.sock"))
    assert.matches('"key":"%x+"', read_file(conn_file("main")))
    assert.equal(64, #read_file(conn_file("main")):match('"key":"(%x+)"'))
  end)

  it("refuses to start a second cluster under a running profile", function()
    local out, code = sh(helpers.lpar .. " cluster start --daemonize --profile main 2>&1")
    assert.equal(1, code)
    assert.matches('cluster "main" is already running %(controller pid %d+%)', out)
  end)

  it("lists the running clusters with their engines and refused messages", function()
    local out, code = sh(helpers.lpar .. " cluster list")
    assert.equal(0, code)
    assert.matches("PROFILE%s+PID%s+ENGINES%s+ADDRESS%s+UPTIME%s+REFUSED", out)
    assert.matches("main%s+" .. controller_pid("main") .. "%s+2/2%s+%S+controller.sock", out)
  end)

  it("names engines that did not come up", function()
    local out, code = sh("LPAR_ENGINE=/bin/false " .. helpers.lpar ..
      " cluster start -n 1 --daemonize --profile broken 2>&1")
    assert.equal(1, code)
    assert.matches("the cluster did not come up: engine 0 exited %(status 1", out)
    assert.is_nil(read_file(conn_file("broken")))
  end)
end)

describe("connecting", function()
  it("works by profile and by connection file", function()
    local rc <close> = lpar.Client { profile = "main" }
    assert.same({ 0, 1 }, rc.ids)
    local rc2 <close> = lpar.Client { connection_file = conn_file("main") }
    assert.same({ 0, 1 }, rc2:view():apply_sync(function() return lpar.engine.id end))
  end)

  it("says which file is missing and how to start the cluster", function()
    local ok, err = pcall(lpar.Client, { profile = "nope" })
    assert.is_false(ok)
    assert.matches('no cluster with profile "nope": ' .. base:gsub("%p", "%%%0") ..
      "/profile_nope/connection.json does not exist", err)
    assert.matches("lpar cluster start %-%-profile nope", err)
    err = select(2, pcall(lpar.Client, { connection_file = "/nonexistent/connection.json" }))
    assert.matches("connection file /nonexistent/connection.json does not exist", err)
  end)

  it("calls a file of a dead cluster stale and points to lpar cluster clean", function()
    local dir = base .. "/profile_stale"
    os.execute("mkdir -p -m 700 '" .. dir .. "'")
    local text = read_file(conn_file("main")):gsub("\"pid\":%d+", "\"pid\":999999")
      :gsub("profile_main", "profile_stale")
    local f = assert(io.open(dir .. "/connection.json", "w"))
    f:write(text)
    f:close()
    uv.fs_chmod(dir .. "/connection.json", tonumber("600", 8))
    local ok, err = pcall(lpar.Client, { profile = "stale" })
    assert.is_false(ok)
    assert.matches("not running %(its controller, pid 999999, is gone%), so .* is stale", err)
    assert.matches("lpar cluster clean", err)
    local out = sh(helpers.lpar .. " cluster clean")
    assert.matches("removed " .. dir:gsub("%p", "%%%0") .. "/connection.json", out)
    assert.is_nil(read_file(dir .. "/connection.json"))
    assert.is_not_nil(read_file(conn_file("main"))) -- the live one stays
  end)

  it("refuses a connection file that others can read, or that is not one", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write(read_file(conn_file("main")))
    f:close()
    uv.fs_chmod(path, tonumber("644", 8))
    local ok, err = pcall(lpar.Client, { connection_file = path })
    assert.is_false(ok)
    assert.matches("can be read by other users %(mode 644%)", err)
    f = assert(io.open(path, "w"))
    f:write("os.exit(3)")
    f:close()
    uv.fs_chmod(path, tonumber("600", 8))
    err = select(2, pcall(lpar.Client, { connection_file = path }))
    assert.matches("is not an lpar connection file", err)
    os.remove(path)
  end)
end)

describe("the prompt", function()
  it("connects to a standalone cluster with --profile", function()
    local out, code = sh("printf 'print(#rc)\\n%%px x_from_prompt = lpar.engine.id\\n' | " .. helpers.lpar ..
      " --profile main 2>&1")
    assert.equal(0, code, out)
    assert.matches('2 engines of cluster "main"', out)
    assert.matches("\n2\n", out)
    local rc <close> = lpar.Client { profile = "main" }
    assert.same({ 0, 1 }, rc:view():pull("x_from_prompt", { block = true }))
    out, code = sh(helpers.lpar .. " --profile nope 2>&1")
    assert.equal(1, code)
    assert.matches('^lpar: no cluster with profile "nope"', out)
  end)
end)

describe("several clients", function()
  it("each get their own results, and share the engines' globals", function()
    local a <close> = lpar.Client { profile = "main" }
    local b <close> = lpar.Client { profile = "main" }
    local ra = a[0]:apply(function(x) return x + 1 end, 10)
    local rb = b[0]:apply(function(x) return x * 2 end, 10)
    assert.equal(42, b[1]:apply(function(x) return x end, 42):get(5))
    assert.equal(11, ra:get(5))
    assert.equal(20, rb:get(5))
    a:view():execute("shared = 'from a'", { block = true })
    assert.same({ "from a", "from a" }, b:view():pull("shared", { block = true }))
    assert.is_true(a:queue_status().clients >= 2)
  end)

  it("lose nothing when one is SIGKILLed: its task finishes, the next client sees its globals", function()
    local marker = os.tmpname()
    os.remove(marker)
    local script = string.format([[
      local lpar = require "lpar"
      local rc = lpar.Client { profile = "main" }
      rc:view():execute("set_by_killed = 42", { block = true })
      rc[1]:execute("local t = os.clock() while os.clock() - t < 0.3 do end finished_after_kill = true")
      io.open(%q, "w"):close()
      while true do require("luv").sleep(100) end
    ]], marker)
    local handle, pid = uv.spawn(helpers.lpar, { args = { "-e", script } }, function() end)
    assert.is_truthy(handle)
    assert.is_true(helpers.poll(function() return read_file(marker) ~= nil end, 10))
    uv.kill(pid, "sigkill")
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 5))
    helpers.close(handle)
    os.remove(marker)
    local rc <close> = lpar.Client { profile = "main" }
    assert.same({ 42, 42 }, rc:view():pull("set_by_killed", { block = true }))
    assert.is_true(helpers.wait_until(function()
      local ok, v = pcall(rc[1].pull, rc[1], "finished_after_kill", { block = true })
      return ok and v == true
    end, 5))
    assert.same({ 0, 1 }, rc.ids)
  end)

  it("see a client's close detach it only", function()
    local a = lpar.Client { profile = "main" }
    a:close()
    local ok, err = pcall(function() return a[0]:apply_sync(function() return 1 end) end)
    assert.is_false(ok)
    assert.matches("this client was closed %(the cluster goes on%)", tostring(err))
    local b <close> = lpar.Client { profile = "main" }
    assert.equal(1, b[0]:apply_sync(function() return 1 end))
  end)
end)

describe("the authenticated socket", function()
  local socket = base .. "/profile_main/controller.sock"
  local witness = os.tmpname()
  os.remove(witness)
  -- Code whose only effect is to append a line to the witness file.
  local code = string.format("local f = io.open(%q, 'a') f:write('ran\\n') f:close()", witness)
  local payload = core.encode(code)
  local function key() return clusters.key("main") end

  local log_path = base .. "/profile_main/controller.log"
  local logged = 0
  --- Where the controller's log stands, before a peer sends.
  local function mark() logged = #(read_file(log_path) or "") end
  --- A peer speaking to the controller; its events are recorded. With the
  -- cluster's key, it waits until both hellos are in, so it can seal frames
  -- itself. (With another key it must send at once: what it sends before
  -- the hellos are in goes out first, before it reads, and refuses, the
  -- controller's frames.)
  local function peer(with_key, wait_for_session)
    local events = {}
    mark() -- before it can be refused
    local link = assert(core.connect { path = socket, key = with_key, handler = function(kind, ...)
      events[#events + 1] = { kind, ... }
    end })
    if wait_for_session then
      assert.is_true(helpers.wait_until(function() return link:stats().session end, 5))
    end
    return link, events
  end

  --- The peer is cut off; the controller's log says why.
  local function refused_after(link, events)
    assert.is_true(helpers.wait_until(function() return not link:is_open() end, 5))
    assert.equal("closed", events[#events][1])
    assert.is_true(helpers.poll(function() return #(read_file(log_path) or "") > logged end, 5),
      "the controller logged no refusal; the peer closed with: " .. tostring(events[#events][2]))
    return read_file(log_path):sub(logged + 1)
  end

  local function lines()
    local text = read_file(witness) or ""
    return select(2, text:gsub("\n", ""))
  end

  it("drops, counts and cuts off forged, altered and replayed messages, and runs none", function()
    local rc <close> = lpar.Client { profile = "main" }
    local before = rc:queue_status()

    -- Unsealed: a well-formed frame in the clear, with a zero tag.
    local link, events = peer(key(), true)
    local unsealed = string.pack("<I4BBI2I8I8", 0x5241504c, core.EXECUTE, 0, 0, 1, #payload) .. payload
      .. string.rep("\0", 16)
    link:send_raw(0, unsealed)
    assert.matches("does not open", refused_after(link, events))

    -- Sealed with another key.
    link, events = peer(core.keygen())
    link:send_bytes(0, core.EXECUTE, 0, 1, payload)
    assert.matches("does not open", refused_after(link, events))

    -- A valid message altered by one byte (in the code it carries).
    link, events = peer(key(), true)
    local frame = link:seal(0, core.EXECUTE, 0, 1, payload)
    assert.is_nil(frame:find(code, 1, true)) -- nothing of it in the clear
    local at = 24 + #payload - 3
    local altered = frame:sub(1, at - 1) .. string.char(frame:byte(at) ~ 1) .. frame:sub(at + 1)
    link:send_raw(0, altered)
    assert.matches("does not open", refused_after(link, events))

    -- Nothing of the above ran.
    assert.equal(0, rc[0]:apply_sync(function() return 0 end))
    assert.equal(0, lines())

    -- A valid message runs once; its replay on the same connection does not.
    link, events = peer(key(), true)
    frame = link:seal(0, core.EXECUTE, 0, 1, payload)
    link:send_raw(0, frame)
    assert.is_true(helpers.poll(function() return lines() == 1 end, 5))
    mark()
    link:send_raw(0, frame)
    assert.matches("replayed", refused_after(link, events))

    -- Nor on another connection: the session differs.
    link, events = peer(key(), true)
    link:send_raw(0, frame)
    assert.matches("does not open", refused_after(link, events))

    assert.equal(0, rc[0]:apply_sync(function() return 0 end))
    assert.equal(1, lines())
    os.remove(witness)

    local after = rc:queue_status()
    assert.equal(before.refused + 5, after.refused)
    assert.equal(before.disconnected + 5, after.disconnected)
    assert.matches("main%s+%d+%s+2/2%s+%S+%s+%S+%s+" .. after.refused .. " %(5 cut off%)",
      (sh(helpers.lpar .. " cluster list")))
    -- The real client was served throughout.
    assert.same({ 0, 1 }, rc:view():apply_sync(function() return lpar.engine.id end))
  end)

  it("drops a stranger's oversized frame before reading it", function()
    local link, events = peer(core.keygen())
    link:send_bytes(0, core.EXECUTE, 0, 1, string.rep("x", 100000))
    assert.matches("too large before authentication", refused_after(link, events))
  end)

  it("lets a real client in past 100 idle strangers: the oldest make room", function()
    local before = (function()
      local rc <close> = lpar.Client { profile = "main" }
      return rc:queue_status().refused
    end)()
    local strangers, connected = {}, 0
    for i = 1, 100 do
      strangers[i] = uv.new_pipe()
      strangers[i]:connect(base .. "/profile_main/controller.sock", function() connected = connected + 1 end)
    end
    local ok, err = pcall(function()
      assert.is_true(helpers.wait_until(function() return connected == 100 end, 5))
      local rc <close> = lpar.Client { profile = "main" }
      assert.equal(1, rc[1]:apply_sync(function() return lpar.engine.id end))
      assert.is_true(rc:queue_status().refused >= before + 36) -- 100 over the cap of 64
    end)
    for _, p in ipairs(strangers) do p:close() end
    uv.run("nowait")
    assert(ok, err)
  end)
end)

describe("cluster controls on a standalone cluster", function()
  it("shows a stopped engine as not responding, in queue_status and lpar cluster list", function()
    local rc <close> = lpar.Client { profile = "main" }
    local pid = rc:queue_status()[1].pid
    uv.kill(pid, "sigstop")
    local ok, err = pcall(function()
      assert.is_true(helpers.poll(function() return rc:queue_status()[1].state == "not responding" end, 5))
      assert.equal("ready", rc:queue_status()[0].state)
      assert.matches("1/2 %(1 not responding%)", (sh(helpers.lpar .. " cluster list")))
    end)
    uv.kill(pid, "sigcont")
    assert(ok, err)
    assert.is_true(helpers.poll(function() return rc:queue_status()[1].state == "ready" end, 5))
  end)

  it("queue_status counts every client's tasks; abort, interrupt and engine death work", function()
    local rc <close> = lpar.Client { profile = "main" }
    local started = os.tmpname()
    os.remove(started)
    local busy = rc[0]:apply(function(path)
      io.open(path, "w"):close()
      local t = os.clock() while os.clock() - t < 2 do end return "done"
    end, started)
    local st = rc:queue_status()
    assert.equal(1, st[0].queue)
    assert.equal("ready", st[0].state)
    -- Interrupt it once it runs (a SIGINT before that finds nothing to stop).
    assert.is_true(helpers.poll(function() return read_file(started) ~= nil end, 5))
    os.remove(started)
    rc:interrupt(0)
    local ok, err = pcall(busy.get, busy, 5)
    assert.is_false(ok)
    assert.matches("interrupted", tostring(err))

    local lb = rc:load_balanced_view()
    local blockers = {}
    for i = 0, 1 do
      blockers[#blockers + 1] = rc[i]:apply(function() local t = os.clock() while os.clock() - t < 0.3 do end end)
    end
    local queued = lb:map(function(x) return x end, { 1, 2, 3, 4, 5, 6 }, { chunksize = 1 })
    assert.is_true(rc:abort(queued) > 0)
    rc:wait(blockers, 5)

    local cluster = lpar.Cluster { profile = "main" }
    ok, err = pcall(cluster.signal_engines, cluster, "NOSUCH", 0)
    assert.is_false(ok)
    assert.matches("unknown signal 'NOSUCH'", tostring(err))
    local doomed = rc[1]:apply(function() while true do end end)
    cluster:signal_engines("KILL", 1)
    ok, err = pcall(doomed.get, doomed, 5)
    assert.is_false(ok)
    assert.matches("engine 1 was killed by signal 9 %(SIGKILL%)", tostring(err))
    assert.same({ 0 }, rc.ids)
    cluster:restart_engines(1)
    -- rc hears of the engine on its own link: wait for it there, not on cluster's.
    assert.is_true(helpers.wait_until(function() return #rc == 2 end, 5))
    assert.same({ 0, 1 }, rc.ids)
    assert.equal(1, rc[1]:apply_sync(function() return lpar.engine.id end))
    rc:view():execute("before_restart = true", { block = true })
    cluster:restart_engines() -- all of them: this cluster has 2, not Cluster's default 4
    cluster:wait_for_engines(5)
    assert.is_true(helpers.wait_until(function() return #rc == 2 end, 5))
    assert.same({ 0, 1 }, rc.ids)
    assert.is_false(pcall(rc:view().pull, rc:view(), "before_restart", { block = true }))
    assert.equal(1, rc[1]:apply_sync(function() return lpar.engine.id end))
  end)

  it("passes matrices both ways, inline", function()
    local m = require "lpar.matrix"
    local rc <close> = lpar.Client { profile = "main" }
    local back = rc[0]:apply_sync(function(a) return a * 2 end, m.ones(300, 300))
    assert.equal(180000, back:sum())
  end)
end)

describe("engines that join", function()
  it("get the next id and serve requests", function()
    local out = base .. "/engine.out"
    local command = "exec " .. helpers.lpar .. " engine --profile main > '" .. out .. "' 2>&1"
    local handle, pid = uv.spawn("/bin/sh", { args = { "-c", command } }, function() end)
    assert.is_truthy(handle)
    local rc <close> = lpar.Client { profile = "main" }
    assert.is_true(helpers.wait_until(function() return #rc == 3 end, 10))
    assert.same({ 0, 1, 2 }, rc.ids)
    assert.equal("2 of 3", rc[2]:apply_sync(function() return lpar.engine.id .. " of " .. lpar.engine.n end))
    assert.matches("engine 2 joined the cluster", read_file(out))
    uv.kill(pid, "sigterm")
    assert.is_true(helpers.wait_until(function() return #rc == 2 end, 5)) -- its engine went with it
    helpers.close(handle)
  end)
end)

describe("TCP", function()
  it("is used only when asked, on 127.0.0.1, with the same authentication", function()
    start("tcp", "-n 1 --port 0")
    local text = read_file(conn_file("tcp"))
    assert.matches('"ip":"127.0.0.1"', text)
    local port = text:match("\"port\":(%d+)")
    assert.is_truthy(port)
    assert.is_nil(read_file(conn_file("main")):match("\"port\":"))
    -- Without the socket path, the client goes over TCP.
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write((text:gsub('  "socket":"[^"]*",\n', "")))
    f:close()
    uv.fs_chmod(path, tonumber("600", 8))
    local rc <close> = lpar.Client { connection_file = path }
    assert.equal(0, rc[0]:apply_sync(function() return lpar.engine.id end))
    os.remove(path)
  end)
end)

describe("stopping", function()
  it("rc:shutdown() stops the cluster on purpose", function()
    start("brief", "-n 1")
    local pid = controller_pid("brief")
    local rc = lpar.Client { profile = "brief" }
    local engine = rc:queue_status()[0].pid
    rc:shutdown()
    assert.is_true(helpers.poll(function() return not helpers.alive(pid) and not helpers.alive(engine) end, 5))
    assert.is_nil(read_file(conn_file("brief")))
    local ok, err = pcall(lpar.Client, { profile = "brief" })
    assert.is_false(ok)
    assert.matches('no cluster with profile "brief"', err)
  end)

  it("a client whose controller dies gets clear errors, and lives on", function()
    start("doomed", "-n 1")
    local rc <close> = lpar.Client { profile = "doomed" }
    local running = rc[0]:apply(function() local t = os.clock() while os.clock() - t < 2 do end end)
    local pid = controller_pid("doomed")
    uv.kill(pid, "sigkill")
    local ok, err = pcall(running.get, running, 5)
    assert.is_false(ok)
    assert.matches("engine 0 is unreachable: the connection to its controller was lost", tostring(err))
    ok, err = pcall(function() return rc[0]:apply_sync(function() return 1 end) end)
    assert.is_false(ok)
    assert.matches("unreachable", tostring(err))
    -- Its socket closes before the process is quite gone: list once it is.
    local gone = require("lpar.wait").until_done(function() return not require("lpar.profile").alive(pid) end, 5)
    assert.is_true(gone)
    local out = sh(helpers.lpar .. " cluster list")
    assert.matches("doomed%s+%d+%s+%-%s+stale", out)
    sh(helpers.lpar .. " cluster clean")
  end)

  it("lpar cluster stop --all leaves no process", function()
    start("other", "-n 2")
    local pids = {}
    for _, name in ipairs { "main", "other", "tcp" } do
      local rc <close> = lpar.Client { profile = name }
      pids[#pids + 1] = controller_pid(name)
      for id, s in pairs(rc:queue_status()) do
        if type(id) == "number" then pids[#pids + 1] = s.pid end
      end
    end
    local out, code = sh(helpers.lpar .. " cluster stop --all")
    assert.equal(0, code)
    assert.matches('stopped cluster "main"', out)
    assert.matches('stopped cluster "other"', out)
    -- Engines joined from elsewhere go when their relay sees the controller go: a moment later.
    for _, pid in ipairs(pids) do
      assert.is_true(helpers.poll(function() return not helpers.alive(pid) end, 5), "pid " .. pid .. " still alive")
    end
    assert.matches("no clusters", (sh(helpers.lpar .. " cluster list")))
  end)

  it("a standalone Cluster a script started and left is stopped when the script exits", function()
    local out, code = sh(helpers.lpar .. [[ -e '
      local lpar = require "lpar"
      local cluster = lpar.Cluster { n = 1, profile = "left" }
      cluster:start()
      local rc = lpar.Client { profile = "left" }
      print(rc[0]:apply_sync(function() return "up" end))' 2>&1]])
    assert.equal(0, code, out)
    assert.equal("up\n", out)
    assert.is_true(helpers.poll(function() return read_file(conn_file("left")) == nil end, 5))
    -- Shut down by a client first: the exit after that is quiet too.
    out, code = sh(helpers.lpar .. [[ -e '
      local lpar = require "lpar"
      lpar.Cluster { n = 1, profile = "left" }:start()
      lpar.Client { profile = "left" }:shutdown()
      print("done")' 2>&1]])
    assert.equal(0, code, out)
    assert.equal("done\n", out)
  end)

  it("a standalone Cluster started by a script stops at scope exit", function()
    local pid
    do
      local rc <close> = lpar.Cluster { n = 1, profile = "scoped" }:start_and_connect()
      assert.same({ 0 }, rc.ids)
      pid = controller_pid("scoped")
      assert.is_true(helpers.alive(pid))
      rc:shutdown() -- closing it afterwards, at scope exit, is no error
    end
    assert.is_true(helpers.poll(function() return not helpers.alive(pid) end, 5))
    assert.is_nil(read_file(conn_file("scoped")))
  end)
end)
