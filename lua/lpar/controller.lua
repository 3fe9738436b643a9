--- The standalone controller's control operations.
-- Its data plane is C (core.relay, core/relay.c): the relay owns the local
-- engines, listens on the authenticated unix socket (and TCP when asked),
-- moves every request, reply, output and descriptor between clients and
-- engines, tells clients of engines coming and going, and counts what it
-- refuses. What is left here is what needs policy, answered on CONTROL
-- frames carrying (name, args...) with (result...) or (nil, message):
--   connect   a client says hello: the cluster's description
--   status    engines, their queues, refusals, clients
--   restart   kill and start again local engines; answered once all are up
--   shutdown  stop the whole cluster
--   join      engines relayed from elsewhere (`lpar engine -n K`) take K ids
local core = require "lpar.core"
-- Loading lpar.matrix settles OpenBLAS's kernel (OPENBLAS_CORETYPE, see
-- matrix.blas_info) before any engine is spawned, so the engines inherit it.
require "lpar.matrix"


local Controller = {}
Controller.__index = Controller

--- opts: n, socket (path), ip, port, key (32 bytes), engine, engine_env
-- (list of "NAME=value"), blas_threads, profile, pid, on_stop (called once stopped),
-- launcher (other than "local": no engine is started here; they join).
function Controller.new(opts)
  local self = setmetatable({
    opts = opts,
    restarts = {},  -- pending "restart" answers: { peer, id, waiting = { engine -> stage }, failed }
    hosts = {},     -- engine id -> the host it joined from (local engines: this host)
    started = core.now(),
    hostname = require("luv").os_gethostname(),
  }, Controller)
  local weak = setmetatable({ self }, { __mode = "v" })
  local relay, err = core.relay {
    socket = opts.socket, ip = (opts.ip or opts.port) and (opts.ip or "127.0.0.1") or nil,
    port = opts.port or 0, key = opts.key, engine = opts.engine, env = opts.engine_env,
    blas_threads = opts.blas_threads,
    handler = function(kind, ...)
      local c = weak[1]
      if c then c["on_" .. kind](c, ...) end
    end,
  }
  if not relay then error(err, 0) end
  self.relay = relay
  local port = relay:stats().port
  self.port = port > 0 and port or nil
  -- Other launchers start the engines elsewhere, and they join.
  if (opts.launcher or "local") == "local" then
    for id = 0, opts.n - 1 do self:spawn(id) end
  end
  return self
end

function Controller:spawn(id)
  local ok, err = self.relay:spawn(id, self:size())
  if not ok then error(err, 0) end
end

--- The number of engines (the highest id + 1), as engines see it in lpar.engine.n.
function Controller:size()
  return math.max(self.opts.n, self.relay:stats().engines)
end

--- Engine `id`'s state: { state =, kind =, pid =, status =, signal =, queue = } or nil.
function Controller:engine(id)
  return self.relay:engine(id)
end

-- Events from the relay.

function Controller:on_ready()
  self:check_restarts()
end

function Controller:on_exit()
  self:check_restarts()
end

function Controller:on_peer_closed(_, reason, refused, engine)
  if refused then
    -- The log (controller.log for a daemon) says who was cut off and why.
    io.stderr:write(string.format("%s lpar controller: cut off a %s: %s\n", os.date("%Y-%m-%d %H:%M:%S"),
      engine and "joined engine" or "peer", reason))
    io.stderr:flush()
  end
end

function Controller:on_control(peer, id, op, ...)
  local fn = type(op) == "string" and Controller["op_" .. op]
  if not fn then return self.relay:answer(peer, id, nil, "unknown controller operation " .. tostring(op)) end
  -- A bad argument (an unknown signal name, say) is the caller's error, not ours.
  local ok, err = pcall(fn, self, peer, id, ...)
  if not ok then self.relay:answer(peer, id, nil, op .. ": " .. tostring(err)) end
end

-- Control operations.

function Controller:op_connect(peer, id)
  self.relay:answer(peer, id, { profile = self.opts.profile, pid = self.opts.pid, started = self.started })
end

