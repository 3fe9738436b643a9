--- Strict options: a key of an options table that the function does not
-- know is an error naming it, with the nearest known name as a suggestion,
-- so `Cluster{nengines = 2}` fails instead of silently starting 4 engines:
--   unknown option 'nengines' (did you mean 'n'?)
local options = {}

--- Edit distance (insertions, deletions, substitutions, transpositions).
local function distance(a, b)
  local prev2, prev = {}, {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
      if i > 1 and j > 1 and a:sub(i, i) == b:sub(j - 1, j - 1) and a:sub(i - 1, i - 1) == b:sub(j, j) then
        cur[j] = math.min(cur[j], prev2[j - 2] + 1)
      end
    end
    prev2, prev = prev, cur
  end
  return prev[#b]
end

--- The known name nearest to `name`, or nil when none is near. A known name
-- that begins `name` counts as nearest (`nengines` -> `n`, `blocking` -> `block`),
-- and one that shares all but the last letter of it as near (`retry` -> `retries`).
function options.suggest(name, known)
  local best, best_score
  for k in pairs(known) do
    local score = distance(name, k)
    local common = 0
    while common < math.min(#k, #name) and k:byte(common + 1) == name:byte(common + 1) do common = common + 1 end
    if common == #k and #k < #name then score = 0.5 -- a known name that begins it
    elseif common >= math.max(3, #name - 1) then score = math.min(score, 1) end -- retry -> retries
    if score <= math.max(1, #name // 3) and score < #name and (not best or score < best_score or
        (score == best_score and k < best)) then
      best, best_score = k, score
    end
  end
  return best
end

--- The message for an unknown key: "unknown option 'nengines' (did you mean 'n'?)".
function options.unknown(name, known, noun)
  local msg = string.format("unknown %s '%s'", noun or "option", tostring(name))
  local near = type(name) == "string" and options.suggest(name, known)
  if near then return msg .. string.format(" (did you mean '%s'?)", near) end
  local names = {}
  for k in pairs(known) do names[#names + 1] = k end
  table.sort(names)
  return msg .. " (known: " .. table.concat(names, ", ") .. ")"
end

--- Check `opts` (nil or a table) against `known` (a set of names); raise at
-- `level` (default: the caller's caller) with `what` as prefix on the first
-- unknown key. Returns opts, or {} for nil.
function options.check(what, opts, known, level, noun)
  if opts == nil then return {} end
  level = (level or 2) + 1
  if type(opts) ~= "table" then
    error(string.format("%sexpected a table of options, got %s", what and what .. ": " or "", type(opts)), level)
  end
  for k in pairs(opts) do
    if not known[k] then error((what and what .. ": " or "") .. options.unknown(k, known, noun), level) end
  end
  return opts
end

--- A set from names: set{"a", "b"} -> {a = true, b = true}; extra sets merged in.
function options.set(names, ...)
  local s = {}
  for _, n in ipairs(names) do s[n] = true end
  for _, more in ipairs { ... } do
    for k in pairs(more) do s[k] = true end
  end
  return s
end

local UNITS = { [""] = 1, K = 1024, M = 1024 ^ 2, G = 1024 ^ 3 }

--- The smallest engine memory limit: an engine needs a few hundred KB of
-- Lua heap to start, and a smaller cap would kill it before it says hello.
options.MIN_MEM_LIMIT = 1024 * 1024

--- Bytes from a size: an integer, or a string of digits with an optional
-- K, M or G suffix (powers of 1024, either case): "268435456", "256M", "1g".
-- `what` names the option in the error, raised with error's `level`
-- (default 3: the caller's caller; 0 for a command's message) when the size
-- is malformed or below MIN_MEM_LIMIT.
function options.mem_limit(v, what, level)
  level = level or 3
  local bytes
  if math.type(v) == "integer" then
    bytes = v
  elseif type(v) == "string" then
    local digits, unit = v:match("^%s*(%d+)%s*([KkMmGg]?)[Bb]?%s*$")
    -- 2^53 and over cannot be said exactly; nobody means that many bytes.
    if digits and #digits <= 15 then bytes = math.tointeger(tonumber(digits) * UNITS[unit:upper()]) end
  end
  if not bytes then
    error(string.format("%s must be a size in bytes, with an optional K, M or G suffix (256M), not '%s'",
      what, tostring(v)), level)
  end
  if bytes < options.MIN_MEM_LIMIT then
    error(string.format("%s must be at least 1M (1048576 bytes): an engine needs that much to start, not %s",
      what, tostring(v)), level)
  end
  return bytes
end

return options
