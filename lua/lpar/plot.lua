--- lpar.plot: matrices as images.
--   plot.imshow(A, {file = "a.png", cmap = "viridis" | "gray", scale = n,
--                   interpolation = "nearest", vmin =, vmax =})
-- writes a PNG (libpng). On an engine, the image is also attached to the
-- running task as display data: the client finds it in `ar.outputs` and
-- `ar:display_outputs()` saves it and prints "[output:ID] PATH (WxH)".
-- Returns the PNG bytes, the width and the height.
local matrix = require "lpar.matrix"

local plot = {}

local function default_scale(A)
  -- Small matrices are drawn large enough to see: about 256 pixels across.
  local longest = math.max(A.rows, A.cols)
  return math.max(1, 256 // math.max(longest, 1))
end

--- Draw matrix A as a PNG: opts file, cmap ("viridis" or "gray"), scale,
-- interpolation, vmin, vmax. On an engine, the image is also attached to the
-- running task. Returns the PNG bytes, the width and the height.
function plot.imshow(A, opts)
  opts = opts or {}
  if getmetatable(A) ~= getmetatable(matrix.zeros(1, 1)) then
    error("imshow: expected a matrix, got " .. type(A), 2)
  end
  local interpolation = opts.interpolation or "nearest"
  if interpolation ~= "nearest" then
    error("imshow: only interpolation = \"nearest\" is supported, not " .. tostring(interpolation), 2)
  end
  local ok, png, w, h = pcall(matrix._png, A, opts.cmap or "viridis", opts.scale or default_scale(A),
    opts.vmin, opts.vmax)
  if not ok then error(png, 2) end
  if opts.file then
    local f, err = io.open(opts.file, "wb")
    if not f then error("imshow: " .. err, 2) end
    f:write(png)
    f:close()
  end
  local engine = package.loaded["lpar.engine"]
  if engine and engine.display then
    engine.display("image/png", png, { width = w, height = h, file = opts.file })
  end
  return png, w, h
end

return plot
