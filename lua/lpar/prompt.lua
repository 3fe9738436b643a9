--- The interactive prompt: `lpar` or `lpar -n 4`.
-- Lua chunks as lua5.4's prompt takes them (continued with ">>" while
-- incomplete, expression values printed), libedit line editing with history
-- in the lpar directory, and IPython's magics: %px, %%px, %autopx,
-- %pxresult, %timeit, %%timeit, %lsmagic, %help.
local lpar = require "lpar"
local px = require "lpar.px"
local uv = require "luv"
local wait = require "lpar.wait"

local prompt = {}

local MAGICS = {
  ["%px"] = "%px CODE: run CODE on the active view (all engines unless activated)",
  ["%%px"] = "%%px [--targets T] [--local] [--block|--noblock] [--group-outputs engine|order]:"
    .. " run the cell (lines until a blank one) on the engines",
  ["%autopx"] = "%autopx: send every line to the engines, until %autopx again",
  ["%pxresult"] = "%pxresult: show the result of the last non-blocking %px",
  ["%timeit"] = "%timeit [-n N] [-r R] STATEMENT: time a Lua statement (or %%timeit for a cell)",
  ["%lsmagic"] = "%lsmagic: list the magics",
  ["%help"] = "%help: this help",
}

--- A readable, abbreviated rendering of a value, as the prompt prints it.
local function show(v, depth, seen)
  depth, seen = depth or 0, seen or {}
  if type(v) == "string" then
    -- Long or binary strings (an image's bytes, say) are cut, with their size.
    if #v > 80 or v:find("[%z\1-\8\14-\31\127-\255]") then
      local head = v:sub(1, 24):gsub("[^%w%p ]", ".")
      return string.format("%q... (%d bytes)", head, #v)
    end
    return string.format("%q", v)
  end
  if type(v) ~= "table" or getmetatable(v) and getmetatable(v).__tostring then return tostring(v) end
  if seen[v] then return "<cycle>" end
  if depth >= 2 then return "{...}" end
  seen[v] = true
  local parts, n = {}, 0
  for i, x in ipairs(v) do
    n = n + 1
    if n > 10 then parts[#parts + 1] = "..." break end
    parts[#parts + 1] = show(x, depth + 1, seen)
    local _ = i
  end
  local len = #v
  local keys = {}
  for k in pairs(v) do
    if not (math.type(k) == "integer" and k >= 1 and k <= len) then keys[#keys + 1] = k end
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for i, k in ipairs(keys) do
    if n + i > 12 then parts[#parts + 1] = "..." break end
    local key = type(k) == "string" and k:match("^[%a_][%w_]*$") and k or "[" .. show(k, 2) .. "]"
    parts[#parts + 1] = key .. " = " .. show(v[k], depth + 1, seen)
  end
  seen[v] = nil
  return "{" .. table.concat(parts, ", ") .. "}"
end
prompt.show = show

local function lpar_dir()
  return os.getenv("LPAR_DIR") or ((os.getenv("HOME") or ".") .. "/.lpar")
end

--- Split "--targets 0::2 --local" style options off a magic's arguments.
local function parse_px_options(args)
  local opts, rest = { block = true }, {}
  local words = {}
  for w in args:gmatch("%S+") do words[#words + 1] = w end
  local i = 1
  while i <= #words do
    local w = words[i]
    if w == "--targets" or w == "--target" or w == "-t" then
      i = i + 1
      local t = words[i]
      if t == nil then error("%%px: --targets needs a value", 0) end
      opts.targets = (t == "all") and nil or (math.tointeger(tonumber(t)) or t)
    elseif w == "--local" then
      opts.locally = true
    elseif w == "--block" then
      opts.block = true
    elseif w == "--noblock" then
      opts.block = false
    elseif w == "--group-outputs" then
      i = i + 1
      opts.group_outputs = words[i]
      if opts.group_outputs ~= "engine" and opts.group_outputs ~= "order" then
        error("%%px: --group-outputs takes engine or order", 0)
      end
    else
      rest[#rest + 1] = w
    end
    i = i + 1
  end
  return opts, table.concat(rest, " ")
end

local function parse_timeit_options(args)
  local opts = {}
  local rest = args:gsub("^%s*%-n%s+(%d+)", function(n) opts.number = tonumber(n) return "" end)
  rest = rest:gsub("^%s*%-r%s+(%d+)", function(r) opts.rep = tonumber(r) return "" end)
  rest = rest:gsub("^%s*%-n%s+(%d+)", function(n) opts.number = tonumber(n) return "" end)
  return opts, rest
end

--- Load a chunk the way lua5.4's prompt does: first as an expression.
local function load_chunk(code)
  local f = load("return " .. code, "=stdin")
  if f then return f, nil, true end
  local err
  f, err = load(code, "=stdin")
  return f, err, false
end

local function incomplete(err)
  return err and err:find("<eof>$") ~= nil
end

--- One prompt session. `io` lets the specs drive it: readline(prompt),
-- add_history(line), write(text).
local Session = {}
Session.__index = Session

function Session:write(...) io.stdout:write(...) end

function Session:px(code, opts)
  if not self.rc then
    self:write("no engines: start the prompt with `lpar -n N`, or make a Cluster\n")
    return
  end
  opts = opts or { block = true }
  -- Ctrl-C while a blocking cell runs interrupts the engines' code (the wait does).
  local ok, ar = pcall(px.run, code, opts, self.rc)
  if not ok then
    px.show_error(ar)
    return
  end
  if opts.block == false then
    self.last_px = ar
    self:write(string.format("<AsyncResult: execute on %d engines; %%pxresult shows it>\n", #ar))
  end
end

function Session:read_cell()
  local lines = {}
  while true do
    local line = self.rl.readline(">> ")
    if line == nil or line:match("^%s*$") then break end
    lines[#lines + 1] = line
  end
  return table.concat(lines, "\n")
end

function Session:magic(line)
  local name, args = line:match("^(%%%%?[%w_]+)%s*(.*)$")
  if name == "%px" then
    self:px(args)
  elseif name == "%%px" then
    local ok, opts = pcall(parse_px_options, args)
    if not ok then self:write(opts, "\n") return end
    self:px(self:read_cell(), opts)
  elseif name == "%autopx" then
    self.autopx = not self.autopx
    self:write(self.autopx and "%autopx enabled: lines go to the engines\n" or "%autopx disabled\n")
  elseif name == "%pxresult" then
    if not self.last_px then self:write("no non-blocking %px yet\n") return end
    local ok, err = pcall(self.last_px.wait, self.last_px)
    if not ok then px.show_error(err) return end
    self.last_px:display_outputs()
    if not self.last_px:successful() then pcall(self.last_px.get, self.last_px) end
  elseif name == "%timeit" or name == "%%timeit" then
    local opts, code = parse_timeit_options(args)
    if name == "%%timeit" then code = self:read_cell() end
    local f, err = load(code, "=timeit")
    if not f then self:write(err, "\n") return end
    local ok, terr = pcall(lpar.timeit, f, opts)
    if not ok then self:write(tostring(terr), "\n") end
  elseif name == "%lsmagic" then
    local names = {}
    for k in pairs(MAGICS) do names[#names + 1] = k end
    table.sort(names)
    self:write("Available magics: ", table.concat(names, " "), "\n")
  elseif name == "%help" then
    local names = {}
    for k in pairs(MAGICS) do names[#names + 1] = k end
    table.sort(names)
    for _, k in ipairs(names) do self:write(MAGICS[k], "\n") end
    self:write("Lua chunks run here; rc is the Client and dview a blocking view of all engines.\n")
  else
    self:write(string.format("unknown magic %s (%%lsmagic lists them)\n", tostring(name or line)))
  end
end

function Session:lua(first)
  local code = first
  local f, err, expression = load_chunk(code)
  while not f and incomplete(err) do
    local more = self.rl.readline(">> ")
    if more == nil then return end
    self.rl.add_history(more)
    code = code .. "\n" .. more
    f, err, expression = load_chunk(code)
  end
  if not f then
    self:write(err, "\n")
    return
  end
  local results = table.pack(xpcall(f, debug.traceback))
  if not results[1] then
    local e = results[2]
    if type(e) == "table" and getmetatable(e) then px.show_error(e) else self:write(tostring(e), "\n") end
    return
  end
  if expression and results.n > 1 then
    local parts = {}
    for i = 2, results.n do parts[#parts + 1] = show(results[i]) end
    self:write(table.concat(parts, "\t"), "\n")
  end
end

function Session:handle(line)
  if line:match("^%s*%%") then
    local stripped = line:match("^%s*(.-)%s*$")
    if self.autopx and stripped == "%autopx" then return self:magic(stripped) end
    return self:magic(stripped)
  end
  if self.autopx then return self:px(line) end
  if line:match("^%s*$") then return end
  return self:lua(line)
end

--- Completion of globals and fields: "rc:vi" -> "rc:view", "math.s" -> ...
local function completer(word)
  local base, sep, partial = word:match("^(.-)([%.:])([%w_]*)$")
  local t, prefix = _G, ""
  if base then
    t = _G
    for name in base:gmatch("[^%.:]+") do
      t = type(t) == "table" and rawget(t, name) or nil
      if t == nil then return {} end
    end
    prefix = base .. sep
  else
    partial = word
  end
  local out, seen = {}, {}
  local function scan(tbl)
    if type(tbl) ~= "table" then return end
    for k, v in pairs(tbl) do
      if type(k) == "string" and k:sub(1, #partial) == partial and not seen[k]
          and (sep ~= ":" or type(v) == "function") then
        seen[k] = true
        out[#out + 1] = prefix .. k
      end
    end
  end
  scan(t)
  local mt = getmetatable(t)
  if mt and type(mt.__index) == "table" then scan(mt.__index) end
  table.sort(out)
  return out
end

function prompt.main(opts)
  local rl = require "lpar.readline"
  local self = setmetatable({ rl = rl }, Session)
  local dir = lpar_dir()
  os.execute("mkdir -p '" .. dir:gsub("'", "'\\''") .. "' 2>/dev/null")
  local history = dir .. "/history"
  rl.read_history(history)
  rl.set_completer(completer)
  _G.lpar = lpar
  if opts.profile then
    local ok, rc = pcall(lpar.Client, { profile = opts.profile })
    if not ok then
      io.stderr:write("lpar: ", tostring(rc), "\n")
      os.exit(1, true)
    end
    self.rc = rc
    _G.rc, _G.dview = rc, rc:view()
    _G.dview.block = true
    self:write(string.format("lpar %s: %d engines of cluster %q; rc is the Client, dview a blocking view of all.\n",
      lpar.version, #rc, opts.profile))
  elseif opts.n and opts.n > 0 then
    local cluster = lpar.Cluster { n = opts.n }
    local ok, rc = pcall(cluster.start_and_connect, cluster)
    if not ok then
      io.stderr:write("lpar: ", tostring(rc), "\n")
      return
    end
    self.rc, self.cluster = rc, cluster
    _G.rc, _G.dview = rc, rc:view()
    _G.dview.block = true
    self:write(string.format("lpar %s: %d engines; rc is the Client, dview a blocking view of all.\n",
      lpar.version, #rc))
  else
    self:write(string.format("lpar %s, Lua 5.4 (%%help for the magics; `lpar -n 4` starts engines)\n",
      lpar.version))
  end
  -- Ctrl-C while the prompt waits (get(), wait(), a blocking view call,
  -- %px, %timeit) interrupts the engines' tasks of that call and ends the
  -- wait; the engines keep their state. The tasks are interrupted by the
  -- wait itself, outside this callback, where it may talk to a controller.
  -- At the prompt, Ctrl-C is left to line editing.
  local sigint = uv.new_signal()
  sigint:start("sigint", function()
    if wait.waiting() then
      wait.interrupt()
      self:write("\nKeyboardInterrupt: interrupting the engines\n")
    end
  end)
  while true do
    local line, interrupted = rl.readline(self.autopx and "lpar[px]> " or "lpar> ")
    if line == nil and not interrupted then break end
    line = line or "" -- Ctrl-C at the prompt drops the line, as usual
    if interrupted then self:write("\n") end
    if line:match("%S") then
      rl.add_history(line)
      rl.write_history(history) -- as it goes: a killed prompt keeps its history
    end
    local ok, err = xpcall(self.handle, debug.traceback, self, line)
    if not ok then self:write(tostring(err), "\n") end
    uv.run("nowait") -- serve what arrived meanwhile (timers, late output)
  end
  self:write("\n")
  rl.write_history(history)
  sigint:stop()
  if self.rc then self.rc:close() end
end

prompt.completer = completer
return prompt
