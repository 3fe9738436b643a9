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

--- A result over the given tasks. `opts.single`: a one-engine view, whose
-- get() returns the values themselves; `opts.finish(slots)`: turns the
-- finished slots into what get() returns.
function AsyncResult.new(kind, opts)
  return setmetatable({
    _kind = kind,
    _slots = {},
    _done = 0,
    _single = opts.single,
    _finish = opts.finish,
    _waiters = {},
    _arrivals = {},
    outputs = {}, -- display data from the engines, in arrival order
    _submitted = core.now(),
  }, AsyncResult)
end

function AsyncResult.__index(self, k)
  local m = methods[k]
  if m then return m end
  if k == "elapsed" then
    local last = self._completed or core.now()
    return last - self._submitted
  elseif k == "stdout" or k == "stderr" then
    return self:_per_slot(function(s) return table.concat(s[k]) end)
  elseif k == "metadata" then
    return self:_per_slot(function(s)
      return { engine_id = s.engine, task = s.id, submitted = s.submitted, started = s.started,
               completed = s.completed, status = s.done and (s.ok and "ok" or "error") or "pending" }
    end)
  elseif k == "engine_ids" then
    local ids = {}
    for i, s in ipairs(self._slots) do ids[i] = s.engine end
    return ids
  elseif k == "progress" then
    return self._done
  end
  return nil
end

function AsyncResult:__tostring()
  local state = self:ready() and (self:successful() and "finished" or "failed") or "pending"
  return string.format("<AsyncResult %s: %s, %d/%d>", self._kind, state, self._done, #self._slots)
end

function AsyncResult:__len() return #self._slots end

-- Internal: slots and events.

--- A new task slot for `engine`; the hub fills in its id.
function methods:_slot(engine)
  local s = { ar = self, engine = engine, kind = self._kind, submitted = core.now(),
              stdout = {}, stderr = {}, done = false }
  self._slots[#self._slots + 1] = s
  return s
end

function methods:_per_slot(fn)
  if self._single then return fn(self._slots[1]) end
  local out = {}
  for i, s in ipairs(self._slots) do out[i] = fn(s) end
  return out
end

function methods:_stream(slot, name, text)
  local t = slot[name]
  t[#t + 1] = text
end

function methods:_display(_, output)
  self.outputs[#self.outputs + 1] = output
end

function methods:_settle(slot, ok, started, completed, value)
  if slot.done then return end
  slot.done, slot.ok, slot.started, slot.completed = true, ok, started, completed or core.now()
  if ok then slot.values = value else slot.error = value end
  self._done = self._done + 1
  self._arrivals[#self._arrivals + 1] = slot
  if self._done == #self._slots then
    self._completed = core.now()
    local waiters = self._waiters
    self._waiters = {}
    for _, fn in ipairs(waiters) do fn() end
  end
end

-- Public methods.

function methods:ready() return self._done == #self._slots end

--- True when every task succeeded; an error when not ready yet.
function methods:successful()
  if not self:ready() then error("AsyncResult:successful(): the result is not ready", 2) end
  for _, s in ipairs(self._slots) do
    if not s.ok then return false end
  end
  return true
end

--- Wait up to `timeout` seconds (forever when nil); true when ready.
function methods:wait(timeout)
  return wait.until_done(function() return self:ready() end, timeout,
    function(fn) self._waiters[#self._waiters + 1] = fn end, 2)
end

local function raise_errors(self)
  local failed = {}
  for _, s in ipairs(self._slots) do
    if not s.ok then failed[#failed + 1] = s.error end
  end
  if #failed == 1 then error(failed[1], 0) end
  if #failed > 1 then error(errors.CompositeError.new(failed), 0) end
end

--- The results: raises the remote error (or a CompositeError of several),
-- or a TimeoutError when `timeout` seconds pass first.
function methods:get(timeout)
  if not self:wait(timeout) then
    error(errors.TimeoutError.new(string.format("%s result not ready after %gs (%d/%d done)",
      self._kind, timeout, self._done, #self._slots)), 2)
  end
  raise_errors(self)
  if self._finish then return self._finish(self._slots, self._single) end
  if self._single then
    local v = self._slots[1].values
    return table.unpack(v, 1, v.n)
  end
  local out = {}
  for i, s in ipairs(self._slots) do out[i] = s.values[1] end
  return out
end

--- Iterate over (engine id, first value or error object) in arrival order,
-- waiting for each.
function methods:iter()
  local i = 0
  return function()
    i = i + 1
    if i > #self._slots then return nil end
    wait.until_done(function() return #self._arrivals >= i end, nil,
      function(fn) self._waiters[#self._waiters + 1] = fn end, 2)
    local s = self._arrivals[i]
    if not s then return nil end
    if s.ok then return s.engine, s.values[1] end
    return s.engine, s.error
  end
end

--- Seconds from the first start to the last completion on the engines.
function methods:wall_time()
  local first, last
  for _, s in ipairs(self._slots) do
    if s.started then first = math.min(first or s.started, s.started) end
    if s.completed then last = math.max(last or s.completed, s.completed) end
  end
  return first and last and last - first or nil
end

--- Seconds of engine time summed over the tasks.
function methods:serial_time()
  local total = 0
  for _, s in ipairs(self._slots) do
    if s.started and s.completed then total = total + (s.completed - s.started) end
  end
  return total
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

local output_dir
local function default_dir()
  if not output_dir then
    output_dir = os.getenv("LPAR_OUTPUT_DIR") or ((os.getenv("TMPDIR") or "/tmp") .. "/lpar-outputs")
    os.execute("mkdir -p '" .. output_dir:gsub("'", "'\\''") .. "'")
  end
  return output_dir
end

--- Wait, then show what the engines produced, labelled as IPython does:
-- "[stdout:0] text" for output, and "[output:2] PATH (WxH)" for display
-- data, which is saved to files in `opts.dir` (default $LPAR_OUTPUT_DIR or
-- $TMPDIR/lpar-outputs). `opts.out` is any object with a write method.
-- Returns the list of saved paths.
function methods:display_outputs(opts)
  self:wait()
  opts = opts or {}
  local out = opts.out or io.stdout
  for _, s in ipairs(self._slots) do
    for _, name in ipairs { "stdout", "stderr" } do
      local text = table.concat(s[name])
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
