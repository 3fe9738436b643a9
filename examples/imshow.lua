-- Every second engine draws a random matrix, as the notebook's
-- `%%px --target 0::2` cell does; the images come back as display outputs.
--   ./build/lpar examples/imshow.lua [engines=4]
local lpar = require "lpar"

local n = tonumber(arg[1]) or 4
local rc <close> = lpar.Cluster { n = n }:start_and_connect()
local evens = rc:view("::2")
local ar = evens:execute([[
  local matrix = require "lpar.matrix"
  local plot = require "lpar.plot"
  plot.imshow(matrix.random(10, 10, lpar.engine.id), { cmap = "viridis", interpolation = "nearest" })
]], { block = true })
local paths = ar:display_outputs()
assert(#paths == #evens.targets, "every drawing engine sent one image")
