/*
** host.c: the ten-line C host. Starts two engines (or, given a profile name
** or a connection file, connects to that standalone cluster), runs Lua on
** engine 1, prints the answer, shows that an error comes back as one, and
** stops. Nothing but liblpar is needed:
**   cc host.c $(pkg-config --cflags --libs lpar) -o host && ./host [PROFILE]
*/
#include <stdio.h>
#include <stdlib.h>

#include <lpar.h>

int main(int argc, char **argv) {
  lpar_session *s;
  char *out;
  int rc = argc > 1 ? lpar_session_connect(argv[1], &s) : lpar_session_start(2, &s);
  if (rc != LPAR_OK) {
    fprintf(stderr, "host: %s\n", lpar_session_errmsg(s));
    lpar_session_close(s);
    return 1;
  }
  rc = lpar_session_run(s, 1, "x = 6 * 7 return lpar.engine.id, x, _VERSION", &out);
  printf("engine 1: %s\n", rc == LPAR_OK ? out : lpar_session_errmsg(s));
  free(out);
  rc = lpar_session_run(s, 1, "error('no such thing')", &out);
  printf("engine 1 failed as expected: %s\n", rc == LPAR_EREMOTE ? "yes" : "no");
  free(out);
  lpar_session_close(s);
  return 0;
}
