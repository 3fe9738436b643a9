/*
** test_plot.c: images drawn from matrices decode, with libpng, to the
** right size and colours.
*/
#include <png.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "lpar.h"
#include "plot.h"

/* Decode PNG bytes to RGB; returns the pixels (free them) and the size. */
static unsigned char *decode(const lparB_buffer *b, unsigned *w, unsigned *h) {
  png_image img;
  memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&img, b->data, b->len)) return NULL;
  img.format = PNG_FORMAT_RGB;
  unsigned char *px = malloc(PNG_IMAGE_SIZE(img));
  if (!png_image_finish_read(&img, NULL, px, 0, NULL)) {
    free(px);
    return NULL;
  }
  *w = img.width;
  *h = img.height;
  return px;
}

int main(void) {
  lparM_storage *s = lparM_storage_new(6);
  for (int i = 0; i < 6; i++) s->data[i] = i; /* 2 rows, 3 columns: 0 1 2 / 3 4 5 */
  lparM_matrix m = {.st = s, .offset = 0, .rows = 2, .cols = 3, .stride = 3};
  lparB_buffer b;
  lparB_init(&b);
  CHECK(lparG_render_png(&m, LPARG_GRAY, 0, 5, 4, &b) == LPAR_OK);
  unsigned w = 0, h = 0;
  unsigned char *px = decode(&b, &w, &h);
  CHECK(px != NULL);
  CHECKF(w == 12 && h == 8, "size %ux%u", w, h); /* columns across, rows down, 4x each */
  if (px) {
    CHECK(px[0] == 0 && px[1] == 0 && px[2] == 0);       /* (1,1) = 0: black */
    size_t last = ((size_t)(h - 1) * w + (w - 1)) * 3;   /* (2,3) = 5: white */
    CHECK(px[last] == 255 && px[last + 1] == 255 && px[last + 2] == 255);
    size_t mid = ((size_t)0 * w + 4) * 3;                /* (1,2) = 1: one fifth grey */
    CHECKF(px[mid] == 51, "grey level %d", px[mid]);
  }
  free(px);

  b.len = 0;
  CHECK(lparG_render_png(&m, LPARG_VIRIDIS, 0, 5, 1, &b) == LPAR_OK);
  px = decode(&b, &w, &h);
  CHECK(px && w == 3 && h == 2);
  if (px) {
    CHECK(px[0] == 68 && px[1] == 1 && px[2] == 84);         /* viridis' dark purple */
    CHECK(px[15] == 253 && px[16] == 231 && px[17] == 37);   /* and its yellow */
  }
  free(px);

  lparM_matrix empty = {.st = s, .rows = 0, .cols = 3, .stride = 3};
  CHECK(lparG_render_png(&empty, LPARG_GRAY, 0, 1, 1, &b) == LPAR_EINVAL);
  lparB_free(&b);
  lparM_storage_release(s);
  return check_report();
}
