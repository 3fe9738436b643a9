/*
** test_session.c: the synchronous layer. Local engines run code and give
** results and errors back; a dead engine is named; connection files that
** are missing, readable by others, malformed or truncated are refused with
** the right code and a message naming the file, and never read past.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "lpar.h"

static void test_start_and_run(void) {
  lpar_session *s;
  char *out;
  if (!CHECKF(lpar_session_start(2, &s) == LPAR_OK, "start: %s", lpar_session_errmsg(s))) {
    lpar_session_close(s);
    return;
  }
  CHECK(lpar_session_engines(s) == 2);
  CHECK(lpar_session_run(s, 0, "x = 20", &out) == LPAR_OK && out && strcmp(out, "") == 0);
  free(out);
  CHECK(lpar_session_run(s, 0, "return x + 1, 'a'", &out) == LPAR_OK && out && strcmp(out, "21\ta") == 0);
  free(out);
  CHECK(lpar_session_run(s, 1, "error('boom')", &out) == LPAR_EREMOTE && out && strstr(out, "boom"));
  CHECK(strstr(lpar_session_errmsg(s), "engine 1") != NULL);
  free(out);
  CHECK(lpar_session_run(s, 7, "return 1", &out) < 0 && out == NULL);
  CHECK(lpar_session_run(s, 1, "os.exit(3)", &out) == LPAR_EDEAD && out == NULL);
  CHECKF(strstr(lpar_session_errmsg(s), "status 3") != NULL, "%s", lpar_session_errmsg(s));
  CHECK(lpar_session_run(s, 0, "return x", &out) == LPAR_OK && out && strcmp(out, "20") == 0);
  free(out);
  lpar_session_close(s);
  CHECK(lpar_session_start(0, &s) == LPAR_EINVAL && s == NULL);
  lpar_session_close(NULL);
}

static void write_file(const char *path, const char *text, mode_t mode) {
  FILE *f = fopen(path, "w");
  if (f == NULL) return;
  fputs(text, f);
  fclose(f);
  chmod(path, mode);
}

static void expect_refused(const char *text, mode_t mode, int code, const char *says) {
  char path[] = "/tmp/lpar-test-session-XXXXXX";
  int fd = mkstemp(path);
  if (fd >= 0) close(fd);
  if (text) write_file(path, text, mode);
  else unlink(path);
  lpar_session *s;
  int rc = lpar_session_connect(path, &s);
  CHECKF(rc == code, "connect(%s) = %d, not %d: %s", text ? text : "(missing)", rc, code,
         lpar_session_errmsg(s));
  CHECKF(strstr(lpar_session_errmsg(s), says) && strstr(lpar_session_errmsg(s), path),
         "message '%s' should say '%s' and name the file", lpar_session_errmsg(s), says);
  lpar_session_close(s);
  unlink(path);
}

static void test_connection_files(void) {
  const char key[] = "\"key\":\"0101010101010101010101010101010101010101010101010101010101010101\"";
  char good[512];
  snprintf(good, sizeof good, "{\n  \"socket\":\"/nonexistent/sock\",\n  \"engines\":1,\n  %s\n}\n", key);
  expect_refused(NULL, 0600, LPAR_ESYS, "cannot read connection file");
  expect_refused(good, 0644, LPAR_EAUTH, "can be read by other users");
  expect_refused("return { key = 'x' }", 0600, LPAR_EBADMSG, "not an lpar connection file");
  expect_refused("{\"socket\":\"/x\"}", 0600, LPAR_EBADMSG, "not an lpar connection file");
  expect_refused("{\"socket\":\"/x\", \"key\":\"0101\"}", 0600, LPAR_EBADMSG, "not an lpar");
  expect_refused("{\"socket\":\"/x\", \"key\":\"01010101", 0600, LPAR_EBADMSG, "not an lpar");
  expect_refused("{\"socket\":\"\\q\"}", 0600, LPAR_EBADMSG, "not an lpar");
  expect_refused("{\"socket\":\"\\u0000\"}", 0600, LPAR_EBADMSG, "not an lpar");
  expect_refused("{\"port\":}", 0600, LPAR_EBADMSG, "not an lpar");
  expect_refused("", 0600, LPAR_EBADMSG, "not an lpar");
  /* Well formed, but nobody listens there: refused, saying why. */
  char path[] = "/tmp/lpar-test-session-XXXXXX";
  int fd = mkstemp(path);
  if (fd >= 0) close(fd);
  write_file(path, good, 0600);
  lpar_session *s;
  int rc = lpar_session_connect(path, &s);
  CHECKF(rc < 0 && strstr(lpar_session_errmsg(s), "/nonexistent/sock"), "connect to nobody = %d: %s", rc,
         lpar_session_errmsg(s));
  lpar_session_close(s);
  unlink(path);
}

int main(void) {
  test_start_and_run();
  test_connection_files();
  return check_report();
}
