/*
** plot.c: matrices drawn as PNG images, with libpng's simplified API.
*/
#include "plot.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <png.h>

#include "lpar.h"

/*
** Viridis, by anchors every eighth of the range (sRGB); colours in between
** are interpolated linearly, which is within a few levels of the real map.
*/
static const unsigned char viridis[9][3] = {
  {68, 1, 84},    {71, 45, 123},  {59, 82, 139},  {44, 114, 142}, {33, 145, 140},
  {39, 173, 129}, {94, 201, 98},  {170, 220, 50}, {253, 231, 37}};

static void colour(lparG_cmap cmap, double t, unsigned char rgb[3]) {
  if (!(t > 0)) t = 0; /* NaN too */
  if (t > 1) t = 1;
  if (cmap == LPARG_GRAY) {
    rgb[0] = rgb[1] = rgb[2] = (unsigned char)lround(t * 255);
    return;
  }
  double x = t * 8;
  int k = x >= 8 ? 7 : (int)x;
  double f = x - k;
  for (int c = 0; c < 3; c++)
    rgb[c] = (unsigned char)lround(viridis[k][c] + f * (viridis[k + 1][c] - viridis[k][c]));
}

int lparG_render_png(const lparM_matrix *m, lparG_cmap cmap, double vmin, double vmax,
                     size_t scale, lparB_buffer *out) {
  if (m->rows == 0 || m->cols == 0 || scale == 0) return LPAR_EINVAL;
  if (m->cols > 65535 / scale || m->rows > 65535 / scale) return LPAR_EINVAL;
  size_t w = m->cols * scale, h = m->rows * scale;
  unsigned char *px = malloc(w * h * 3);
  if (px == NULL) return LPAR_ENOMEM;
  double span = vmax > vmin ? vmax - vmin : 1;
  for (size_t i = 0; i < m->rows; i++) {
    unsigned char *row = px + i * scale * w * 3;
    for (size_t j = 0; j < m->cols; j++) {
      unsigned char rgb[3];
      colour(cmap, (*lparM_at(m, i, j) - vmin) / span, rgb);
      for (size_t s = 0; s < scale; s++) memcpy(row + (j * scale + s) * 3, rgb, 3);
    }
    for (size_t s = 1; s < scale; s++) memcpy(row + s * w * 3, row, w * 3);
  }
  png_image img;
  memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  img.width = (png_uint_32)w;
  img.height = (png_uint_32)h;
  img.format = PNG_FORMAT_RGB;
  png_alloc_size_t size = 0;
  int rc = LPAR_ENOMEM;
  if (png_image_write_to_memory(&img, NULL, &size, 0, px, 0, NULL) &&
      lparB_reserve(out, size) == LPAR_OK &&
      png_image_write_to_memory(&img, out->data + out->len, &size, 0, px, 0, NULL)) {
    out->len += size;
    rc = LPAR_OK;
  }
  png_image_free(&img);
  free(px);
  return rc;
}

int lparG_png(lua_State *L) {
  lparM_matrix *m = lparM_check(L, 1);
  static const char *const names[] = {"viridis", "gray", NULL};
  lparG_cmap cmap = luaL_checkoption(L, 2, "viridis", names) == 0 ? LPARG_VIRIDIS : LPARG_GRAY;
  lua_Integer scale = luaL_optinteger(L, 3, 1);
  if (m->rows == 0 || m->cols == 0)
    return luaL_error(L, "imshow: cannot draw an empty %dx%d matrix", (int)m->rows, (int)m->cols);
  if (scale < 1 || scale > 4096) return luaL_error(L, "imshow: scale must be 1 to 4096");
  if (m->cols > 65535 / (size_t)scale || m->rows > 65535 / (size_t)scale)
    return luaL_error(L, "imshow: a %dx%d image at scale %d is larger than PNG's 65535 a side",
                      (int)m->rows, (int)m->cols, (int)scale);
  double lo = INFINITY, hi = -INFINITY;
  for (size_t i = 0; i < m->rows; i++)
    for (size_t j = 0; j < m->cols; j++) {
      double v = *lparM_at(m, i, j);
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  double vmin = luaL_optnumber(L, 4, lo), vmax = luaL_optnumber(L, 5, hi);
  lparB_buffer b;
  lparB_init(&b);
  int rc = lparG_render_png(m, cmap, vmin, vmax, (size_t)scale, &b);
  if (rc < 0) {
    lparB_free(&b);
    return luaL_error(L, "imshow: %s (image %dx%d at scale %d)", lpar_strerror(rc),
                      (int)m->cols, (int)m->rows, (int)scale);
  }
  lua_pushlstring(L, b.data, b.len);
  lparB_free(&b);
  lua_pushinteger(L, (lua_Integer)(m->cols * (size_t)scale));
  lua_pushinteger(L, (lua_Integer)(m->rows * (size_t)scale));
  return 3;
}
