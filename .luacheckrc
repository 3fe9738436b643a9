std = "lua54"
max_line_length = 120
self = false -- methods need not use self
files["spec"] = { std = "+busted" }
-- Engine-side code in strings and functions sent to engines may use the
-- engine's globals.
read_globals = { "lpar" }
