--- The standalone controller: engines, and the clients that connect to them.
-- It owns local engines (children, relayed as bytes without decoding) and
-- engines that join over the socket (`lpar engine --profile P`), listens on
-- an authenticated unix socket (and TCP when asked), and routes:
--   client request (route = engine, id = the client's) -> engine, under an
--   id of the controller's own, so several clients never collide;
--   engine reply -> the client that asked, under its id again.
-- A client that goes away loses nothing on the cluster: its running tasks
-- finish (their replies are dropped) and the engines keep their globals.
local core = require "lpar.core"
-- Loading lpar.matrix settles OpenBLAS's kernel (OPENBLAS_CORETYPE, see
-- matrix.blas_info) before any engine is spawned, so the engines inherit it.
require "lpar.matrix"

local Controller = {}
Controller.__index = Controller

local REQUESTS = { [core.EXECUTE] = true, [core.APPLY] = true, [core.PUSH] = true, [core.PULL] = true }
local ENGINE_REPLIES = { [6] = true, [7] = true, [8] = true, [9] = true, [10] = true } -- RESULT..DISPLAY
local FINAL = { [core.RESULT] = true, [core.ERROR] = true }

--- opts: n, socket (path), ip, port, key (32 bytes), engine, engine_env
-- (list of "NAME=value"), blas_threads, on_stop (called once stopped).
function Controller.new(opts)
  local self = setmetatable({
    opts = opts,
    key = opts.key,
    engines = {},   -- id -> { state, pid, hello, kind = "local"|"joined", peer, how, status, signal }
    tasks = {},     -- our id -> { peer, cid, engine }
    next_gid = 0,
    peers = {},     -- link -> { link, kind = "client"|"engine", tasks = {cid -> gid} }
    restarts = {},  -- pending "restart" answers: { peer, id, ids }
    started = core.now(),
    bad_messages = 0,
    activity = 0,   -- messages handled: the main loop polls while this moves
  }, Controller)
  local weak = setmetatable({ self }, { __mode = "v" })
  local cluster, err = core.new_cluster {
    raw = true, engine = opts.engine, env = opts.engine_env, blas_threads = opts.blas_threads,
    handler = function(kind, ...)
      local c = weak[1]
      if c then c["engine_" .. kind](c, ...) end
    end,
  }
  if not cluster then error(err, 0) end
  self.cluster = cluster
  local function on_accept(link)
    local c = weak[1]
    if c then c:accept(link) end
  end
  local server, lerr = core.listen { path = opts.socket, key = opts.key, handler = on_accept }
  if not server then error(lerr, 0) end
  self.servers = { server }
  if opts.ip or opts.port then
    local tcp, terr = core.listen { ip = opts.ip or "127.0.0.1", port = opts.port or 0, key = opts.key,
                                    handler = on_accept }
    if not tcp then
      server:close()
      error(terr, 0)
    end
    self.servers[2] = tcp
    self.port = tcp:port()
  end
  for id = 0, opts.n - 1 do self:spawn(id) end
  return self
end

function Controller:spawn(id)
  local pid, err = self.cluster:spawn(id, self:size())
  if not pid then error(string.format("cannot start engine %d: %s", id, err), 0) end
  self.engines[id] = { state = "starting", pid = pid, kind = "local" }
end

--- The number of engines (the highest id + 1), as engines see it in lpar.engine.n.
function Controller:size()
  local n = self.opts.n
  for id in pairs(self.engines) do if id + 1 > n then n = id + 1 end end
  return n
end

-- Sending to clients.

function Controller:each_client(fn)
  for link, peer in pairs(self.peers) do
    if peer.kind == "client" and link:is_open() then fn(link, peer) end
  end
end

local function exit_payload(e)
  return string.format("%d %d", e.status or -1, e.signal or 0)
end

local function answer(link, id, ...)
  if link:is_open() then link:send(core.CONTROL, 0, id, "answer", ...) end
end

-- Engine events, local ones from the cluster and joined ones from their links.

function Controller:engine_ready(id, hello)
  local e = self.engines[id]
  if not e then return end
  e.state, e.hello = "ready", hello
  e.pid = tonumber(hello:match("pid=(%d+)")) or e.pid
  self:each_client(function(link) link:send_bytes(core.HELLO, core.FLAG_RAW, id, 0, hello) end)
  self:check_restarts()
end

function Controller:engine_frame(id, mtype, flags, gid, payload)
  self.activity = self.activity + 1
  local task = self.tasks[gid]
  if not ENGINE_REPLIES[mtype] or not task or task.engine ~= id then
    self.bad_messages = self.bad_messages + 1 -- a reply to nothing we sent
    return
  end
  if FINAL[mtype] then
    self.tasks[gid] = nil
    task.peer.tasks[task.cid] = nil
  end
  local link = task.peer.link
  if link:is_open() then link:send_bytes(mtype, flags, id, task.cid, payload) end
