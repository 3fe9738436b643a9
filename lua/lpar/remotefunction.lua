--- Remote and parallel functions: ipyparallel's `@view.remote` and
-- `@view.parallel` decorators, in Lua's spelling.
--   local rf = dview:remote(f)       rf(1, 2)  is  dview:apply(f, 1, 2)
--   local pf = dview:parallel(f)     pf:map(list): f on each element, spread
--                                    over the engines; pf(list): f on one
--                                    part of the list per engine (or per
--                                    chunksize items on a load-balanced
--                                    view), the parts' lists part_lists.
-- Both run on the view they were made from, with its flags as they are at
-- the call, and the options given here on top (`block`, and on a
-- load-balanced view any of its flags). DirectView and LoadBalancedView
-- take these functions as their `remote` and `parallel` methods.
local remotefunction = {}

local RemoteFunction = {}
RemoteFunction.__index = RemoteFunction

local ParallelFunction = {}
ParallelFunction.__index = ParallelFunction

local function is_balanced(view) return view.imap ~= nil end

--- The view to run on: `view` with `flags` (checked when the function is
-- made, so a bad flag fails there), or `view` itself without any.
local function flagged(view, flags)
  if next(flags) == nil then return view end
  return view:with(flags)
end

--- Check `flags` against the view's flags, raising at the user's call site.
local function check_flags(what, view, flags, level)
  local ok, err = pcall(view.with, view, flags)
  if not ok then
    error(what .. ": " .. tostring(err):gsub("^.-with: ", ""), level + 1)
  end
end

--- A callable that runs `f` on the view's engines as view:apply(f, ...)
-- does: on a DirectView every target (a list of values over several), on a
-- load-balanced view one task. `opts`: view flags for these calls, such as
-- `block`. Its fields: `func`, `view`. `level`: where errors point, as
-- error's (default 2, the caller).
function remotefunction.remote(view, f, opts, level)
  level = level or 2
  if type(f) ~= "function" then error("remote: expected a function, got " .. type(f), level) end
  if opts ~= nil and type(opts) ~= "table" then
    error("remote: expected a table of view flags, got " .. type(opts), level)
  end
  local flags = {}
  for k, v in pairs(opts or {}) do flags[k] = v end
  check_flags("remote", view, flags, level)
  return setmetatable({ func = f, view = view, _flags = flags }, RemoteFunction)
end

--- Run the function on the engines: what view:apply(f, ...) returns.
function RemoteFunction:__call(...)
  return flagged(self.view, self._flags):apply(self.func, ...)
end

function RemoteFunction:__tostring()
  return "<RemoteFunction on " .. tostring(self.view) .. ">"
end

local PARALLEL_OPTIONS = { chunksize = true, ordered = true }

