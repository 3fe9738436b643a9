--- lpar.px: run code on the active view, as IPython's %px does, and show
-- what the engines produced the way IPython labels it:
--   [stdout:0] text      output, streamed while a blocking cell runs
--   [0:execute] message  an error, with the remote traceback
--   [output:2] PATH      an image, saved to a file
local errors = require "lpar.errors"

local px = {}

local active -- the view activated last (view:activate()), or nil
local count = 0 -- px runs so far, for IPython's Out[engine:count] labels
local clients = setmetatable({}, { __mode = "v" }) -- the latest Client, weakly

-- The magics' defaults, as %pxconfig sets them: targets (nil: the active
-- view), block, verbose (say where each %px runs).
local config = { block = true, verbose = false }

--- A copy of the magics' defaults: {targets =, block =, verbose =}.
function px.config()
  return { targets = config.targets, block = config.block, verbose = config.verbose }
end

--- Change the magics' defaults (%pxconfig): `changes.targets` ("all" for
-- the active view again), `block`, `verbose`. Targets are checked against
-- `client`'s engines first: on an error nothing changes.
function px.configure(changes, client)
  client = client or clients[1]
  local t = changes.targets
  if t ~= nil and t ~= "all" and client then
    local ok, err = pcall(require("lpar.targets").resolve, t, client._hub:ids_shared())
    if not ok then error("%pxconfig: " .. tostring(err), 0) end
  end
  if t ~= nil then config.targets = t ~= "all" and t or nil end
  if changes.block ~= nil then config.block = changes.block end
  if changes.verbose ~= nil then config.verbose = changes.verbose end
end

--- `opts` of a %px or %%px, with what it does not say taken from the
-- defaults (%pxconfig).
function px.magic_options(opts)
  opts = opts or {}
  if opts.targets == nil then opts.targets = config.targets end
  if opts.block == nil then opts.block = config.block end
  if opts.verbose == nil then opts.verbose = config.verbose end
  return opts
end

--- "all", or the ids "0,2" of a target spec resolved against `client`.
local function describe_targets(view)
  local t = view.targets
  if type(t) == "table" then return table.concat(t, ",") end
  return tostring(t)
end

function px.activate(view) active = view end
function px.set_client(client) clients[1] = client end

function px.active_view(client)
  if active then return active end
  client = client or clients[1]
  if client then return client:view() end
  return nil
end

