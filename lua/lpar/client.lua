--- Client: the handle on a running cluster.
-- `rc.ids` (engines up, sorted), `#rc`, `rc[i]` (a view of engine i),
-- `rc:view(targets)`, `rc:wait(results, timeout)`, `rc:queue_status()`,
-- `rc:shutdown()`, `rc:close()`. A Client is a to-be-closed value: closing
-- one that started its cluster (Cluster:start_and_connect) stops that
-- cluster; closing one connected to a standalone cluster only detaches.
--   lpar.Client{profile = "default"}  or  lpar.Client{connection_file = path}
local DirectView = require "lpar.view"
local LoadBalancedView = require "lpar.balanced"
local options = require "lpar.options"
local remote = require "lpar.remote" -- loaded now: with the descriptor table full, a require later says "not found"
local wait = require "lpar.wait"

local Client = {}
local methods = {}

--- Connect to a running standalone cluster (lpar cluster start).
function Client.connect(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("Client: expected a table of options {profile=} or {connection_file=}", 2) end
  options.check("Client", opts, { profile = true, connection_file = true })
  local ok, hub = pcall(remote.connect, opts)
  if not ok then error(hub, 2) end
  return Client.new(hub)
end

--- A Client over a hub (used by Cluster:client() and Client.connect);
-- `owned_cluster` is stopped when the client closes.
function Client.new(hub, owned_cluster)
  local client = setmetatable({ _hub = hub, _owned = owned_cluster }, Client)
  require("lpar.px").set_client(client) -- lpar.px runs on the latest client's engines
  return client
end

Client.methods = methods -- for the prompt's completion of rc:

function Client.__index(self, k)
  if k == "ids" then return self._hub:ids() end
  if math.type(k) == "integer" then
    return DirectView.new(self, k)
  end
  return methods[k]
end

function Client:__len() return #self._hub:ids_shared() end

function Client:__tostring()
  local info = self._hub.info
  if info then
    return string.format("<Client: %d engines, profile %s>", #self, tostring(info.profile))
  end
  return string.format("<Client: %d engines>", #self)
end

--- A DirectView over `targets` (nil: all engines).
function methods:view(targets)
  return DirectView.new(self, targets)
end

--- The same as view(targets), by ipyparallel's other name.
methods.direct_view = methods.view

--- A LoadBalancedView over `targets` (nil: all engines).
function methods:load_balanced_view(targets)
  return LoadBalancedView.new(self, targets)
end

--- Abort the queued load-balanced tasks of `results`: they fail with a
-- TaskError "aborted" without running. Returns how many were aborted.
function methods:abort(results)
  if results == nil then error("Client:abort: expected a result or a list of results", 2) end
  return LoadBalancedView.abort(self, results)
end

--- Wait for a list of AsyncResults (or one); true when all are done.
function methods:wait(results, timeout)
  if results == nil then error("Client:wait: expected a list of results", 2) end
  if getmetatable(results) and results.ready then results = { results } end
  local first = 1 -- results before this one are known to be ready
  return wait.until_done(function()
    for i = first, #results do
      if not results[i]:ready() then
        first = i
        return false
      end
    end
    first = #results + 1
    return true
  end, timeout, nil, 2)
end

--- Interrupt the tasks running on `targets` (default all): each fails with
-- the error "interrupted", and the engines keep their globals and go on.
function methods:interrupt(targets)
  for _, id in ipairs(self._hub:resolve_targets(targets, 2)) do self._hub:signal(id, "INT") end
end

--- Per engine: requests in flight and state; plus messages dropped:
-- bad_messages (malformed frames from engines), undecodable (replies that
-- did not decode) and, on a standalone cluster, refused (messages that
-- failed authentication), disconnected (peers cut off for them), clients,
-- no_fds (connections turned away because the controller was out of file
-- descriptors).
function methods:queue_status()
  return self._hub:queue_status()
end

--- Stop the cluster on purpose: its engines and, if standalone, its controller.
function methods:shutdown()
  local hub = self._hub
  if self._owned then
    self:close()
  elseif hub.controller then
    if hub.core then hub:shutdown() end
  else
    hub:stop()
  end
end

--- Detach; stop the cluster too when this client started it.
function methods:close()
  if self._owned then
    self._owned:stop()
    self._owned = nil
  elseif self._hub.controller then
    self._hub:stop()
  end
end

Client.__close = function(self) self:close() end

return Client
