/*
** plot.h: matrices drawn as PNG images (internal, prefix lparG_).
*/
#ifndef LPAR_PLOT_H
#define LPAR_PLOT_H

#include <stddef.h>

#include <lua.h>

#include "buffer.h"
#include "matrix.h"

typedef enum lparG_cmap { LPARG_VIRIDIS, LPARG_GRAY } lparG_cmap;

/*
** Render `m` (rows as image rows) with a colormap spanning [vmin, vmax],
** each element a scale x scale block of pixels (nearest interpolation),
** as a PNG appended to `out`. 0, or LPAR_ENOMEM / LPAR_EINVAL.
*/
int lparG_render_png(const lparM_matrix *m, lparG_cmap cmap, double vmin, double vmax,
                     size_t scale, lparB_buffer *out);

/* lua_CFunction (A, cmap, scale) -> png bytes, width, height. */
int lparG_png(lua_State *L);

#endif
