--- AsyncResult: the pending outcome of one call on one or more engines.
-- Fields: `elapsed` (seconds since submission, frozen when done), `stdout`
-- and `stderr` (a string on a single-engine result, else a list in target
-- order), `metadata` (likewise: engine_id, submitted, started, completed),
-- `outputs` (display data such as images: {engine, type, data, metadata}),
-- `engine_ids`, `progress` (tasks done). Iterating with `ar:iter()` yields
-- each engine's result in arrival order.
local core = require "lpar.core"
local errors = require "lpar.errors"
local wait = require "lpar.wait"

local AsyncResult = {}
local methods = {}

local NONE_YET = setmetatable({}, { __newindex = function() error("NONE_YET is shared: not to be changed", 2) end })

--- A result over the given tasks. `opts.single`: a one-engine view, whose
-- get() returns the values themselves; `opts.finish(slots)`: turns the
-- finished slots into what get() returns. `opts.compact` ({ n =, size =,
-- ordered = }): a load-balanced map of n items in tasks of `size`, whose
-- settled tasks are kept in arrays rather than a table each.
function AsyncResult.new(kind, opts)
  local c = opts.compact
  if c then
    local tasks = (c.n + c.size - 1) // c.size
    c = { n = c.n, size = c.size, ordered = c.ordered, tasks = tasks, made = 0, live = {},
          val = {}, failed = {}, nfailed = 0, eng = {}, id = {}, t0 = {}, t1 = {},
          stdout = {}, stderr = {}, submitted = core.now() }
  end
  -- Every field a settle or a wait looks at is present (false, not nil):
  -- a missing one would go through __index below at each look. Those only
  -- a map or a load-balanced view sets (_ordered, _feed, _stop,
  -- _interrupting) and on_output are left out when false: sixteen fields
  -- fit a hash of 16, where one more would take 32. A one-engine result
  -- (a direct call, made a hundred thousand times a second) keeps its one
  -- slot in _one_slot and makes its lists of slots and arrivals only when
  -- something asks for them (see __index): every table fewer per call is
  -- work the collector does not do.
  local single = opts.single or false
  local self = {
    _c = c or false,
    _total = c and c.tasks or (single and 1) or false,
    _kind = kind,
    _one_slot = false,
    _done = 0,
    _single = single,
    _finish = opts.finish or false,
    _submitted = core.now(),
    _completed = false,
    _waiters = false,
    _interrupt = false,
    _hub = false, -- the hub its tasks went to, for interrupts (set by its view)
    _again = false, -- how to submit it again, and whose it is (Client:_track)
    _client = false,
    _purged = false,
  }
  if not single then self._slots, self._arrivals = {}, {} end
  if c then self._ordered = c.ordered end
  return setmetatable(self, AsyncResult)
end

AsyncResult.methods = methods -- for the prompt's completion of ar:

local live_slot, head_of -- a compact result's slot in flight for a task, a batch's first task (below)

