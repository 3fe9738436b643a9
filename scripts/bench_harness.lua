--- The benchmarks' shared harness: sample helpers, the row printer and the
-- round-trip timer, for scripts/bench.lua and the benchmarks it also runs
-- alone (scripts/bench_hosts.lua).
--   local h = dofile("scripts/bench_harness.lua")(quick)
local uv = require "luv"

return function(quick)
  local h = { rows = {}, by_key = {}, samples = {}, quick = quick }
  local scale = quick and 0.05 or 1

  --- A sample count, cut down in quick mode.
  function h.count(n) return math.max(3, math.floor(n * scale)) end

  function h.sorted(t)
    table.sort(t)
    return t
  end

  function h.pct(t, p) return t[math.max(1, math.ceil(#t * p))] end

  function h.quartiles(t) return { h.pct(t, 0.25), h.pct(t, 0.75) } end

  --- One figure: `key` names it for results.json and the comparison with
  -- ipyparallel; `spread` is {low, high} (quartiles) where there are samples.
  function h.row(key, name, value, unit, target, spread)
    local r = { key = key, name = name, value = value, unit = unit, target = target, spread = spread }
    h.rows[#h.rows + 1], h.by_key[key] = r, r
    print(string.format("%-52s %12.2f %-8s %s", name, value, unit, target or ""))
    io.stdout:flush()
  end

  local identity = function(x) return x end

  --- `n` apply(identity) round trips on `view` after a warm-up: sorted, in µs.
  function h.round_trips(view, n)
    for _ = 1, 50 do view:apply_sync(identity, "") end
    local t = {}
    for i = 1, n do
      local s = uv.hrtime()
      view:apply_sync(identity, "")
      t[i] = (uv.hrtime() - s) / 1e3
    end
    return h.sorted(t)
  end

  return h
end
