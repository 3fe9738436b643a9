--- Every public function has a doc comment (LDoc's `---`), so the API
-- reference (config.ld, `ldoc .`) covers all of the API.
--   lua5.4 scripts/check_docs.lua     (from the worktree, after a build)
-- The public API is found by introspection, as a user's tab completion
-- would find it: the fields of `lpar`, the methods of Cluster, Client,
-- DirectView, LoadBalancedView, AsyncResult, the error types, lpar.plot, and
-- lpar.matrix's functions and methods (C, documented in docs/matrix.luadoc).
-- Prints each function without one and exits 1 if there is any.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath

local function read(path)
  local f = assert(io.open(path))
  local text = f:read("a")
  f:close()
  local lines = {}
  for line in (text .. "\n"):gmatch("(.-)\n") do lines[#lines + 1] = line end
  return lines
end

local function escape(s) return (s:gsub("%p", "%%%0")) end

--- The line defining `name` of table `t` in `lines`, as `function t.name(`,
-- `function t:name(`, `t.name =` or `name =` (a field in a table constructor).
local function definition(lines, t, name)
  local n, tn = escape(name), escape(t)
  local patterns = { "^%s*function%s+" .. tn .. "[.:]" .. n .. "%s*%(", "^%s*" .. tn .. "%." .. n .. "%s*=",
                     "^%s*" .. n .. "%s*=" }
  for _, p in ipairs(patterns) do
    for i, line in ipairs(lines) do
      if line:match(p) then return i end
    end
  end
end

--- Does a `---` comment block end on the line above line i?
local function documented(lines, i)
  local j = i - 1
  while j >= 1 and lines[j]:match("^%s*%-%-") do
    if lines[j]:match("^%s*%-%-%-") then return true end
    j = j - 1
  end
  return false
end

local function public_names(t)
  local names = {}
  for k, v in pairs(t) do
    if type(k) == "string" and type(v) == "function" and not k:match("^_") then names[#names + 1] = k end
  end
  table.sort(names)
  return names
end

local missing = 0
local function check(what, t, files, names)
  local sources = {}
  for i, f in ipairs(files) do sources[i] = { path = f, lines = read(f) } end
  for _, name in ipairs(names) do
    local found
    for _, src in ipairs(sources) do
      local i = definition(src.lines, t, name)
      if i then
        found = true
        if not documented(src.lines, i) then
          print(string.format("%s:%d: %s.%s has no doc comment (---)", src.path, i, what, name))
          missing = missing + 1
        end
        break
      end
    end
    if not found then
      print(string.format("%s: %s.%s is not defined where expected", files[1], what, name))
      missing = missing + 1
    end
  end
end

--- The names in a luaL_Reg array `array` of a C file.
local function registered(path, array)
  local text = table.concat(read(path), "\n")
  local body = text:match("luaL_Reg%s+" .. array .. "%[%]%s*=%s*(%b{})")
  local names = {}
  for name in body:gmatch('{"([%w_]+)"') do
    if not name:match("^_") then names[#names + 1] = name end
  end
  return names
end

local lpar = require "lpar"
check("lpar", "lpar", { "lua/lpar/init.lua" }, public_names(lpar))
check("Cluster", "Cluster", { "lua/lpar/cluster.lua" }, public_names(require "lpar.cluster"))
local Client = require "lpar.client"
check("Client", "Client", { "lua/lpar/client.lua" }, public_names(Client))
check("Client", "methods", { "lua/lpar/client.lua" }, public_names(Client.methods))
check("DirectView", "DirectView", { "lua/lpar/view.lua" }, public_names(require "lpar.view"))
check("LoadBalancedView", "LoadBalancedView", { "lua/lpar/balanced.lua" }, public_names(require "lpar.balanced"))
local AsyncResult = require "lpar.asyncresult"
check("AsyncResult", "methods", { "lua/lpar/asyncresult.lua" }, public_names(AsyncResult.methods))
check("errors", "errors", { "lua/lpar/errors.lua" }, public_names(lpar.errors))
check("lpar.plot", "plot", { "lua/lpar/plot.lua" }, public_names(require "lpar.plot"))
check("matrix", "matrix", { "docs/matrix.luadoc" }, public_names(require "lpar.matrix"))
check("matrix", "Matrix", { "docs/matrix.luadoc" }, registered("lua/binding/matrix.c", "methods"))

-- Every environment variable lpar reads is described in lpar(1).
local man = table.concat(read("docs/lpar.1"), "\n")
local undocumented = 0
-- getenv("X"), os.getenv("X"), env("X"), env_int("X"), and any "LPAR_X" string (place.c's table).
local search = "grep -rhoE --include=*.c --include=*.lua "
  .. "'(getenv|env|env_int)\\(\"[A-Z_0-9]+\"|\"LPAR_[A-Z_0-9]+' core engines lua"
local pipe = assert(io.popen(search))
local seen = {}
for name in pipe:read("a"):gmatch('"([A-Z_0-9]+)') do
  if not seen[name] then
    seen[name] = true
    if not man:find(name, 1, true) then
      print(string.format("environment variable %s is read but not described in docs/lpar.1", name))
      undocumented = undocumented + 1
    end
  end
end
pipe:close()
if not next(seen) then
  print("found no environment variables: the search is broken")
  undocumented = 1
end

if missing > 0 then print(missing .. " public functions without a doc comment") end
if missing > 0 or undocumented > 0 then os.exit(1) end
print("every public function has a doc comment, every environment variable lpar reads is in lpar(1)")
