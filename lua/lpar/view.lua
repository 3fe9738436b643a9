--- DirectView: calls addressed to a fixed set of engines.
-- Flags are fields (`block`, default false as in ipyparallel); `view:with{}`
-- returns a view with flags changed, and fixed-arity methods take a
-- trailing options table for one call: `dview:execute(code, {block = true})`.
local core = require "lpar.core"
local errors = require "lpar.errors"
local viewflags = require "lpar.viewflags"
local AsyncResult = require "lpar.asyncresult"
local wait = require "lpar.wait"

local DirectView = {}
DirectView.__index = DirectView

local EXECUTE, APPLY, PUSH, PULL = core.EXECUTE, core.APPLY, core.PUSH, core.PULL
local FLAGS = { block = true }
local options = require "lpar.options"

local function check_name(name)
  if type(name) ~= "string" then error("vars: names must be strings, got " .. type(name), 3) end
end

--- `view.vars`: the engines' globals by name, as ipyparallel's `view['x']`.
-- `view.vars.x` pulls x (a list over several engines; a name not defined
-- raises a NameError, as pull does) and `view.vars.x = v` pushes it
-- (nil removes it); both wait, so an error shows at that line.
local function vars_of(view)
  return setmetatable({}, {
    __index = function(_, name)
      check_name(name)
      return view:pull(name, { block = true })
    end,
    __newindex = function(_, name, value)
      check_name(name)
      if value == nil then
        view:apply_async(function(n) _G[n] = nil end, name):get()
      else
        view:push({ [name] = value }, { block = true })
      end
    end,
    __tostring = function() return "<vars of " .. tostring(view) .. ">" end,
  })
end

--- A copy of this view with the given flags changed.
function DirectView:with(flags)
  return viewflags.with(self, flags, FLAGS)
end

-- The results a view handed out, for DirectView:wait: weak values, so a
-- finished result the user dropped need not be kept (a pending one is held
-- by the hub until it settles). A list, not a table keyed by results: such
-- a table is an ephemeron, which every collection walks again and again,
-- and hashing a result into it cost half a microsecond a call. `n` results
-- were added; those before `first` are known done (DirectView:wait); when
-- the list has doubled since it was last compacted, the collected go and
-- the known done with them (amortized, whatever the user keeps).
-- Copies of the view (view:with) share it.
local WEAK_VALUES = { __mode = "v" }

local function outstanding_list() return setmetatable({ n = 0, first = 1, compact_at = 64 }, WEAK_VALUES) end

local ready = AsyncResult.methods.ready

local function add_outstanding(out, ar)
  local n = out.n + 1
  out[n], out.n = ar, n
  if n < out.compact_at then return end
  local k, first = 0, out.first
  for i = 1, n do -- k <= i: out[k] is behind the walk
    local r = out[i]
    out[i] = nil
    if r and i >= first then
      k = k + 1
      out[k] = r
    end
  end
  out.n, out.first, out.compact_at = k, 1, math.max(64, 2 * k)
end

--- A view of `client` over `spec` (see lpar.targets); nil means every
-- engine, resolved at each call so restarted engines are included.
function DirectView.new(client, spec)
  local self = setmetatable({ client = client, block = false, _outstanding = outstanding_list() },
    DirectView)
  if spec == nil then
    self.targets = "all"
  else
    local ids = client._hub:resolve_targets(spec, 3)
    self._ids, self._spec = ids, spec
    self.targets = math.type(spec) == "integer" and ids[1] or ids
  end
  self.vars = vars_of(self)
  return self
end

function DirectView:__tostring() return viewflags.describe("DirectView", self.targets) end

local function flag(self, opts, name)
  if opts and opts[name] ~= nil then return opts[name] end
  return self[name]
end

