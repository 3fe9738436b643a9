-- The benchmark rows of engines on other hosts, for scripts/bench.lua (or
-- alone: `scripts/bench --hosts [--quick]`). Needs root (network namespaces)
-- and openssh-server; without them it says so and skips its rows.
local lpar = require "lpar"
local matrix = require "lpar.matrix"
local uv = require "luv"

-- Engines on other hosts: two network-namespace hosts from scripts/testhosts,
-- 4 engines each over ssh, the controller in the head namespace; this client
-- reaches it over its unix socket, and it reaches the hosts over TCP.
local function bench_hosts(b)
  local row, round_trips, count, pct, sorted, quartiles = b.row, b.round_trips, b.count, b.pct, b.sorted,
    b.quartiles
  local dir = os.tmpname()
  os.remove(dir)
  local prefix = string.format("lb%d-", uv.os_getpid()) -- namespaces of this run
  local env = string.format("LPAR_DIR='%s' LPAR_TESTHOSTS_DIR='%s-hosts' LPAR_TESTHOSTS_PREFIX=%s ", dir, dir,
    prefix)
  local function sh(cmd)
    local p = io.popen(env .. cmd .. " 2>&1; echo \"::$?\"")
    local out = p:read("a")
    p:close()
    local body, code = out:match("^(.-)::(%d+)\n?$")
    return body, tonumber(code)
  end
  local up, code = sh("sh scripts/testhosts up 2")
  if code ~= 0 then
    print("hosts: SKIPPED the rows on namespace hosts: scripts/testhosts up failed (needs root and " ..
      "openssh-server):\n" .. up)
  else
    uv.os_setenv("LPAR_DIR", dir)
    local lpar_cmd = uv.exepath()
    local start = string.format("ip netns exec %shead %s cluster start --launcher ssh --hosts " ..
      "10.231.0.11:4,10.231.0.12:4 --ip 10.231.0.1 --ssh-command 'ssh -F %s-hosts/ssh_config' --daemonize " ..
      "--profile hosts", prefix, lpar_cmd, dir)
    local times, failed = {}, nil
    for i = 1, count(5) do
      local t0 = uv.hrtime()
      local out, scode = sh(start)
      times[i] = (uv.hrtime() - t0) / 1e6
      if scode ~= 0 then failed = out break end
      if i < count(5) then sh(lpar_cmd .. " cluster stop --profile hosts") end
    end
    if failed then
      print("hosts: the ssh cluster did not start: " .. failed)
    else
      sorted(times)
      row("hosts_start_8", "hosts: 8 engines on 2 namespace hosts over ssh, ready", pct(times, 0.5), "ms",
        "<= 1000 ms", quartiles(times))
      local hc = lpar.Client { profile = "hosts" }
      local t = round_trips(hc[0], count(5000))
      row("hosts_apply1_p50", "hosts: apply(identity) to another host, p50", pct(t, 0.5), "us", "<= 150 us")
      row("hosts_apply1_p99", "hosts: apply(identity) to another host, p99", pct(t, 0.99), "us")
      local a = matrix.random(256 * 1024, 1, 1)
      local function push_time(view)
        local pt = {}
        for i = 1, count(30) do
          local t0 = uv.hrtime()
          view:push({ a = a }, { block = true })
          pt[i] = uv.hrtime() - t0
        end
        return pct(sorted(pt), 0.5)
      end
      local one, all = push_time(hc[0]), push_time(hc:view())
      row("hosts_push_one", "hosts: push 2 MiB matrix to 1 engine on another host", 2 ^ 21 / one, "GB/s")
      row("hosts_push_all", "hosts: push 2 MiB matrix to all 8 engines, 2 hosts", 8 * 2 ^ 21 / all, "GB/s")
      row("hosts_push_ratio", "hosts: push to all 8 / to 1, time", all / one, "x", "<= 2x")
      hc:close()
      -- 64 engines, 32 on each host: a 2 MB push to all of them, beside
      -- ipyparallel's published 14.6 s (64 engines, direct view) and 0.56 s
      -- (100 engines, broadcast view).
      sh(lpar_cmd .. " cluster stop --profile hosts")
      local out64, code64 = sh((start:gsub("10%.231%.0%.11:4,10%.231%.0%.12:4", "10.231.0.11:32,10.231.0.12:32")))
      if code64 ~= 0 then
        print("hosts: the 64-engine ssh cluster did not start: " .. out64)
      else
        local h64 = lpar.Client { profile = "hosts" }
        local mb2 = matrix.random(250000, 1, 3) -- 2 MB
        local pt = {}
        for i = 1, count(10) do
          local t0 = uv.hrtime()
          h64:view():push({ a = mb2 }, { block = true })
          pt[i] = (uv.hrtime() - t0) / 1e9
        end
        row("hosts_push_64", "hosts: push 2 MB to 64 engines on 2 hosts", pct(sorted(pt), 0.5), "s",
          "ipyparallel: 14.6 s direct, 0.56 s broadcast")
        h64:close()
      end
    end
    sh(lpar_cmd .. " cluster stop --profile hosts")
    uv.os_unsetenv("LPAR_DIR")
  end
  sh("sh scripts/testhosts down")
  os.execute("rm -rf '" .. dir .. "'")
end

-- Run alone: the same rows, printed.
if arg and arg[0] and arg[0]:match("bench_hosts%.lua$") then
  local quick = false
  for _, a in ipairs(arg) do if a == "--quick" then quick = true end end
  bench_hosts(dofile("scripts/bench_harness.lua")(quick))
end

return bench_hosts
