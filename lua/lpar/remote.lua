--- The client side of a standalone cluster: a Hub whose engines sit behind
-- a controller, reached over its authenticated socket.
-- The Hub's views, results and load balancing work unchanged: requests go
-- out routed to an engine, replies and engine events come back the same
-- way; only the cluster controls become calls to the controller.
local core = require "lpar.core"
local Hub = require "lpar.hub"
local profile = require "lpar.profile"
local wait = require "lpar.wait"

local CALL_TIMEOUT = 10

local RemoteHub = setmetatable({}, { __index = Hub })
RemoteHub.__index = RemoteHub

-- The methods a Hub calls on its core, over the link.
local Link = {}
Link.__index = Link


function Link:lost()
  local why = self.hub and self.hub.lost_reason
  return "the connection to the controller was lost (" .. (why or "it went away") .. ")"
end

--- The controller answered call `id`: hand the answer to whoever waits.
function Link:answered(id, ...)
  local on_answer = self.calls[id]
  if on_answer == nil then return end
  self.calls[id] = nil
  if on_answer then on_answer(...) end
end

function Link:send(engine, mtype, id, root, ...)
  if not self.link:is_open() then return nil, self:lost() end
  local ok, err, code = self.link:send(mtype, engine, id, root, ...)
  if not ok and code == core.ECLOSED then return nil, self:lost() end
  return ok, err
end

function Link.send_raw()
  return nil, "raw bytes go only to a local cluster's engines"
end

--- Send a control operation; `on_answer(ok_value, message...)` gets its answer.
function Link:post(on_answer, op, ...)
  self.next_call = self.next_call + 1
  if not self.link:is_open() then return nil, self:lost() end
  local ok, err, code = self.link:send(core.CONTROL, 0, self.next_call, op, op, ...)
  if not ok then return nil, code == core.ECLOSED and self:lost() or err end
  self.calls[self.next_call] = on_answer or false
  return true
end

--- A control operation, waited for: its answer's values, or nil and a message.
function Link:call(op, ...)
  local answered, result = false, nil
  local ok, err = self:post(function(...)
    answered, result = true, table.pack(...)
  end, op, ...)
  if not ok then return nil, err end
  wait.until_done(function() return answered or not self.link:is_open() end, CALL_TIMEOUT, nil, 3)
  if not answered then
    return nil, self.link:is_open() and ("the controller did not answer '" .. op .. "' within "
      .. CALL_TIMEOUT .. " s") or self:lost()
  end
  return table.unpack(result, 1, result.n)
end

function Link:signal(engine, sig)
  return self:call("signal", engine, sig)
end

function Link:interrupt(engine, id)
  self:post(nil, "interrupt", engine, id)
end

function Link:stats()
  return { bad_messages = 0, undecodable = 0 }
end

function Link:stop()
  self.link:close()
end

