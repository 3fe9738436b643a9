--- What DirectView and LoadBalancedView share: copies with flags changed,
-- and how a view prints.
local options = require "lpar.options"

local viewflags = {}

--- A copy of `view` (same metatable, same fields) with `flags` changed;
-- raises at the user's call site on a flag not in `known`.
function viewflags.with(view, flags, known)
  local copy = setmetatable({}, getmetatable(view))
  for k, v in pairs(view) do copy[k] = v end
  options.check("with", flags, known, 3, "view flag")
  for k, v in pairs(flags) do copy[k] = v end
  return copy
end

--- "<Kind targets>", e.g. "<DirectView {0, 2}>".
function viewflags.describe(kind, targets)
  if type(targets) == "table" then targets = "{" .. table.concat(targets, ", ") .. "}" end
  return string.format("<%s %s>", kind, tostring(targets))
end

--- A target spec as the user wrote it: {0, 2}, "5:9", 3.
function viewflags.describe_spec(spec)
  if type(spec) == "table" then
    local parts = {}
    for i, v in ipairs(spec) do parts[i] = tostring(v) end
    return "{" .. table.concat(parts, ", ") .. "}"
  end
  if type(spec) == "string" then return string.format("%q", spec) end
  return tostring(spec)
end

return viewflags
