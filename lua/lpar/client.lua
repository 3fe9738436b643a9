--- Client: the handle on a running cluster.
-- `rc.ids` (engines up, sorted), `#rc`, `rc[i]` (a view of engine i),
-- `rc:view(targets)`, `rc:wait(results, timeout)` (no results: all of
-- them), `rc:result_status(results)`, `rc:purge_results(results | "all")`,
-- `rc:resubmit(results)`, `rc:queue_status()`, `rc:shutdown()`, `rc:close()`.
-- The client keeps track of the results its views hand out (weakly: one
-- dropped is forgotten) with their calls' arguments, for resubmit, until
-- they are purged. A Client is a to-be-closed value: closing
-- one that started its cluster (Cluster:start_and_connect) stops that
-- cluster; closing one connected to a standalone cluster only detaches.
-- `rc[i]` also takes what rc:view does: `rc["0:2"]`, `rc[{0, 1}]`.
--   lpar.Client{profile = "default"}  or  lpar.Client{connection_file = path}
local DirectView = require "lpar.view"
local LoadBalancedView = require "lpar.balanced"
local options = require "lpar.options"
local remote = require "lpar.remote" -- loaded now: with the descriptor table full, a require later says "not found"
local wait = require "lpar.wait"
local AsyncResult = require "lpar.asyncresult"

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
  -- Every result the views handed out, in order, weakly: one the user
  -- dropped need not be kept (a pending one is held by the hub or the
  -- scheduler until it settles). A list of weak values, not a table keyed
  -- by results: weak keys make every collection walk them again and again.
  -- Those before `_done_upto` are known done.
  local client = setmetatable({ _hub = hub, _owned = owned_cluster,
    _tracked = setmetatable({}, { __mode = "v" }), _ntracked = 0, _done_upto = 1, _compact_at = 4096 }, Client)
  require("lpar.px").set_client(client) -- lpar.px runs on the latest client's engines
  return client
end

Client.methods = methods -- for the prompt's completion of rc:

--- Is `k` a target spec as rc[k] takes it: a list of ids, or a string
-- of a slice or a comma list ("0:2", "::2", "-1", "0,2")?
local function target_key(k)
  if type(k) == "table" then return getmetatable(k) == nil end
  return type(k) == "string" and k:find("^[%d%s:,%-]+$") ~= nil
end

function Client.__index(self, k)
  if k == "ids" then return self._hub:ids() end
  if math.type(k) == "integer" then
    return DirectView.new(self, k)
  end
  local m = methods[k]
  if m == nil and target_key(k) then return DirectView.new(self, k) end
  return m
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

--- Record `ar`, made by a view, with how to submit its call again:
-- `again(...)` returns a new AsyncResult (for resubmit).
function methods:_track(ar, again, ...)
  -- { count of the arguments, again, arguments... }: an array alone, where
  -- table.pack's `n` would give the table a hash part too (one per call).
  ar._again, ar._client = { select("#", ...), again, ... }, self
  local n = self._ntracked + 1
  self._tracked[n], self._ntracked = ar, n
  -- When the list has doubled since it was last compacted, drop the
  -- collected and the purged (amortized, whatever the user keeps).
  if n >= self._compact_at then
    local keep, k, first = {}, 0, nil
    for i = 1, n do
      local r = self._tracked[i]
      if r and not r._purged then
        k = k + 1
        keep[k] = r
        if not first and i >= self._done_upto then first = k end
      end
    end
    self._tracked = setmetatable(keep, { __mode = "v" })
    self._ntracked, self._done_upto, self._compact_at = k, first or k + 1, math.max(4096, 2 * k)
  end
end

local function is_result(x) return getmetatable(x) == AsyncResult end
-- Called as a function: a result's methods are found through an __index
-- function, a call of its own at each look (rc:wait looks at every result).
local ready = AsyncResult.methods.ready