end

function Controller:engine_exit(id, status, signal)
  local e = self.engines[id]
  if not e or e.state == "dead" then return end
  e.state, e.status, e.signal = "dead", status, signal
  for gid, task in pairs(self.tasks) do
    if task.engine == id then
      self.tasks[gid] = nil
      task.peer.tasks[task.cid] = nil
    end
  end
  self:each_client(function(link) link:send_bytes(core.EXIT, core.FLAG_RAW, id, 0, exit_payload(e)) end)
  self:check_restarts()
end

function Controller:engine_bad(id, reason)
  self.bad_messages = self.bad_messages + 1
  local e = self.engines[id]
  if e then e.bad = reason end
end

-- Peers.

function Controller:accept(link)
  local peer = { link = link, kind = "client", tasks = {} }
  self.peers[link] = peer
  link:set_handler(function(kind, ...)
    if kind == "frame" then
      self:peer_frame(peer, ...)
    elseif kind == "closed" then
      self:peer_closed(peer, ...)
    end
  end)
end

function Controller:peer_closed(peer, reason, refused)
  self.peers[peer.link] = nil
  if refused then
    -- The log (controller.log for a daemon) says who was cut off and why.
    io.stderr:write(string.format("%s lpar controller: cut off a %s: %s\n", os.date("%Y-%m-%d %H:%M:%S"),
      peer.said_hello and peer.kind or "peer", reason))
    io.stderr:flush()
  end
  if peer.kind == "engine" and peer.engine then
    self:engine_exit(peer.engine, peer.exit_status or -1, peer.exit_signal or 0)
  end
end

function Controller:peer_frame(peer, mtype, flags, route, id, payload)
  self.activity = self.activity + 1
  peer.said_hello = true
  if peer.kind == "engine" then return self:joined_frame(peer, mtype, flags, id, payload) end
  if REQUESTS[mtype] then return self:request(peer, mtype, flags, route, id, payload) end
  if mtype == core.CONTROL then
    local call = table.pack(core.decode(payload, "data"))
    local op = call[1] and call[2]
    local fn = type(op) == "string" and Controller["op_" .. op]
    if not fn then return answer(peer.link, id, nil, "unknown controller operation " .. tostring(op)) end
    -- A bad argument (an unknown signal name, say) is the caller's error, not ours.
    local ok, err = pcall(fn, self, peer, id, table.unpack(call, 3, call.n))
    if not ok then answer(peer.link, id, nil, op .. ": " .. tostring(err)) end
  end
end

function Controller:request(peer, mtype, flags, engine, cid, payload)
  local e = self.engines[engine]
  if not e or e.state ~= "ready" then
    -- The client thought it was up: tell it how it ended.
    local gone = e or { status = -1, signal = 0 }
    peer.link:send_bytes(core.EXIT, core.FLAG_RAW, engine, 0, exit_payload(gone))
    return
  end
  self.next_gid = self.next_gid + 1
  local gid = self.next_gid
  self.tasks[gid] = { peer = peer, cid = cid, engine = engine }
  peer.tasks[cid] = gid
  local ok
  if e.kind == "local" then
    ok = self.cluster:send_bytes(engine, mtype, flags, gid, payload)
  else
    ok = e.peer.link:is_open() and e.peer.link:send_bytes(mtype, flags, 0, gid, payload)
  end
  if not ok then
    self.tasks[gid], peer.tasks[cid] = nil, nil
  end
end

-- Control operations: CONTROL frames carrying (name, args...), answered
-- with a CONTROL frame of the same id carrying (result...) or (nil, message).

--- A client says hello: it gets every engine's state, then the answer.
function Controller:op_connect(peer, id)
  local link = peer.link
  for eid, e in pairs(self.engines) do
    if e.state == "ready" then
      link:send_bytes(core.HELLO, core.FLAG_RAW, eid, 0, e.hello)
    elseif e.state == "dead" then
      link:send_bytes(core.EXIT, core.FLAG_RAW, eid, 0, exit_payload(e))
    end
  end
  answer(link, id, { profile = self.opts.profile, pid = self.opts.pid, started = self.started })
end

function Controller:status()
  local engines = {}
  for eid, e in pairs(self.engines) do
    engines[eid] = { queue = 0, state = e.state, pid = e.pid, kind = e.kind }
  end
  for _, task in pairs(self.tasks) do
    local s = engines[task.engine]
    if s then s.queue = s.queue + 1 end
  end
  local refused, disconnected, clients = 0, 0, 0
  for _, server in ipairs(self.servers) do
    local s = server:stats()
    refused, disconnected = refused + s.refused, disconnected + s.disconnected
  end
  self:each_client(function() clients = clients + 1 end)
  return {
    engines = engines, refused = refused, disconnected = disconnected, clients = clients,
    bad_messages = self.bad_messages, uptime = core.now() - self.started, pid = self.opts.pid,
    profile = self.opts.profile,
  }