function DirectView:_targets(level)
  if self._ids then
    -- A slice may name no engine (as Python's may be empty), but a call
    -- sent to no engine would do nothing silently.
    if #self._ids == 0 then
      error(string.format("no engines in targets %s (engines up: %s)",
        viewflags.describe_spec(self._spec), table.concat(self.client._hub:ids_shared(), " ")),
        level + 1)
    end
    return self._ids
  end
  local ids = self.client._hub:ids_shared()
  if #ids == 0 then error("no engines are running", level + 1) end
  return ids
end

local function single(self) return math.type(self.targets) == "integer" end

--- Ctrl-C while waiting on `ar`: interrupt its tasks still running.
local function interrupt_slots(ar)
  for _, s in ipairs(ar._slots) do
    if not s.done and s.id then ar._hub:interrupt_task(s.engine, s.id) end
  end
end

--- What the hub reports a map's chunk to: it forwards to `ar`, keeping
-- the chunk's list of results as the slot's values (not the reply's packed
-- values), as a load-balanced map's chunks do, for ar:iter().
local function chunk_record(ar)
  return {
    _settle = function(_, slot, ok, started, completed, value)
      if ok then value = value[1] end
      ar:_settle(slot, ok, started, completed, value)
    end,
    _stream = function(_, slot, name, text) ar:_stream(slot, name, text) end,
    _display = function(_, slot, output) ar:_display(slot, output) end,
  }
end

local submit -- it records itself with each result, for rc:resubmit

-- Send one request per target, with the values `per_target(i, n)` gives
-- for the i-th of n targets, or else the same `...` to all (encoded once,
-- and sent once to a controller, Hub:submit_many). `finish` turns
-- the settled slots into get()'s values. Raises at the user's call site.
function submit(self, kind, mtype, root, finish, per_target, ...)
  local hub = self.client._hub
  local ids = self:_targets(3)
  for _, id in ipairs(ids) do
    local gone = hub:unavailable(id)
    if gone then error(gone, 3) end
  end
  local ar = AsyncResult.new(kind, { single = single(self), finish = finish })
  local record = kind == "map" and chunk_record(ar) or nil
  ar._hub, ar._interrupt = hub, interrupt_slots
  if not per_target and #ids > 1 then
    -- One request for all: encoded once, and once over each link.
    local slots = {}
    for i, id in ipairs(ids) do slots[i] = ar:_slot(id) end
    local errs = hub:submit_many(ids, mtype, root, slots, ...)
    local failed = 0
    for _ in pairs(errs) do failed = failed + 1 end
    if failed == #ids then error(errs[1], 3) end -- it reached none
    for i, err in pairs(errs) do ar:_settle(slots[i], false, nil, nil, err) end
    add_outstanding(self._outstanding, ar)
    self.client:_track(ar, submit, self, kind, mtype, root, finish, per_target, ...) -- for rc:resubmit
    return ar
  end
  for i, id in ipairs(ids) do
    local slot = ar:_slot(id)
    if record then slot.ar = record end
    local ok, err
    if per_target then
      ok, err = hub:submit(id, mtype, root, slot, per_target(i, #ids))
    else
      ok, err = hub:submit(id, mtype, root, slot, ...)
    end
    if not ok then
      if i == 1 then error(err, 3) end
      -- Already sent to some engines: fail the rest, keep what was sent.
      ar:_settle(slot, false, nil, nil, err)
    end
  end
  add_outstanding(self._outstanding, ar)
  self.client:_track(ar, submit, self, kind, mtype, root, finish, per_target, ...) -- for rc:resubmit
  return ar
end

local function finish_call(self, ar, opts, blocking_returns_ar)
  if not flag(self, opts, "block") then return ar end
  if blocking_returns_ar then
    ar:get()
    return ar
  end
  return ar:get()
end

--- Run a chunk of Lua code in each engine's globals. Returns the
-- AsyncResult (waited for when blocking, as ipyparallel does).
function DirectView:execute(code, opts)
  options.check("execute", opts, FLAGS)
  if type(code) ~= "string" then error("execute: code must be a string", 2) end
  local ar = submit(self, "execute", EXECUTE, "code", function() end, nil, code)
  return finish_call(self, ar, opts, true)
end

--- Run a Lua file on the engines (read here, sent as code).
function DirectView:run(path, opts)
  options.check("run", opts, FLAGS)
  local f, err = io.open(path, "rb")
  if not f then error("run: " .. err, 2) end
  local code = f:read("a")
  f:close()
  local ar = submit(self, "execute", EXECUTE, "code", function() end, nil,
    "--[[" .. path .. "]] " .. code)
  return finish_call(self, ar, opts, true)
end

local ONE_ENGINE = { single = true }
-- Called as functions, not methods: a result's and a client's methods are
-- found through an __index function, a call of its own at each look.
local new_slot = AsyncResult.methods._slot
local track -- Client's _track (lpar.client requires this module: looked up once, on first use)

local apply_one -- it records itself with each result, for rc:resubmit

--- f(...) on the one engine of a single-engine view: submit's work for
-- that case alone, without its loops and per-call tables (the common
-- `rc[i]:apply_async(f, x)` made many times over).
function apply_one(self, f, ...)
  local hub = self.client._hub
  local id = self.targets
  local ar = AsyncResult.new("apply", ONE_ENGINE)
  ar._hub, ar._interrupt = hub, interrupt_slots
  -- An engine that is down fails the call here (Hub:submit says how it went).
  local ok, err = hub:submit(id, APPLY, "args", new_slot(ar, id), f, ...)
  if not ok then error(err, 3) end
  add_outstanding(self._outstanding, ar)
  track = track or require("lpar.client").methods._track
  track(self.client, ar, apply_one, self, f, ...) -- for rc:resubmit
  return ar
end

--- f(...) on every target, not waiting: the AsyncResult.
function DirectView:apply_async(f, ...)
  if type(f) ~= "function" then error("apply: expected a function, got " .. type(f), 2) end
  if math.type(self.targets) == "integer" then return apply_one(self, f, ...) end -- single(self)
  return submit(self, "apply", APPLY, "args", nil, nil, f, ...)
end

--- f(...) on every target, waiting: its values (a list over several targets).
function DirectView:apply_sync(f, ...)
  if type(f) ~= "function" then error("apply: expected a function, got " .. type(f), 2) end
  return submit(self, "apply", APPLY, "args", nil, nil, f, ...):get()
end

--- f(...) on every target: the AsyncResult, or the values when `block`.
function DirectView:apply(f, ...)
  if type(f) ~= "function" then error("apply: expected a function, got " .. type(f), 2) end
  local ar = submit(self, "apply", APPLY, "args", nil, nil, f, ...)
  if self.block then return ar:get() end
  return ar
end

--- Set globals on the engines from a table of name = value.
function DirectView:push(values, opts)
  options.check("push", opts, FLAGS)
  if type(values) ~= "table" then error("push: expected a table of name = value", 2) end
  for k in pairs(values) do
    if type(k) ~= "string" then error("push: names must be strings, got " .. type(k), 2) end
  end
  local ar = submit(self, "push", PUSH, "push", function() end, nil, values)
  return finish_call(self, ar, opts)
end

--- Raise a NameError (a RemoteError per engine, several in a
-- CompositeError) for the names in `list` that an engine does not have.
local function check_defined(slots, list)
  local missing = {}
  for _, s in ipairs(slots) do
    for i, name in ipairs(list) do
      if s.values[i] == nil then
        missing[#missing + 1] = errors.RemoteError.new(s.engine, "pull",
          { message = string.format("NameError: name '%s' is not defined", name) }, s.id)
        break
      end
    end
  end
  if #missing == 1 then error(missing[1], 0) end
  if #missing > 1 then error(errors.CompositeError.new(missing), 0) end
end

--- Read globals: a name gives its value, a list of names a list of values;
-- per engine on a multi-engine view. A name not defined (nil) on an engine
-- raises a NameError naming it, as in ipyparallel.
function DirectView:pull(names, opts)
  options.check("pull", opts, FLAGS)
  local list = type(names) == "table" and names or { names }
  for i, n in ipairs(list) do
    if type(n) ~= "string" then error(string.format("pull: name %d is not a string", i), 2) end
  end
  local many = type(names) == "table"
  local finish = function(slots, one)
    check_defined(slots, list)
    local function value(s)
      if many then return table.move(s.values, 1, s.values.n, 1, {}) end
      return s.values[1]
    end
    if one then return value(slots[1]) end
    local out = {}
    for i, s in ipairs(slots) do out[i] = value(s) end
    return out
  end
  local ar = submit(self, "pull", PULL, "pull", finish, nil, table.unpack(list))
  return finish_call(self, ar, opts)
end

--- Split `list` into contiguous chunks, as even as possible (the first
-- chunks one longer), one per target.
local function partition(list, parts)
  local n = list.n or #list
  local base, extra = n // parts, n % parts
  local chunks, pos = {}, 1
  for i = 1, parts do
    local len = base + (i <= extra and 1 or 0)
    chunks[i] = table.move(list, pos, pos + len - 1, 1, {})
    pos = pos + len
  end
  return chunks
end

local function concat_lists(slots, one)
  if one then return slots[1].values[1] end
  local out, k = {}, 0
  for _, s in ipairs(slots) do
    local part = s.values[1]
    local n = s.values[2] or (type(part) == "table" and #part or 0)
    for j = 1, n do out[k + j] = part[j] end
    k = k + n
  end
  return out
end

--- Distribute `list` over the targets as global `name`, in contiguous chunks.
function DirectView:scatter(name, list, opts)
  options.check("scatter", opts, FLAGS)
  if type(name) ~= "string" then error("scatter: name must be a string", 2) end
  if type(list) ~= "table" then error("scatter: expected a list", 2) end
  local chunks = partition(list, #self:_targets(2))
  local ar = submit(self, "scatter", PUSH, "scatter", function() end,
    function(i) return { [name] = chunks[i] } end)
  return finish_call(self, ar, opts)
end

--- Collect the lists named `name` from the targets into one list.
function DirectView:gather(name, opts)
  options.check("gather", opts, FLAGS)
  if type(name) ~= "string" then error("gather: name must be a string", 2) end
  local ar = submit(self, "gather", APPLY, "gather", concat_lists, nil,
    function(n) local v = _G[n]; return v, type(v) == "table" and #v or 0 end, name)
  return finish_call(self, ar, opts)
end

--- A map's chunks' lists of results (see chunk_record), joined in order;
-- a failed chunk gives its error per element (get{return_errors = true}).
local function join_chunks(slots)
  local out, k = {}, 0
  for _, s in ipairs(slots) do
    for j = 1, s.count do
      if s.ok then out[k + j] = s.values[j] else out[k + j] = s.error end
    end
    k = k + s.count
  end
  return out
end

local function map_chunk(f, chunk)
  local out = {}
  for i = 1, #chunk do out[i] = f(chunk[i]) end
  return out, #chunk
end

--- f over `list`, in contiguous chunks on the targets; the results in order.
function DirectView:map_async(f, list)
  if type(f) ~= "function" then error("map: expected a function, got " .. type(f), 2) end
  if type(list) ~= "table" then error("map: expected a list", 2) end
  local chunks = partition(list, #self:_targets(2))
  local ar = submit(self, "map", APPLY, "map", join_chunks, function(i) return map_chunk, f, chunks[i] end)
  -- Each slot's element count, for ar:iter() to yield elements as it does
  -- on a load-balanced map.
  for i, s in ipairs(ar._slots) do s.count, s.chunked = #chunks[i], true end
  ar._ordered = true
  return ar
end

--- map_async, waited for: the results in order.
function DirectView:map_sync(f, list)
  return self:map_async(f, list):get()
end

--- f over `list`: the results when blocking (the view's `block`, or
-- opts.block), else the AsyncResult.
function DirectView:map(f, list, opts)
  options.check("map", opts, FLAGS)
  local ar = self:map_async(f, list)
  if flag(self, opts, "block") then return ar:get() end
  return ar
end

--- Import modules here and on the targets, under the same global names:
-- sync_imports{ matrix = "lpar.matrix" } binds `matrix`, and
-- sync_imports{ "lpar.matrix" } binds the last name component, `matrix`.
-- Says what it imported where (opts.quiet to keep still); returns the names.
function DirectView:sync_imports(spec, opts)
  options.check("sync_imports", opts, { quiet = true })
  if type(spec) ~= "table" then error("sync_imports: expected a table of name = \"module\"", 2) end
  local names, code = {}, {}
  for k, v in pairs(spec) do
    if type(v) ~= "string" then error("sync_imports: module names must be strings", 2) end
    local name = type(k) == "string" and k or v:match("([%a_][%w_]*)$")
    if not name or not name:match("^[%a_][%w_]*$") then
      error(string.format("sync_imports: cannot bind %q to a global name", tostring(k)), 2)
    end
    local ok, mod = pcall(require, v)
    if not ok then error(string.format("sync_imports: %s", mod), 2) end
    _G[name] = mod
    names[#names + 1] = name
    code[#code + 1] = string.format("%s = require %q", name, v)
    if not (opts and opts.quiet) then
      io.stdout:write(string.format("importing %s as %s here and on engine(s) %s\n", v, name,
        table.concat(self:_targets(2), " ")))
    end
  end
  self:execute(table.concat(code, "\n"), { block = true })
  return names
end

--- A callable running `f` on this view's engines, as ipyparallel's
-- `@view.remote`: `dview:remote(f)(x)` is `dview:apply(f, x)`; `opts`: view
-- flags for its calls, such as `block` (see lpar.remotefunction).
function DirectView:remote(f, opts) return require("lpar.remotefunction").remote(self, f, opts, 3) end

--- A ParallelFunction over `f`, as ipyparallel's `@view.parallel`:
-- `pf:map(list)` calls f on each element, spread over the engines, and
-- `pf(list)` calls f on one part of the list per engine and joins the
-- lists it returns. `opts`: `block` (see lpar.remotefunction).
function DirectView:parallel(f, opts) return require("lpar.remotefunction").parallel(self, f, opts, 3) end

--- Make this the view lpar.px and the prompt's %px run on.
function DirectView:activate()
  require("lpar.px").activate(self)
  return self
end

--- Wait for every result this view has handed out; true when all are done.
function DirectView:wait(timeout)
  local out = self._outstanding
  local ok = wait.until_done(function()
    for i = out.first, out.n do
      local ar = out[i]
      if ar and not ready(ar) then return false end
      out.first = i + 1
    end
    return true
  end, timeout, nil, 2)
  return ok
end

return DirectView
