/*
** host.c: the ten-line C host. Starts two engines, runs Lua on one, prints
** the answer and an error, and stops them; nothing but liblpar needed:
**   cc host.c $(pkg-config --cflags --libs lpar) -o host && ./host
** (lpar_session_connect("default", &s) reaches a standalone cluster instead.)
*/
#include <stdio.h>
#include <stdlib.h>

#include <lpar.h>

int main(void) {
  lpar_session *s;
  char *out;
  if (lpar_session_start(2, &s) != LPAR_OK) {
    fprintf(stderr, "host: %s\n", lpar_session_errmsg(s));
    lpar_session_close(s);
    return 1;
  }
  int rc = lpar_session_run(s, 1, "x = 6 * 7 return lpar.engine.id, x, _VERSION", &out);
  printf("engine 1: %s\n", rc == LPAR_OK ? out : lpar_session_errmsg(s));
  free(out);
  rc = lpar_session_run(s, 1, "error('no such thing')", &out);
  printf("engine 1 failed as expected: %s\n", rc == LPAR_EREMOTE ? "yes" : "no");
  free(out);
  lpar_session_close(s);
  return 0;
}
