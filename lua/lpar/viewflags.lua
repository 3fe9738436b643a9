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

return viewflags
