--- Target specifications: which engines a view or a call addresses.
-- `nil`/"all" (every engine), an engine id, a list of ids, or a string:
-- a slice with Python semantics over the client's ids ("0:2", "::2", "1:",
-- "-1") or a comma list ("0,2,3"). Negative ids count from the end, as in
-- ipyparallel's `rc[-1]`.
local targets = {}

local function slice(ids, a, b, step)
  local n = #ids
  step = step or 1
  if step == 0 then error("slice step cannot be zero", 0) end
  local function norm(x, default)
    if x == nil then return default end
    if x < 0 then x = x + n end
    return x
  end
  local out = {}
  if step > 0 then
    local i, j = norm(a, 0), norm(b, n)
    i, j = math.max(i, 0), math.min(j, n)
    for k = i, j - 1, step do out[#out + 1] = ids[k + 1] end
  else
    local i, j = norm(a, n - 1), norm(b, -1 - n)
    i, j = math.min(i, n - 1), math.max(j, -1)
    for k = i, j + 1, step do out[#out + 1] = ids[k + 1] end
  end
  return out
end

local function to_int(s, spec)
  if s == "" then return nil end
  local v = math.tointeger(tonumber(s))
  if not v then error(string.format("bad target %q: %q is not an integer", spec, s), 0) end
  return v
end

local function one_id(id, ids, spec, explain)
  if id < 0 then
    local v = ids[#ids + id + 1]
    if v == nil then
      error(string.format("bad target %s: only %d engines", tostring(spec), #ids), 0)
    end
    return v
  end
  for _, v in ipairs(ids) do
    if v == id then return id end
  end
  local why = explain and explain(id)
  if why then error(why, 0) end
  error(string.format("no engine %d (engines: %s)", id, table.concat(ids, " ")), 0)
end

--- Resolve `spec` against the sorted list `ids`; returns a list of ids.
-- `explain(id)`, when given, may say why an id is missing (a dead engine).
-- Errors are plain strings or objects with no position, for the caller to
-- re-raise.
function targets.resolve(spec, ids, explain)
  local t = type(spec)
  if spec == nil or spec == "all" then
    return table.move(ids, 1, #ids, 1, {})
  elseif math.type(spec) == "integer" then
    return { one_id(spec, ids, spec, explain) }
  elseif t == "table" then
    local out = {}
    for i, v in ipairs(spec) do
      if math.type(v) ~= "integer" then
        error(string.format("bad target list: element %d is %s, not an engine id", i, type(v)), 0)
      end
      out[i] = one_id(v, ids, v, explain)
    end
    return out
  elseif t == "string" then
    local s = spec:gsub("%s", "")
    if s:find(":", 1, true) then
      local a, b, c = s:match("^([^:]*):([^:]*):?([^:]*)$")
      if not a then error(string.format("bad target slice %q", spec), 0) end
      return slice(ids, to_int(a, spec), to_int(b, spec), to_int(c, spec))
    end
    local out = {}
    for part in s:gmatch("[^,]+") do out[#out + 1] = one_id(to_int(part, spec), ids, spec, explain) end
    if #out == 0 then error(string.format("bad target %q", spec), 0) end
    return out
  end
  error("bad targets: expected nil, an id, a list of ids or a slice string, got " .. t, 0)
end

return targets