--- Wait for a list of AsyncResults (or one), or with none, for every result
-- of this client not done yet, as ipyparallel's rc.wait() does; up to
-- `timeout` seconds (forever when nil). True when all are done.
function methods:wait(results, timeout)
  if results == nil then
    return (wait.until_done(function()
      local tracked = self._tracked
      for i = self._done_upto, self._ntracked do
        local ar = tracked[i]
        if ar and not ar._purged and not ready(ar) then return false end
        self._done_upto = i + 1
      end
      return true
    end, timeout, nil, 2))
  end
  if is_result(results) then results = { results } end
  if type(results) ~= "table" then
    error("Client:wait: expected a result, a list of results or nil (every result), got "
      .. type(results) .. (type(results) == "number" and "; the timeout comes second: rc:wait(nil, 5)" or ""), 2)
  end
  local first = 1 -- results before this one are known to be ready
  return (wait.until_done(function()
    for i = first, #results do
      local ar = results[i]
      local done
      if is_result(ar) then done = ready(ar) else done = ar:ready() end
      if not done then
        first = i
        return false
      end
    end
    first = #results + 1
    return true
  end, timeout, nil, 2))
end

--- The results `list` names (one result, or a list), each checked to be
-- this client's and not purged; raises naming the first that is not.
local function own_results(self, what, list, level)
  if is_result(list) then list = { list } end
  if type(list) ~= "table" then
    error(string.format("%s: expected a result or a list of results, got %s", what, type(list)), level + 1)
  end
  for i, ar in ipairs(list) do
    if not is_result(ar) then
      error(string.format("%s: element %d is %s, not an AsyncResult", what, i, type(ar)), level + 1)
    elseif ar._purged then
      error(string.format("%s: result %d was purged (rc:purge_results)", what, i), level + 1)
    elseif ar._client ~= self then
      error(string.format("%s: result %d is not one of this client's", what, i), level + 1)
    end
  end
  return list
end

--- Which of `results` (one, or a list) are done, as ipyparallel's
-- rc.result_status: `{pending = {...}, completed = {...}}`, the results in
-- the order given (failed ones count as completed). With
-- `{status_only = false}`, also `results[ar]`: what ar:get{return_errors =
-- true} returns first, for each completed one.
function methods:result_status(results, opts)
  opts = require("lpar.options").check("result_status", opts, { status_only = true })
  local list = own_results(self, "result_status", results, 2)
  local status = { pending = {}, completed = {} }
  if opts.status_only == false then status.results = {} end
  for _, ar in ipairs(list) do
    if ar:ready() then
      status.completed[#status.completed + 1] = ar
      if status.results then status.results[ar] = ar:get { return_errors = true } end
    else
      status.pending[#status.pending + 1] = ar
    end
  end
  return status
end

--- Forget results, as ipyparallel's rc.purge_results: `results` (one, or
-- a list), or "all" for every completed result of this client. A purged
-- result lets go of its values, output and request (ar:get() then raises
-- that it was purged), and rc:wait, result_status and resubmit know it no
-- more. A pending result cannot be purged: nothing is purged then. Returns
-- how many were purged.
function methods:purge_results(results)
  local list
  if results == "all" then
    list = {}
    for i = 1, self._ntracked do
      local ar = self._tracked[i]
      if ar and not ar._purged and ar:ready() then list[#list + 1] = ar end
    end
  else
    list = own_results(self, "purge_results", results, 2)
    for i, ar in ipairs(list) do
      if not ar:ready() then
        error(string.format("purge_results: result %d is still pending: wait for it or abort it first", i), 2)
      end
    end
  end
  for _, ar in ipairs(list) do
    ar._again, ar._purged = false, true
    ar.outputs = {}
    for _, s in ipairs(ar._slots) do s.values, s.error, s.stdout, s.stderr = nil, nil, nil, nil end
    local c = ar._c -- a load-balanced map keeps its settled tasks in arrays
    if c then c.val, c.stdout, c.stderr = {}, {}, {} end
  end
  return #list
end

--- Submit the calls of `results` (one, or a list) again, as ipyparallel's
-- rc.resubmit: each runs as it was first submitted, with the view's flags
-- of then (a DirectView's call on the same engines, a load-balanced one
-- wherever the scheduler puts it). Results still pending cannot be
-- resubmitted: nothing is then. Returns the new AsyncResult, or a list of
-- them for a list.
function methods:resubmit(results)
  local list = own_results(self, "resubmit", results, 2)
  for i, ar in ipairs(list) do
    if not ar:ready() then
      error(string.format("resubmit: result %d is still pending: in-flight tasks may not be resubmitted", i), 2)
    end
  end
  local out = {}
  for i, ar in ipairs(list) do
    local call = ar._again
    local ok, new = pcall(call[2], table.unpack(call, 3, call[1] + 2))
    if not ok then
      error(string.format("resubmit: result %d: %s", i, tostring(new)), 2)
    end
    out[i] = new
  end
  if is_result(results) then return out[1] end
  return out
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
