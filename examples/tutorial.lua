-- The ipyparallel tutorial notebook, step by step, in lpar (docs/tutorial.md
-- walks through the same steps at the prompt).
--   ./build/lpar examples/tutorial.lua
-- luacheck: globals c
local lpar = require "lpar"

-- 1. Start a cluster of 4 engines and connect.
local rc <close> = lpar.Cluster { n = 4 }:start_and_connect()
print("engines: " .. table.concat(rc.ids, " "))

-- 2. Views: two halves and all engines.
local v01, v23, dview = rc:view "0:2", rc:view "2:4", rc:view()
print("views:", v01, v23, dview)

-- 3. The same module here and on every engine.
dview:sync_imports { matrix = "lpar.matrix" }
local matrix = require "lpar.matrix"

-- 4. px: code on the active view (all engines until another is activated).
lpar.px "a = matrix.random(10, 10, lpar.engine.id)"
v01:activate()
lpar.px "print(#a, a.rows, a.cols)"
dview:activate()

-- 5. A DirectView: execute, push, pull, apply.
dview.block = true
dview:execute "c = a:dot(a)"
print("c[1][1] per engine: " .. table.concat(dview:apply(function() return c:get(1, 1) end), " "))
dview:push { greeting = "hello" }
print("pulled from engine 3: " .. rc[3]:pull("greeting"):get())
local ar = rc[0]:apply(function(x) return x end, "")
print("apply on one engine returns an AsyncResult when not blocking:", ar, ar:get())

-- 6. Latency and bandwidth.
lpar.timeit(function() dview:execute("") end, { number = 200 })
local big = matrix.random(256 * 1024, 1) -- 2 MiB of doubles
lpar.timeit(function() dview:push { a = big } end, { number = 100 })

-- 7. A 1024x1024 product by quadrants, one per engine, against the product here.
local n, h = 1024, 512
local A, B = matrix.random(n, n, 1), matrix.random(n, n, 2)
local dot = matrix.dot -- a C function: it travels by name, as np.dot does in the notebook
local A1, A2 = A:sub(1, h, 1, n), A:sub(h + 1, n, 1, n)
local B1, B2 = B:sub(1, n, 1, h), B:sub(1, n, h + 1, n)
local q = {
  rc[0]:apply_async(dot, A1, B1), rc[1]:apply_async(dot, A1, B2),
  rc[2]:apply_async(dot, A2, B1), rc[3]:apply_async(dot, A2, B2),
}
local C = matrix.block { { q[1]:get(), q[2]:get() }, { q[3]:get(), q[4]:get() } }
print(string.format("quadrants vs A:dot(B): max difference %g", C:max_abs_diff(A:dot(B))))

-- 8. The rest of the everyday API: view.vars, @remote and @parallel, rc:wait().
dview.vars.k = 3
print("vars.k on engine 2: " .. rc[2].vars.k)
local square = dview:remote(function(x) return x * x + lpar.engine.id end)
print("remote square(5): " .. table.concat(square(5), " "))
local tens = dview:parallel(function(x) return 10 * x end)
print("parallel map: " .. table.concat(tens:map { 1, 2, 3, 4, 5, 6 }, " "))
rc[1]:apply_async(function() return "later" end)
print("rc:wait() for everything outstanding:", rc:wait(nil, 10))
