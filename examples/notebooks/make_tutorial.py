"""Write tutorial.ipynb (unexecuted) from the cells below: the tutorial of
docs/tutorial.md as a Lua notebook for the lpar kernel.
    /usr/bin/python3 examples/notebooks/make_tutorial.py
"""
import os
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

md, code = new_markdown_cell, new_code_cell
cells = [
    md("# The ipyparallel tutorial, in lpar\n\n"
       "Lua 5.4 cells on the **lpar** kernel: a cluster of engines (Lua states in "
       "their own processes), views, `%px`, images from the engines, the DirectView, "
       "latency and bandwidth, and matrix products split over the engines against "
       "OpenBLAS. `lpar` is a global, as at the prompt; `%help` lists the magics."),
    md("## Start a cluster\n\n`lpar.Cluster{n = 4}` starts four local engines; "
       "`%cluster start -n 4` would start a standalone one instead, as the Clusters tab does."),
    code("rc = lpar.Cluster{n = 4}:start_and_connect()\nrc.ids"),
    md("## Views, sync_imports and %px\n\nA view addresses some engines, by id, list or "
       "Python-style slice. `sync_imports` binds a module under one name here and on the engines."),
    code('v01, v23, dview = rc:view "0:2", rc:view "2:4", rc:view()\n'
         'dview.block = true\n'
         'dview:sync_imports { matrix = "lpar.matrix" }'),
    code("a = matrix.random(10, 10)\n%px a = matrix.random(10, 10, lpar.engine.id)"),
    md("`%%px --targets 0::2 --local` runs the cell on engines 0 and 2, then here."),
    code("%%px --targets 0::2 --local\nprint(#a)"),
    code("v01:activate()\n%px a:get(1, 1)"),
    code("dview:activate()"),
    md("## Pictures from the engines\n\n`lpar.plot.imshow` on an engine attaches a PNG "
       "to the task; the notebook shows it under the cell."),
    code('%%px --targets 0::2\nlocal png = require("lpar.plot").imshow(a, { cmap = "viridis" })'),
    md("## The DirectView\n\n`dview` blocks; `rc[0]` does not, so `apply` hands back an AsyncResult."),
    code('dview:execute("c = a:dot(a)")\ndview:apply(function() return c:get(1, 1) end)'),
    code('ar = rc[0]:apply(function(x) return x end, "")\nar:get()'),
    md("## Latency and bandwidth\n\nA 2 MiB vector goes to the engines as shared memory, "
       "so a push costs about what an empty `execute` does."),
    code('%timeit dview:execute("")'),
    code("big = matrix.random(256 * 1024, 1)\n%timeit -n 200 dview:push { big = big }"),
    md("## Matrix products\n\nOne task per element (tiny tasks lose to one local product), "
       "then quadrants on four engines, then row tiles against OpenBLAS here."),
    code("uv = require 'luv'\n"
         "function seconds(f) local t0 = uv.hrtime() local r = f() return (uv.hrtime() - t0) / 1e9, r end\n"
         "dot = function(x, y) return x:dot(y) end\n"
         "n = 16\n"
         "A, B = matrix.random(n, n, 1), matrix.random(n, n, 2)\n"
         "t_tasks, C = seconds(function()\n"
         "  local ars = {}\n"
         "  for i = 1, n do for j = 1, n do\n"
         "    ars[#ars + 1] = rc[((i - 1) * n + j - 1) % 4]:apply_async(dot, A:sub(i, i, 1, n), B:sub(1, n, j, j))\n"
         "  end end\n"
         "  local out = matrix.zeros(n, n)\n"
         "  for k, r in ipairs(ars) do out:set((k - 1) // n + 1, (k - 1) % n + 1, r:get():get(1, 1)) end\n"
         "  return out\n"
         "end)\n"
         "t_local = seconds(function() return A:dot(B) end)\n"
         "print(string.format('%d tasks: %.2f ms; one local dot: %.3f ms', n * n, t_tasks * 1e3, t_local * 1e3))\n"
         "C:max_abs_diff(A:dot(B))"),
    code("n, h = 1024, 512\n"
         "A, B = matrix.random(n, n, 3), matrix.random(n, n, 4)\n"
         "A1, A2 = A:sub(1, h, 1, n), A:sub(h + 1, n, 1, n)\n"
         "B1, B2 = B:sub(1, n, 1, h), B:sub(1, n, h + 1, n)\n"
         "t_par, C = seconds(function()\n"
         "  local q = { rc[0]:apply_async(dot, A1, B1), rc[1]:apply_async(dot, A1, B2),\n"
         "              rc[2]:apply_async(dot, A2, B1), rc[3]:apply_async(dot, A2, B2) }\n"
         "  return matrix.block { { q[1]:get(), q[2]:get() }, { q[3]:get(), q[4]:get() } }\n"
         "end)\n"
         "t_local, want = seconds(function() return A:dot(B) end)\n"
         "print(string.format('quadrants: %.1f ms; local dot: %.1f ms', t_par * 1e3, t_local * 1e3))\n"
         "C:max_abs_diff(want)"),
    code("dview:push { B = B }\n"
         "rows = n // 4\n"
         "t_par, C = seconds(function()\n"
         "  local ars = {}\n"
         "  for k = 0, 3 do\n"
         "    ars[k + 1] = rc[k]:apply_async(function(x) return x:dot(B) end, A:sub(k * rows + 1, (k + 1) * rows, 1, n))\n"
         "  end\n"
         "  local parts = {}\n"
         "  for k, r in ipairs(ars) do parts[k] = { r:get() } end\n"
         "  return matrix.block(parts)\n"
         "end)\n"
         "print(string.format('row tiles on 4 engines: %.1f ms; OpenBLAS here: %.1f ms', t_par * 1e3, t_local * 1e3))\n"
         "C:max_abs_diff(want)"),
    md("## The end\n\nClosing the client stops the engines (so does shutting the kernel down)."),
    code("rc:close()"),
]
nb = new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "lpar", "display_name": "Lua 5.4 (lpar)", "language": "lua"},
    "language_info": {"name": "lua", "version": "5.4", "mimetype": "text/x-lua",
                      "file_extension": ".lua", "codemirror_mode": "lua", "pygments_lexer": "lua"},
})
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tutorial.ipynb")
nbformat.write(nb, path)
print("wrote", path)