end

function Controller:op_status(peer, id)
  answer(peer.link, id, self:status())
end

local function known_engine(self, peer, id, eid)
  local e = self.engines[eid]
  if not e then answer(peer.link, id, nil, string.format("engine %s does not exist", tostring(eid))) end
  return e
end

function Controller:op_signal(peer, id, eid, sig)
  local e = known_engine(self, peer, id, eid)
  if not e then return end
  local ok, err
  if e.state == "dead" then
    ok, err = nil, "is not running"
  elseif e.kind == "local" then
    ok, err = self.cluster:signal(eid, sig)
  else
    ok = e.peer.link:send(core.CONTROL, 0, 0, "signal", "signal", sig)
  end
  answer(peer.link, id, ok and true or nil, err and string.format("cannot signal engine %d: %s", eid, err))
end

--- Interrupt the client's request `cid`, if it is still the one running there.
function Controller:op_interrupt(peer, id, eid, cid)
  local gid = peer.tasks[cid]
  local e = self.engines[eid]
  if gid and e and e.state == "ready" then
    if e.kind == "local" then
      self.cluster:interrupt(eid, gid)
    else
      e.peer.link:send(core.CONTROL, 0, 0, "interrupt", "interrupt", gid)
    end
  end
  answer(peer.link, id, true)
end

--- Kill and start again the given local engines; answered once all are up.
function Controller:op_restart(peer, id, ids)
  if type(ids) ~= "table" then return answer(peer.link, id, nil, "restart: expected a list of engine ids") end
  for _, eid in ipairs(ids) do
    local e = self.engines[eid]
    if not e then return answer(peer.link, id, nil, string.format("engine %s does not exist", tostring(eid))) end
    if e.kind ~= "local" then
      return answer(peer.link, id, nil, string.format("engine %d joined from elsewhere; restart it there", eid))
    end
  end
  local pending = { peer = peer, id = id, ids = ids, waiting = {} }
  self.restarts[#self.restarts + 1] = pending
  for _, eid in ipairs(ids) do
    pending.waiting[eid] = "kill" -- check_restarts starts it again once it is dead
    if self.engines[eid].state ~= "dead" then self.cluster:signal(eid, "KILL") end
  end
  self:check_restarts()
end

function Controller:check_restarts()
  for i = #self.restarts, 1, -1 do
    local r = self.restarts[i]
    r.failed = r.failed or {}
    for eid, stage in pairs(r.waiting) do
      local e = self.engines[eid]
      if stage == "kill" and e.state == "dead" then
        local ok, err = pcall(self.spawn, self, eid)
        if ok then r.waiting[eid] = "start" else r.failed[#r.failed + 1], r.waiting[eid] = err, nil end
      elseif stage == "start" and e.state == "ready" then
        r.waiting[eid] = nil
      elseif stage == "start" and e.state == "dead" then
        r.failed[#r.failed + 1] = string.format("engine %d did not come back (exit status %s, signal %s)",
          eid, tostring(e.status), tostring(e.signal))
        r.waiting[eid] = nil
      end
    end
    if next(r.waiting) == nil then
      table.remove(self.restarts, i)
      if #r.failed > 0 then answer(r.peer.link, r.id, nil, table.concat(r.failed, "; "))
      else answer(r.peer.link, r.id, true) end
    end
  end
end

function Controller:op_shutdown(peer, id)
  answer(peer.link, id, true)
  self:stop("shut down by a client")
end

--- An engine joins from elsewhere: it gets the next id.
function Controller:op_join(peer, id)
  local eid = self:size()
  peer.kind, peer.engine = "engine", eid
  self.engines[eid] = { state = "starting", kind = "joined", peer = peer }
  answer(peer.link, id, { id = eid, n = eid + 1 })
end

-- Frames from a joined engine's relay: its replies, its hello, its end.
function Controller:joined_frame(peer, mtype, flags, gid, payload)
  local eid = peer.engine
  if mtype == core.HELLO then
    self:engine_ready(eid, payload)
  elseif mtype == core.EXIT then
    local status, signal = payload:match("^(%-?%d+) (%d+)")
    peer.exit_status, peer.exit_signal = tonumber(status), tonumber(signal)
    self:engine_exit(eid, peer.exit_status or -1, peer.exit_signal or 0)
  elseif ENGINE_REPLIES[mtype] then
    self:engine_frame(eid, mtype, flags, gid, payload)
  end
end

--- Stop the engines, close every connection, and call opts.on_stop(why).
function Controller:stop(why)
  if self.stopped then return end
  self.stopped = true
  for _, server in ipairs(self.servers) do server:close() end
  for link in pairs(self.peers) do link:close() end
  self.cluster:stop()
  if self.opts.on_stop then self.opts.on_stop(why) end
end

return Controller
