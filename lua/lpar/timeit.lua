--- lpar.timeit(f, {number=, rep=, quiet=}): time f as IPython's %timeit does.
-- Without `number`, the loop count grows by tens until one repeat takes at
-- least 0.2 s. Prints "N loops, best of R: T per loop" and returns a table
-- {best =, loops =, rep =, all = {seconds per loop, per repeat}}.
local uv = require "luv"

local function now() return uv.hrtime() / 1e9 end

local function run(f, number)
  local t0 = now()
  for _ = 1, number do f() end
  return now() - t0
end

--- A time in seconds with three significant figures and a readable unit.
local function format_time(seconds)
  local units = { { 1, "s" }, { 1e-3, "ms" }, { 1e-6, "µs" }, { 1e-9, "ns" } }
  for _, u in ipairs(units) do
    if seconds >= u[1] or u[2] == "ns" then
      local v = seconds / u[1]
      local digits = v >= 100 and 0 or v >= 10 and 1 or 2
      return string.format("%." .. digits .. "f %s", v, u[2])
    end
  end
end

local function timeit(f, opts)
  if type(f) ~= "function" then error("timeit: expected a function, got " .. type(f), 2) end
  opts = require("lpar.options").check("timeit", opts, { number = true, rep = true, quiet = true })
  local rep = opts.rep or 3
  local number = opts.number
  if number == nil then
    number = 1
    while number < 1e9 do
      if run(f, number) >= 0.2 then break end
      number = number * 10
    end
  end
  if math.type(number) ~= "integer" or number < 1 then error("timeit: number must be a positive integer", 2) end
  if math.type(rep) ~= "integer" or rep < 1 then error("timeit: rep must be a positive integer", 2) end
  local all, best = {}, math.huge
  for r = 1, rep do
    all[r] = run(f, number) / number
    best = math.min(best, all[r])
  end
  if not opts.quiet then
    print(string.format("%d loop%s, best of %d: %s per loop", number, number == 1 and "" or "s", rep,
      format_time(best)))
  end
  return { best = best, loops = number, rep = rep, all = all }
end

return { timeit = timeit, format_time = format_time }
