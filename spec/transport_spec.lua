--- The data plane through a standalone controller: matrices as shared
-- memory over its unix socket, everything sealed over TCP, a stranger's
-- ciphertext refused, and a controller that dies mid-push.
-- Every cluster here lives in a temporary LPAR_DIR and is stopped at the end.
local uv = require "luv"
local core = require "lpar.core"
local lpar = require "lpar"
local matrix = require "lpar.matrix"
local helpers = require "helpers"

local clusters = helpers.scratch_clusters()
local base, sh, conn_file, key_of = clusters.base, clusters.sh, clusters.conn_file, clusters.key
local read_file = helpers.read_file

--- Start profile `name`: its controller's pid and its connection file's text.
local function start(name, extra)
  clusters.start(name, extra)
  return clusters.controller_pid(name), read_file(conn_file(name))
end

--- A connection file for profile `name` that reaches it over TCP only, at `port`.
local function tcp_only(name, port)
  local text = read_file(conn_file(name))
  text = text:gsub('  "socket":"[^"]*",\n', "")
  if port then text = text:gsub("\"port\":%d+", "\"port\":" .. port) end
  local path = base .. "/" .. name .. "-tcp.lua"
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  uv.fs_chmod(path, tonumber("600", 8))
  return path
end

local function rss_mb(pid)
  local kb = tonumber((read_file("/proc/" .. pid .. "/status") or ""):match("VmRSS:%s*(%d+)"))
  return (kb or 0) / 1024
end

setup(clusters.setup)
teardown(clusters.teardown)

describe("through the controller's unix socket", function()
  it("a 64 MiB matrix goes as shared memory: the controller's memory stays small", function()
    local pid = start("shm", "-n 1")
    local rc <close> = lpar.Client { profile = "shm" }
    local a = matrix.random(8 * 1024 * 1024, 1, 7)
    for _ = 1, 3 do rc[0]:push({ a = a }, { block = true }) end
    assert.equal(a:sum(), rc[0]:apply_sync(function() return a:sum() end)) -- luacheck: ignore a
    local back = rc[0]:pull("a", { block = true })
    assert.equal(0, back:max_abs_diff(a))
    assert.is_true(rss_mb(pid) < 20, string.format("controller RSS %.1f MB", rss_mb(pid)))
  end)
end)