--- Call fn once this result is ready (waits register here).
local function add_waiter(self, fn)
  local list = self._waiters
  if not list then
    list = {}
    self._waiters = list
  end
  list[#list + 1] = fn
end

-- Tasks in all: a map makes its slots as it submits (within a window), so
-- it says how many there will be (_total).
local function total(self) return self._total or #self._slots end

function AsyncResult.__index(self, k)
  local m = methods[k]
  if m then return m end
  if k == "_slots" then -- a one-engine result's, made when first asked for
    local list = { rawget(self, "_one_slot") or nil }
    rawset(self, "_slots", list)
    return list
  elseif k == "_arrivals" then -- likewise: its one slot once settled
    if self._done > 0 then return self._slots end
    return NONE_YET
  elseif k == "elapsed" then
    local last = self._completed or core.now()
    return last - self._submitted
  elseif k == "stdout" or k == "stderr" then
    return self:_per_slot(function(s) return s[k] and table.concat(s[k]) or "" end)
  elseif k == "metadata" then
    return self:_per_slot(function(s)
      return { engine_id = s.engine, task = s.id, submitted = s.submitted or self._submitted, started = s.started,
               completed = s.completed, status = s.done and (s.ok and "ok" or "error") or "pending" }
    end)
  elseif k == "engine_ids" then
    local ids = {}
    local c = self._c
    if c then
      for i = 1, c.made do
        local live = live_slot(c, i)
        if live then ids[i] = live.engine else ids[i] = c.eng[head_of(c, i)] or nil end
      end
    else
      for i, s in ipairs(self._slots) do ids[i] = s.engine end
    end
    return ids
  elseif k == "outputs" then -- display data from the engines, in arrival order: made when asked
    local list = {}
    rawset(self, "outputs", list)
    return list
  elseif k == "progress" then
    return self._done
  end
  return nil
end

function AsyncResult:__tostring()
  local state = self:ready() and (self:successful() and "finished" or "failed") or "pending"
  return string.format("<AsyncResult %s: %s, %d/%d>", self._kind, state, self._done, total(self))
end

function AsyncResult:__len() return total(self) end

-- Internal: slots and events.

-- Per kind of call, the metatable that gives its slots their kind.
local slot_metas = {}
local function slot_meta(kind)
  local m = slot_metas[kind]
  if not m then
    m = { __index = { kind = kind } }
    slot_metas[kind] = m
  end
  return m
end

--- A new task slot for `engine`; the hub fills in its id. `batch`: a
-- compact map's slot for that many of its one-item tasks sent as one
-- request (settled with the list of their values, `failed` naming errors).
function methods:_slot(engine, batch)
  -- The fields the hub and a settle fill in are named (nil) here, so the
  -- table is made with room for them and does not grow at each reply:
  -- eight, which fit a hash of 8. Its kind comes from its metatable (px
  -- sets its own), and it was submitted with its result (ar._submitted).
  -- stdout and stderr: lists of chunks, made on first output.
  local s = setmetatable({ ar = self, engine = engine, id = nil, done = nil, ok = nil, started = nil,
                           completed = nil, values = nil }, slot_metas[self._kind] or slot_meta(self._kind))
  local c = self._c
  if c then
    local k = c.made + 1
    s.index, s.count, s.chunked = k, math.min(c.size, c.n - (k - 1) * c.size), c.size > 1
    -- Kept by its first task only: a table of every task in flight
    -- would churn through rehashes.
    c.live[k] = s
    if batch and batch > 1 then
      s.batch = batch
      c.made = k + batch - 1
    else
      c.made = k
    end
  elseif self._single and not self._one_slot and rawget(self, "_slots") == nil then
    self._one_slot = s
  else
    self._slots[#self._slots + 1] = s
  end
  return s
end

-- Slots made so far.
local function made(self) return self._c and self._c.made or #self._slots end

-- Most one-item tasks of a map sent as one request.
AsyncResult.MAX_BATCH = 64

--- The slot in flight that holds task k of a compact result, or nil.
live_slot = function(c, k)
  if c.t1[k] ~= nil then return nil end -- settled
  for j = k, math.max(1, k - AsyncResult.MAX_BATCH + 1), -1 do
    local s = c.live[j]
    if s then return j + (s.batch or 1) > k and s or nil end
  end
  return nil
end

--- The first task of the request that carried settled task k: a batch
-- keeps its engine, id and start once, on its first task.
head_of = function(c, k)
  for j = k, math.max(1, k - AsyncResult.MAX_BATCH + 1), -1 do
    if c.eng[j] ~= nil then return j end
  end
  return k
end

--- Slot k: a compact result's settled task as a table made for the asking.
local function slot_at(self, k)
  local c = self._c
  if not c then return self._slots[k] end
  local live = live_slot(c, k)
  if live or k > c.made then return live end
  local failed = c.failed[k] or nil
  local h = head_of(c, k)
  return { index = k, kind = self._kind, engine = c.eng[h] or nil, id = c.id[h] or nil,
           submitted = c.submitted, started = c.t0[h] or nil, completed = c.t1[k], done = true,
           ok = not failed, values = (not failed) and c.val[k] or nil, error = failed and c.val[k] or nil,
           count = math.min(c.size, c.n - (k - 1) * c.size), chunked = c.size > 1,
           stdout = c.stdout[k], stderr = c.stderr[k] }
end

--- The same for a batch: each of its tasks from the reply's list (or
-- every one failed with the batch's error).
local function compact_settle_batch(self, slot)
  local c, k0, n = self._c, slot.index, slot.batch
  local values, failed = slot.ok and slot.values, nil
  if values then failed = values.failed end
  local eng, id, t0, t1 = slot.engine or false, slot.id or false, slot.started or false, slot.completed
  for i = 1, n do
    local k = k0 + i - 1
    local err = not values and slot.error or (failed and failed[i])
    if err then
      c.val[k] = err
      c.failed[k] = true
      c.nfailed = c.nfailed + 1
    else
      c.val[k] = values[i]
    end
    c.t1[k] = t1 -- set: this task is settled
    if not c.ordered then self._arrivals[#self._arrivals + 1] = k end
  end
  -- Engine, id and start once for the batch, on its first task.
  c.eng[k0], c.id[k0], c.t0[k0] = eng, id, t0
  c.live[k0] = nil
  -- What the batch printed goes with its first task.
  if slot.stdout then c.stdout[k0] = slot.stdout end
  if slot.stderr then c.stderr[k0] = slot.stderr end
end

--- Keep a settled slot's facts in the compact arrays, and let it go.
local function compact_settle(self, slot)
  local c, k = self._c, slot.index
  if slot.batch then return compact_settle_batch(self, slot) end
  if slot.ok then
    c.val[k] = slot.values
  else
    c.val[k] = slot.error
    c.failed[k] = true
    c.nfailed = c.nfailed + 1
  end
  -- false, not nil, for what is missing: the arrays stay arrays.
  c.eng[k], c.id[k], c.t0[k], c.t1[k] = slot.engine or false, slot.id or false, slot.started or false,
    slot.completed
  if slot.stdout then c.stdout[k] = slot.stdout end
  if slot.stderr then c.stderr[k] = slot.stderr end
  c.live[k] = nil
  if not c.ordered then self._arrivals[#self._arrivals + 1] = k end
end

function methods:_per_slot(fn)
  if self._single then return fn(self._one_slot or self._slots[1]) end
  local out = {}
  for k = 1, made(self) do out[k] = fn(slot_at(self, k)) end
  return out
end

function methods:_stream(slot, name, text)
  local t = slot[name]
  if t == nil then
    t = {}
    slot[name] = t
  end
  t[#t + 1] = text
  if self.on_output then self.on_output(slot.engine, name, text) end
end

function methods:_display(_, output)
  self.outputs[#self.outputs + 1] = output
end

function methods:_settle(slot, ok, started, completed, value)
  if slot.done then return end
  slot.done, slot.ok, slot.started, slot.completed = true, ok, started, completed or core.now()
  if ok then slot.values = value else slot.error = value end
  self._done = self._done + (slot.batch or 1)
  if self._c then
    compact_settle(self, slot)
  elseif not self._single then -- a one-engine result's arrivals follow from _done
    self._arrivals[#self._arrivals + 1] = slot
  end
  if self._done == (self._total or #self._slots) then -- total(self)
    self._completed = core.now()
    local waiters = self._waiters
    if waiters then
      self._waiters = false
      for _, fn in ipairs(waiters) do fn() end
    end
  end
end

-- Public methods.

--- True when every task is done (successfully or not).
function methods:ready() return self._done == total(self) end

--- True when every task succeeded; an error when not ready yet.
function methods:successful()
  if not self:ready() then error("AsyncResult:successful(): the result is not ready", 2) end
  if self._c then return self._c.nfailed == 0 end
  for _, s in ipairs(self._slots) do
    if not s.ok then return false end
  end
  return true
end

--- Ctrl-C during a wait on this result: its views set `_interrupt` to
-- stop its tasks (interrupt the running ones, drop the queued ones).
local function interrupter(self)
  return function() if self._interrupt then self._interrupt(self) end end
end

--- Wait up to `timeout` seconds (forever when nil); true when ready.
function methods:wait(timeout)
  return (wait.until_done(function() return self:ready() end, timeout,
    function(fn) add_waiter(self, fn) end, 2, interrupter(self)))
end

local function raise_errors(self)
  local failed = {}
  local c = self._c
  if c then
    if c.nfailed > 0 then
      for k = 1, c.made do
        if c.failed[k] then failed[#failed + 1] = c.val[k] end
      end
    end
  elseif self._one_slot then
    if not self._one_slot.ok then error(self._one_slot.error, 0) end
  else
    for _, s in ipairs(self._slots) do
      if not s.ok then failed[#failed + 1] = s.error end
    end
  end
  if #failed == 1 then error(failed[1], 0) end
  if #failed > 1 then error(errors.CompositeError.new(failed), 0) end
end

--- The results: raises the remote error (or a CompositeError of several),
-- or a TimeoutError when the wait runs out. Takes a timeout in seconds, or
-- a table {timeout =, return_errors = true} to get error objects in place
-- of the failed results instead of raising.
function methods:get(opts)
  local timeout, return_errors = opts, false
  if type(opts) == "table" then
    require("lpar.options").check("get", opts, { timeout = true, return_errors = true })
    timeout, return_errors = opts.timeout, opts.return_errors
  end
  if self._purged then error("AsyncResult:get(): the result was purged (rc:purge_results)", 2) end
  local ready, stuck = wait.until_done(function() return self:ready() end, timeout,
    function(fn) add_waiter(self, fn) end, 2, interrupter(self))
  if not ready then
    if stuck then
      error(errors.TimeoutError.new(string.format(
        "%s result can never be ready: nothing is left that could finish it (%d/%d done)",
        self._kind, self._done, total(self))), 2)
    end
    error(errors.TimeoutError.new(string.format("%s result not ready after %gs (%d/%d done)",
      self._kind, timeout, self._done, total(self))), 2)
  end
  if not return_errors then raise_errors(self) end
  if self._c then return self:_map_values() end
  if self._finish then return self._finish(self._slots, self._single, self) end
  if self._single then
    local s = self._one_slot or self._slots[1]
    if not s.ok then return s.error end
    return table.unpack(s.values, 1, s.values.n)
  end
  local out = {}
  for i, s in ipairs(self._slots) do
    if s.ok then out[i] = s.values[1] else out[i] = s.error end
  end
  return out
end

--- A compact map's results, flat, in order (or as they came, unordered);
-- a failed task gives its error for each of its items.
function methods:_map_values()
  local c = self._c
  -- The common case, in one C call: one item a task, in order, none failed.
  if c.size == 1 and c.ordered and c.nfailed == 0 then return table.move(c.val, 1, c.n, 1, {}) end
  local out, i = {}, 0
  local function put(k)
    local n = math.min(c.size, c.n - (k - 1) * c.size)
    local v = c.val[k]
    if c.failed[k] then
      for j = 1, n do out[i + j] = v end
    elseif c.size > 1 then
      for j = 1, n do out[i + j] = v[j] end
    else
      out[i + 1] = v
    end
    i = i + n
  end
  if c.ordered then
    for k = 1, c.made do put(k) end
  else
    for _, k in ipairs(self._arrivals) do put(k) end
  end
  return out
end

local function wait_for(self, pred)
  wait.until_done(pred, nil, function(fn) add_waiter(self, fn) end, 3,
    interrupter(self))
end

--- Iterate over the results as they arrive: (engine id, first value or
-- error object). A map's result yields its elements instead, in order for
-- an ordered map and as their tasks finish otherwise.
function methods:iter()
  if self._purged then error("AsyncResult:iter(): the result was purged (rc:purge_results)", 2) end
  local c = self._c
  if c then
    local k, j, n = 0, 0, 0
    return function()
      while j >= n do
        k = k + 1
        if k > c.tasks then return nil end
        local key = k
        if c.ordered then
          wait_for(self, function() return c.t1[key] ~= nil end)
        else
          wait_for(self, function() return #self._arrivals >= key end)
          key = self._arrivals[k]
        end
        self._iter_key = key
        j, n = 0, math.min(c.size, c.n - (key - 1) * c.size)
      end
      j = j + 1
      local key = self._iter_key
      if c.failed[key] then error(c.val[key], 2) end
      if c.size > 1 then return c.val[key][j] end
      return c.val[key]
    end
  end
  if self._kind == "map" then
    local k, j, s = 0, 0, nil
    return function()
      while s == nil or j >= s.count do
        k = k + 1
        if k > total(self) then return nil end
        if self._ordered then
          wait_for(self, function()
            s = self._slots[k]
            return s ~= nil and s.done
          end)
        else
          wait_for(self, function() return #self._arrivals >= k end)
          s = self._arrivals[k]
        end
        j = 0
      end
      j = j + 1
      if not s.ok then error(s.error, 2) end
      if s.chunked then return s.values[j] end
      return s.values
    end
  end
  local i = 0
  return function()
    i = i + 1
    if i > total(self) then return nil end
    wait_for(self, function() return #self._arrivals >= i end)
    local s = self._arrivals[i]
    if s.ok then return s.engine, s.values[1] end
    return s.engine, s.error
  end
end

--- Wait while drawing a progress bar on the terminal (tasks done, rate,
-- time left), redrawn in place; silent when stdout is not a terminal.
-- AsyncResult.progress, when set (the Jupyter kernel sets it), draws the
-- bar instead: progress(ar, done, total, seconds, final).
function methods:wait_interactive(interval)
  local progress = AsyncResult.progress
  if progress then
    local t0 = core.now()
    while not self:wait(interval or 0.1) do progress(self, self._done, total(self), core.now() - t0, false) end
    progress(self, total(self), total(self), core.now() - t0, true)
    return true
  end
  local uv = require "luv"
  local tty = uv.guess_handle(1) == "tty"
  local count = total(self)
  local t0 = core.now()
  while not self:wait(interval or 0.1) do
    if tty then
      local done, dt = self._done, core.now() - t0
      local rate = dt > 0 and done / dt or 0
      local left = rate > 0 and (count - done) / rate or 0
      local width = 30
      local fill = count > 0 and math.floor(width * done / count) or width
      io.stdout:write(string.format("\r[%s%s] %d/%d tasks, %.1f/s, %.1fs left ",
        string.rep("#", fill), string.rep(" ", width - fill), done, count, rate, left))
      io.stdout:flush()
    end
  end
  if tty then io.stdout:write(string.format("\r%d/%d tasks done in %.2fs%s\n", count, count,
    core.now() - t0, string.rep(" ", 30))) end
  return true
end

--- Seconds from the first start to the last completion on the engines.
function methods:wall_time()
  local first, last
  local c = self._c
  if c then
    for k = 1, c.made do
      local t0, t1 = c.t0[k], c.t1[k] -- t0 on a batch's first task only
      if t0 then first = math.min(first or t0, t0) end
      if t1 then last = math.max(last or t1, t1) end
    end
    return first and last and last - first or nil
  end
  for _, s in ipairs(self._slots) do
    if s.started then first = math.min(first or s.started, s.started) end
    if s.completed then last = math.max(last or s.completed, s.completed) end
  end
  return first and last and last - first or nil
end

--- Seconds of engine time summed over the tasks.
function methods:serial_time()
  local sum = 0
  local c = self._c
  if c then
    for k = 1, c.made do
      if c.t0[k] and c.t1[k] then sum = sum + (c.t1[k] - c.t0[k]) end -- a batch counts once
    end
    return sum
  end
  for _, s in ipairs(self._slots) do
    if s.started and s.completed then sum = sum + (s.completed - s.started) end
  end
  return sum
end

--- Width and height of a PNG image, from its header.
local function png_size(data)
  if #data < 24 or data:sub(1, 8) ~= "\137PNG\r\n\26\n" then return nil end
  return string.unpack(">I4I4", data, 17)
end

local extensions = { ["image/png"] = "png", ["text/plain"] = "txt" }

--- Save one display output to a file; returns the path and a description.
local function save_output(o, dir, n)
  local path = string.format("%s/output-%d-%d-%d.%s", dir, o.engine, o.task, n,
    extensions[o.type] or "bin")
  local f = assert(io.open(path, "wb"))
  f:write(o.data)
  f:close()
  local w, h = png_size(o.data)
  return path, w and string.format(" (%dx%d)", w, h) or ""
end

--- Make `path` a directory of this user's, mode 0700 (its parents as needed).
local function private_dir(path, tighten)
  local uv = require "luv"
  local parent = path:match("^(.+)/[^/]+$")
  if parent and not uv.fs_stat(parent) then private_dir(parent, false) end
  local ok, err, code = uv.fs_mkdir(path, tonumber("700", 8))
  if not ok and code ~= "EEXIST" then error(string.format("cannot create %s: %s", path, err), 0) end
  local st = uv.fs_stat(path)
  if not st or st.type ~= "directory" or st.uid ~= uv.getuid() then
    error(string.format("%s is not a directory of this user's: no place for display outputs", path), 0)
  end
  if tighten and st.mode % 512 ~= tonumber("700", 8) then uv.fs_chmod(path, tonumber("700", 8)) end
  return path
end

-- Where display outputs go: $LPAR_OUTPUT_DIR, else a per-user 0700
-- directory, $LPAR_DIR/outputs or $XDG_CACHE_HOME/lpar/outputs (default
-- ~/.cache/lpar/outputs): never a directory that other users share.
local output_dir
local function default_dir()
  if not output_dir then
    local function env(name) local v = os.getenv(name) return v ~= "" and v or nil end
    local dir, chosen = env("LPAR_OUTPUT_DIR"), env("LPAR_OUTPUT_DIR") ~= nil
    if not dir and env("LPAR_DIR") then dir = env("LPAR_DIR") .. "/outputs" end
    if not dir then
      local cache = env("XDG_CACHE_HOME") or ((env("HOME") or error("HOME is not set", 0)) .. "/.cache")
      dir = cache .. "/lpar/outputs"
    end
    output_dir = private_dir(dir, not chosen)
  end
  return output_dir
end

--- Wait, then show what the engines produced, labelled as IPython does:
-- "[stdout:0] text" for output, and "[output:2] PATH (WxH)" for display
-- data, which is saved to files in `opts.dir` (default $LPAR_OUTPUT_DIR, or a
-- 0700 directory of this user's: $LPAR_DIR/outputs or
-- $XDG_CACHE_HOME/lpar/outputs). `opts.out` is any object with a write method.
-- Returns the list of saved paths.
function methods:display_outputs(opts)
  self:wait()
  opts = require("lpar.options").check("display_outputs", opts, { dir = true, out = true })
  local out = opts.out or io.stdout
  for k = 1, made(self) do
    local s = slot_at(self, k)
    for _, name in ipairs { "stdout", "stderr" } do
      local text = s[name] and table.concat(s[name]) or ""
      if text ~= "" then
        local label = string.format("[%s:%d] ", name, s.engine)
        text = text:gsub("\n$", "")
        out:write(label, (text:gsub("\n", "\n" .. label)), "\n")
      end
    end
  end
  -- Grouped by engine, in arrival order within an engine, as IPython shows them.
  local shown = {}
  for n, o in ipairs(self.outputs) do shown[n] = { o = o, n = n } end
  table.sort(shown, function(a, b)
    if a.o.engine ~= b.o.engine then return a.o.engine < b.o.engine end
    return a.n < b.n
  end)
  local paths = {}
  for _, item in ipairs(shown) do
    local o, n = item.o, item.n
    local path, size = save_output(o, opts.dir or default_dir(), n)
    paths[#paths + 1] = path
    out:write(string.format("[output:%d] %s%s\n", o.engine, path, size))
  end
  return paths
end

return AsyncResult