--- A link to the controller a connection file names: its unix socket when
-- it is reachable from here, else its TCP address. nil and why otherwise.
function RemoteHub.open_link(info, handler, decode)
  local tried = {}
  if info.socket then
    local link, err = core.connect { path = info.socket, key = info.key, decode = decode, handler = handler }
    if link then return link end
    tried[#tried + 1] = err
  end
  if info.port then
    local link, err = core.connect { host = info.ip or "127.0.0.1", port = info.port, key = info.key,
                                     decode = decode, handler = handler }
    if link then return link end
    tried[#tried + 1] = err
  end
  return nil, table.concat(tried, "; ")
end

--- One control operation on the controller a connection file names, over
-- a connection of its own: the answer's values, or nil and a message.
function RemoteHub.ask(info, op, ...)
  local conn = setmetatable({ calls = {}, next_call = 0 }, Link)
  local link, err = RemoteHub.open_link(info, function(kind, ...)
    if kind == "control" then conn:answered(...) end
  end, true)
  if not link then return nil, err end
  conn.link = link
  local result = table.pack(conn:call(op, ...))
  link:close()
  return table.unpack(result, 1, result.n)
end

--- Connect to a running standalone cluster. opts: profile (default
-- "default") or connection_file. Raises a message saying which file and
-- what to do when it cannot.
function RemoteHub.connect(opts)
  local name = opts.profile or (not opts.connection_file and "default") or nil
  local path = opts.connection_file or profile.connection_file(name)
  local info = profile.read(path, not opts.connection_file and name or nil)
  local self = Hub.new_state(RemoteHub, { info = info, remote = true })
  local weak = setmetatable({ self }, { __mode = "v" })
  local link, err = RemoteHub.open_link(info, function(kind, ...)
    local hub = weak[1]
    if hub then hub[kind](hub, ...) end
  end, true)
  if not link then
    local who = name and string.format("the cluster of profile %q", name) or "the cluster in " .. path
    if info.pid and not profile.alive(info.pid) then
      error(string.format("%s is not running (its controller, pid %d, is gone), so %s is stale; " ..
        "start it again with `lpar cluster start%s`, or remove stale files with `lpar cluster clean`",
        who, info.pid, path, name and (" --profile " .. name) or ""), 0)
    end
    error(string.format("cannot connect to %s (%s): %s", who, path, err), 0)
  end
  self.core = setmetatable({ link = link, calls = {}, next_call = 0, hub = self }, Link)
  local hello, why = self.core:call("connect")
  if not hello then
    link:close()
    error(string.format("cannot connect to the cluster in %s: %s", path, why), 0)
  end
  self.cluster_info = hello
  return self
end

-- Events from the link, besides the engine events a Hub already handles.

function RemoteHub:ready(engine, hello)
  local e = self.engines[engine]
  if not e or e.state == "dead" then -- new, or back after a restart
    self.engines[engine] = { state = "starting" }
  end
  self.engines[engine].pid = tonumber(hello:match("pid=(%d+)"))
  Hub.ready(self, engine, hello)
end

function RemoteHub:exit(engine, status, signal)
  if not self.engines[engine] then self.engines[engine] = { state = "starting" } end
  Hub.exit(self, engine, status, signal)
end

function RemoteHub:control(id, ...)
  if self.core then self.core:answered(id, ...) end
end

--- Mark every engine unreachable and fail what is pending.
local function cut_off(self, how)
  self.unreachable = how
  for id, e in pairs(self.engines) do
    if e.state ~= "dead" then
      e.state, e.how = "dead", how
      self.ids_cache = nil
      self:fail_engine(id, how)
      for _, fn in ipairs(self.on_ready) do fn(id) end
    end
  end
end

function RemoteHub:closed(reason)
  if self.closing then return end
  self.lost_reason = reason
  cut_off(self, "is unreachable: the connection to its controller was lost (" .. reason .. ")")
end

function RemoteHub:unavailable(engine)
  if self.unreachable and self.engines[engine] then
    local errors = require "lpar.errors"
    return errors.EngineError.new(engine, nil, self.unreachable)
  end
  return Hub.unavailable(self, engine)
end

--- Restart engines on the controller; returns once they are up again.
function RemoteHub:restart_engines(ids, level)
  local ok, err = self.core:call("restart", ids)
  if not ok then error("restart_engines: " .. tostring(err), level + 1) end
  -- The answer follows the engines' hellos on the same connection.
end

--- The controller's view of the cluster (every client's tasks).
function RemoteHub:remote_status()
  local st, err = self.core:call("status")
  if not st then error("queue_status: " .. tostring(err), 3) end
  return st
end

--- Ask the controller to stop the whole cluster.
function RemoteHub:shutdown()
  local ok, err = self.core:call("shutdown")
  if not ok and self.core.link:is_open() then error("shutdown: " .. tostring(err), 3) end
  self:stop("is stopped: the cluster was shut down")
end

--- Detach this client; the cluster goes on.
function RemoteHub:stop(how)
  if not self.core then return end
  self.closing = true
  self.core:stop()
  cut_off(self, how or "is unreachable: this client was closed (the cluster goes on)")
  self.core = nil
end

return RemoteHub