function Controller:status()
  local engines, stats = {}, self.relay:stats()
  for eid = 0, stats.engines - 1 do
    local e = self.relay:engine(eid)
    if e then
      -- A ready engine silent for ten heartbeats is stopped or wedged.
      local state = e.state
      local beat = e.heartbeat_ms or 0
      -- Silent core.NOT_RESPONDING_BEATS of its heartbeat periods (one that sends none is never judged).
      if state == "ready" and beat > 0 and (e.silent_ms or 0) > core.NOT_RESPONDING_BEATS * beat then
        state = "not responding"
      end
      engines[eid] = { queue = e.queue, state = state, pid = e.pid, kind = e.kind, silent_ms = e.silent_ms,
                       host = self.hosts[eid] or self.hostname, link_sent = e.link_sent }
    end
  end
  return {
    engines = engines, refused = stats.refused, disconnected = stats.disconnected, clients = stats.clients,
    no_fds = stats.no_fds, waiting = stats.waiting,
    bad_messages = stats.bad_messages, uptime = core.now() - self.started, pid = self.opts.pid,
    profile = self.opts.profile,
  }
end

function Controller:op_status(peer, id)
  self.relay:answer(peer, id, self:status())
end

--- Kill and start again the given local engines; answered once all are up.
function Controller:op_restart(peer, id, ids)
  if type(ids) ~= "table" then return self.relay:answer(peer, id, nil, "restart: expected a list of engine ids") end
  for _, eid in ipairs(ids) do
    local e = math.type(eid) == "integer" and self.relay:engine(eid)
    if not e then
      return self.relay:answer(peer, id, nil, string.format("engine %s does not exist", tostring(eid)))
    end
    if e.kind ~= "local" then
      return self.relay:answer(peer, id, nil, string.format("engine %d joined from elsewhere; restart it there", eid))
    end
  end
  local pending = { peer = peer, id = id, waiting = {}, failed = {} }
  self.restarts[#self.restarts + 1] = pending
  for _, eid in ipairs(ids) do
    pending.waiting[eid] = "kill" -- check_restarts starts it again once it is dead
    if self.relay:engine(eid).state ~= "dead" then self.relay:signal(eid, "KILL") end
  end
  self:check_restarts()
end

function Controller:check_restarts()
  for i = #self.restarts, 1, -1 do
    local r = self.restarts[i]
    for eid, stage in pairs(r.waiting) do
      local e = self.relay:engine(eid)
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
      if #r.failed > 0 then self.relay:answer(r.peer, r.id, nil, table.concat(r.failed, "; "))
      else self.relay:answer(r.peer, r.id, true) end
    end
  end
end

function Controller:op_shutdown(peer, id)
  self.relay:answer(peer, id, true)
  self:stop("shut down by a client")
end

--- Engines join from elsewhere, `lpar engine -n K` relaying them over one
-- link: want = { count = K (default 1), id = the first id asked for (a
-- launcher's: host by host, or the MPI rank; default the next free),
-- host = a name for messages }. They get K consecutive ids.
function Controller:op_join(peer, id, want)
  want = type(want) == "table" and want or {}
  local count = math.tointeger(want.count) or 1
  local first = math.tointeger(want.id) or self:size()
  local host = type(want.host) == "string" and want.host or "?"
  local ok, err = self.relay:join(peer, first, count, host)
  if not ok then
    return self.relay:answer(peer, id, nil, string.format("cannot join as engines %d..%d: %s", first,
      first + count - 1, tostring(err)))
  end
  for eid = first, first + count - 1 do self.hosts[eid] = host end
  self.relay:answer(peer, id, { id = first, n = math.max(self:size(), first + count) })
end

--- Mark the controller stopped and call opts.on_stop(why). This may run
-- inside one of the relay's callbacks, so the relay itself is freed later,
-- by close(), from the main loop.
function Controller:stop(why)
  if self.stopped then return end
  self.stopped = true
  if self.opts.on_stop then self.opts.on_stop(why) end
end

--- Stop the engines and close every connection (outside relay callbacks).
function Controller:close()
  self:stop("closed")
  if self.relay then self.relay:stop() end
  self.relay = nil
end

return Controller