--- Errors with the same kind, message and traceback, one group each, in
-- order: {err = the first, engines = {ids}}, for "[0,1,2,3:execute] boom".
function px.group_errors(list)
  local groups, order = {}, {}
  for _, e in ipairs(list) do
    local remote = getmetatable(e) == errors.RemoteError
    local key = remote and table.concat({ e.kind, e.message, e.traceback or "" }, "\0") or e
    local g = groups[key]
    if not g then
      g = { err = e, engines = {} }
      groups[key] = g
      order[#order + 1] = g
    end
    if remote then g.engines[#g.engines + 1] = e.engine end
  end
  return order
end

--- The label of a group of remote errors: "[0,1,2,3:execute] message".
function px.error_label(group)
  return string.format("[%s:%s] %s", table.concat(group.engines, ","), group.err.kind, group.err.message)
end

--- Show an error object as IPython does: one block per engine, the same
-- error from several engines once.
function px.show_error(err, out)
  out = out or io.stdout
  local list = getmetatable(err) == errors.CompositeError and err.errors or { err }
  for _, g in ipairs(px.group_errors(list)) do
    if getmetatable(g.err) == errors.RemoteError then
      out:write(px.error_label(g), "\n")
      if g.err.traceback then out:write(g.err.traceback, "\n") end
    else
      out:write(tostring(g.err), "\n")
    end
  end
end

--- `code` made to return its values, when it has any: an expression, a
-- chunk whose last line is an expression after whole statements (IPython's
-- rule: "local y = 3" then "y * 2"), or one ending in a return. Nil for
-- plain statements.
function px.returning(code, name)
  if load("return " .. code, name) then return "return " .. code end
  local prefix, last = code:match("^(.*\n)([^\n]*%S)%s*$")
  -- Only when what comes before is whole: "for ... do\n print(i) end" is not.
  if last and not last:match("^%s*%-%-") and load(prefix, name) and load(prefix .. "return " .. last, name) then
    return prefix .. "return " .. last
  end
  local tail = last or code
  if (tail:match("^%s*return[%s(]") or tail:match("^%s*return$")) and load(code, name) then return code end
  return nil
end

local function label_lines(engine, name, text, out)
  local label = string.format("[%s:%d] ", name, engine)
  text = text:gsub("\n$", "")
  out:write(label, (text:gsub("\n", "\n" .. label)), "\n")
end

--- Run `code` on the active view (or opts.targets of `client`).
-- opts: targets, block (default true), locally (also run it here),
-- verbose (first say where it runs, "Parallel execution on engine(s): all"),
-- group_outputs ("engine": each engine's output together, after the end;
-- "order": as it arrives, the default), out (a file to write to),
-- on_error(err) and on_display(output) (instead of printing them).
-- Returns the AsyncResult; errors are shown, not raised, when blocking.
function px.run(code, opts, client)
  opts = opts or {}
  local out = opts.out or io.stdout
  client = client or clients[1]
  local view = opts.targets ~= nil and client and client:view(opts.targets)
    or px.active_view(client)
  if view == nil then error("px: no engines (start a cluster, or activate a view)", 2) end
  local block = opts.block
  if block == nil then block = true end
  if opts.verbose then -- as ipyparallel's %pxconfig --verbose says it
    out:write(string.format("%sarallel execution on engine(s): %s\n", block and "P" or "Async p",
      describe_targets(view)))
  end
  -- An expression's values come back and show as Out[ID:n], as in IPython.
  local source = px.returning(code, "=[execute]")
  local expression = source ~= nil
  local ar
  if expression then
    ar = view:apply_async(function(c) return assert(load(c, "=[execute]"))() end, source)
    ar._kind = "execute"
    for _, slot in ipairs(ar._slots) do slot.kind = "execute" end
  else
    ar = view:execute(code, { block = false })
  end
  count = count + 1
  local n = count
  local streamed = false
  if block and opts.group_outputs ~= "engine" then
    -- Stream output as it arrives, labelled; what came before is shown now.
    streamed = true
    for _, s in ipairs(ar._slots) do
      for _, name in ipairs { "stdout", "stderr" } do
        if s[name] then label_lines(s.engine, name, table.concat(s[name]), out) end
      end
    end
    ar.on_output = function(engine, name, text) label_lines(engine, name, text, out) end
  end
  if not block then
    if opts.locally then px.run_locally(code) end
    return ar
  end
  local ok, err = pcall(ar.wait, ar, opts.timeout)
  ar.on_output = false
  if not ok then error(err, 2) end
  if not streamed then
    for _, s in ipairs(ar._slots) do
      for _, name in ipairs { "stdout", "stderr" } do
        local text = s[name] and table.concat(s[name]) or ""
        if text ~= "" then label_lines(s.engine, name, text, out) end
      end
    end
  end
  if opts.on_display then -- the Jupyter kernel shows them inline
    for _, o in ipairs(ar.outputs) do opts.on_display(o) end
  elseif #ar.outputs > 0 then -- images: saved, and listed as [output:ID] PATH (WxH)
    ar:display_outputs { out = { write = function(_, ...)
      local line = table.concat { ... }
      if line:match("^%[output:") then out:write(line) end
    end } }
  end
  if not ar:successful() then
    local failures = {}
    for _, s in ipairs(ar._slots) do
      if not s.ok then failures[#failures + 1] = s.error end
    end
    local failure = #failures == 1 and failures[1] or errors.CompositeError.new(failures)
    if opts.on_error then opts.on_error(failure) else px.show_error(failure, out) end
  end
  if expression then
    local show = require("lpar.prompt").show
    for _, s in ipairs(ar._slots) do
      if s.ok and s.values.n > 0 then
        local parts = {}
        for i = 1, s.values.n do parts[i] = show(s.values[i]) end
        out:write(string.format("Out[%d:%d]: %s\n", s.engine, n, table.concat(parts, "\t")))
      end
    end
  end
  -- --local: the same code here too, after the engines, as IPython does.
  if opts.locally then px.run_locally(code) end
  return ar
end

--- Run code in this process's globals (%%px --local).
function px.run_locally(code)
  local chunk, err = load(code, "=[local]")
  if not chunk then error(err, 2) end
  chunk()
end

return px