--- A ParallelFunction over `f` (see the module's summary): `pf:map(list,
-- ...)` calls f on each element (on the elements of several lists side by
-- side), `pf(list, ...)` on parts of the lists. `opts`: `block`, and on a
-- load-balanced view `chunksize`, `ordered` and its other flags. `level`:
-- as remote's.
function remotefunction.parallel(view, f, opts, level)
  level = level or 2
  if type(f) ~= "function" then error("parallel: expected a function, got " .. type(f), level) end
  if opts ~= nil and type(opts) ~= "table" then
    error("parallel: expected a table of options, got " .. type(opts), level)
  end
  local flags, map_opts = {}, {}
  local balanced = is_balanced(view)
  for k, v in pairs(opts or {}) do
    if PARALLEL_OPTIONS[k] then
      if not balanced then
        error(string.format("parallel: %s is for load-balanced views (a DirectView splits the list "
          .. "in one part per engine)", k), level)
      end
      map_opts[k] = v
    else
      flags[k] = v
    end
  end
  if map_opts.chunksize ~= nil and (math.type(map_opts.chunksize) ~= "integer" or map_opts.chunksize < 1) then
    error("parallel: chunksize must be a positive integer", level)
  end
  check_flags("parallel", view, flags, level)
  return setmetatable({ func = f, view = view, _flags = flags, _map = map_opts, _balanced = balanced },
    ParallelFunction)
end

--- The lists given to a ParallelFunction, checked: at least one, all of one length.
local function lists_of(what, level, ...)
  local n = select("#", ...)
  if n == 0 then error(what .. ": expected a list", level + 1) end
  local lists, len = { ... }, nil
  for i = 1, n do
    local l = lists[i]
    if type(l) ~= "table" then
      error(string.format("%s: argument %d is %s, not a list", what, i, type(l)), level + 1)
    end
    local li = l.n or #l
    if len and li ~= len then
      error(string.format("%s: the lists have different lengths (%d and %d)", what, len, li), level + 1)
    end
    len = li
  end
  return lists, n, len
end

--- The AsyncResult, or its values when blocking (the view's `block`, or
-- the function's own).
local function finish(view, ar)
  if view.block then return ar:get() end
  return ar
end

--- f on each element of the lists, spread over the engines: the results
-- in order (the AsyncResult when not blocking).
function ParallelFunction:map(...)
  local lists, count, len = lists_of("parallel: map", 2, ...)
  local view, f = flagged(self.view, self._flags), self.func
  local items = lists[1]
  if count > 1 then -- the elements of the lists side by side, unpacked for f
    items = {}
    for i = 1, len do
      local t = { n = count }
      for j = 1, count do t[j] = lists[j][i] end
      items[i] = t
    end
    local g = f
    f = function(t) return g(table.unpack(t, 1, t.n)) end
  end
  local ar
  if self._balanced then ar = view:map_async(f, items, self._map) else ar = view:map_async(f, items) end
  return finish(view, ar)
end

--- How many parts `len` items go in: one per engine (never an empty one),
-- or one per `chunksize` items.
local function part_count(self, view, len)
  if self._map.chunksize then return (len + self._map.chunksize - 1) // self._map.chunksize end
  local engines
  if type(view.targets) == "table" then engines = #view.targets
  elseif math.type(view.targets) == "integer" then engines = 1
  else engines = #view.client end
  return math.max(1, math.min(len, engines))
end

--- f on one part of the lists per engine (per task on a load-balanced
-- view): f gets the parts (sub-lists, in order) and returns a list; the
-- lists are part_lists in order. Returns them (the AsyncResult when not
-- blocking, whose get() joins them; iterating it yields each part's list).
function ParallelFunction:__call(...)
  local lists, count, len = lists_of("parallel", 2, ...)
  local view, f = flagged(self.view, self._flags), self.func
  local parts, nparts = {}, part_count(self, view, len)
  local base, extra, pos = len // nparts, len % nparts, 1
  for i = 1, nparts do
    local size = base + (i <= extra and 1 or 0)
    local args = { n = count }
    for j = 1, count do args[j] = table.move(lists[j], pos, pos + size - 1, 1, {}) end
    parts[i] = args
    pos = pos + size
  end
  if len == 0 then parts = {} end
  local function on_part(args)
    local r = f(table.unpack(args, 1, args.n))
    if type(r) ~= "table" then
      error(string.format("parallel: the function returned %s for its part of the list, not a list "
        .. "(pf:map(list) calls it on each element instead)", type(r)), 0)
    end
    return r
  end
  local ar
  if self._balanced then
    ar = view:map_async(on_part, parts, { ordered = self._map.ordered })
  else
    ar = view:map_async(on_part, parts)
  end
  -- get() joins the parts' lists; a failed part stays one error object.
  -- (The result's own get gives a list per part; this one is put over it.)
  local per_part = ar.get
  ar.get = function(result, get_opts)
    local ok, part_lists = pcall(per_part, result, get_opts)
    if not ok then
      if type(part_lists) == "string" then error((part_lists:gsub("^[^\n]-:%d+: ", "")), 2) end
      error(part_lists, 0)
    end
    local out, k = {}, 0
    for _, r in ipairs(part_lists) do
      if type(r) == "table" and getmetatable(r) == nil then
        local n = r.n or #r
        for i = 1, n do out[k + i] = r[i] end
        k = k + n
      else
        k = k + 1
        out[k] = r
      end
    end
    return out
  end
  return finish(view, ar)
end

function ParallelFunction:__tostring()
  return "<ParallelFunction on " .. tostring(self.view) .. ">"
end

return remotefunction