describe("over TCP", function()
  --- A proxy on 127.0.0.1 between a client and the controller's port,
  -- recording every byte both ways.
  local function recording_proxy(upstream_port)
    local seen, pipes = {}, {}
    local server = uv.new_tcp()
    assert(server:bind("127.0.0.1", 0))
    server:listen(16, function()
      local down, up = uv.new_tcp(), uv.new_tcp()
      server:accept(down)
      pipes[#pipes + 1], pipes[#pipes + 2] = down, up
      up:connect("127.0.0.1", upstream_port, function(err)
        assert(not err, err)
        local function relay(from, to)
          from:read_start(function(rerr, chunk)
            if chunk then
              seen[#seen + 1] = chunk
              to:write(chunk)
            elseif not rerr then
              to:shutdown()
            end
          end)
        end
        relay(down, up)
        relay(up, down)
      end)
    end)
    local proxy = { port = server:getsockname().port }
    function proxy.bytes() return table.concat(seen) end
    function proxy.close()
      for _, p in ipairs(pipes) do if not p:is_closing() then p:close() end end
      server:close()
      uv.run("nowait")
    end
    return proxy
  end

  it("everything is sealed: bytes on the wire hold none of what was pushed", function()
    local _, text = start("sealed", "-n 1 --port 0")
    local proxy = recording_proxy(math.tointeger(tonumber(text:match("\"port\":(%d+)"))))
    local rc = lpar.Client { connection_file = tcp_only("sealed", proxy.port) }
    local marker = "MARKER-" .. string.rep("lpar", 8)
    rc[0]:push({ secret = marker, m = matrix.from { { 1.25, 2.5 } } }, { block = true })
    assert.equal(marker .. "!", rc[0]:apply_sync(function() return secret .. "!" end)) -- luacheck: ignore secret
    assert.equal(3.75, rc[0]:apply_sync(function() return m:sum() end)) -- luacheck: ignore m
    rc:close()
    local wire = proxy.bytes()
    proxy.close()
    assert.is_true(#wire > 200, "the proxy saw the traffic")
    assert.is_truthy(wire:find("LPAR", 1, true)) -- frame headers travel in the clear, authenticated
    assert.is_nil(wire:find("MARKER-", 1, true))
    assert.is_nil(wire:find("secret", 1, true))
    assert.is_nil(wire:find("lpar-engine", 1, true)) -- the engines' hellos, sealed too
  end)

  it("a raw peer's forged, altered and replayed ciphertext is refused and counted, and nothing runs", function()
    local _, text = start("raw", "-n 1 --port 0")
    local port = math.tointeger(tonumber(text:match("\"port\":(%d+)")))
    local witness = os.tmpname()
    os.remove(witness)
    local payload = core.encode(string.format("local f = io.open(%q, 'a') f:write('ran\\n') f:close()", witness))
    local rc <close> = lpar.Client { connection_file = tcp_only("raw") }
    local before = rc:queue_status()
    local function peer(key, wait_for_session)
      local closed = false
      local link = assert(core.connect { host = "127.0.0.1", port = port, key = key, handler = function(kind)
        if kind == "closed" then closed = true end
      end })
      if wait_for_session then assert.is_true(helpers.wait_until(function() return link:stats().session end, 5)) end
      return link, function() return helpers.wait_until(function() return closed end, 5) end
    end
    -- Sealed with another key.
    local link, cut = peer(core.keygen())
    link:send_bytes(0, core.EXECUTE, 0, 1, payload)
    assert.is_true(cut())
    -- A valid frame with one byte of its ciphertext flipped.
    link, cut = peer(key_of("raw"), true)
    local frame = link:seal(0, core.EXECUTE, 0, 1, payload)
    local at = 24 + 5
    link:send_raw(0, frame:sub(1, at - 1) .. string.char(frame:byte(at) ~ 0x20) .. frame:sub(at + 1))
    assert.is_true(cut())
    -- A valid frame, then its replay: the first runs, the replay cuts the peer off.
    link, cut = peer(key_of("raw"), true)
    frame = link:seal(0, core.EXECUTE, 0, 1, payload)
    link:send_raw(0, frame)
    assert.is_true(helpers.poll(function() return read_file(witness) == "ran\n" end, 5))
    link:send_raw(0, frame)
    assert.is_true(cut())
    assert.equal(0, rc[0]:apply_sync(function() return 0 end))
    assert.equal("ran\n", read_file(witness))
    os.remove(witness)
    local after = rc:queue_status()
    assert.equal(before.refused + 3, after.refused)
    assert.equal(before.disconnected + 3, after.disconnected)
  end)

  it("a controller killed mid-push gives the client a clear error and leaves no engine", function()
    local pid = start("doomed", "-n 1 --port 0")
    local rc = lpar.Client { connection_file = tcp_only("doomed") }
    local engine = rc:queue_status()[0].pid
    local a = matrix.random(16 * 1024 * 1024, 1, 3) -- 128 MiB: a push that takes a while over TCP
    local ar = rc[0]:push({ a = a })
    uv.kill(pid, "sigkill")
    local ok, err = pcall(ar.get, ar, 10)
    assert.is_false(ok)
    assert.matches("engine 0 is unreachable: the connection to its controller was lost", tostring(err))
    assert.is_true(helpers.poll(function() return not helpers.alive(engine) end, 5), "engine still alive")
    rc:close()
    sh(helpers.lpar .. " cluster clean")
  end)
end)
