/*
** check.h: a tiny harness for the C tests. CHECK counts a pass or prints
** the failure; check_report prints "N passed, M failed" and gives the exit
** status.
*/
#ifndef LPAR_CHECK_H
#define LPAR_CHECK_H

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static int check_passed, check_failed;

__attribute__((format(printf, 4, 5), unused))
static int check_(int ok, const char *file, int line, const char *fmt, ...) {
  if (ok) {
    check_passed++;
    return 1;
  }
  check_failed++;
  va_list ap;
  va_start(ap, fmt);
  printf("FAIL %s:%d: ", file, line);
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
  fflush(stdout);
  return 0;
}

/* CHECK(cond) or CHECKF(cond, "printf format", ...): returns whether it held. */
#define CHECK(cond) check_((cond) != 0, __FILE__, __LINE__, "%s", #cond)
#define CHECKF(cond, ...) check_((cond) != 0, __FILE__, __LINE__, __VA_ARGS__)

/*
** Reap child `pid` within `seconds`: its wait status, or, when it has not
** exited by then, kill it (a test fails rather than hangs) and return -1.
*/
__attribute__((unused))
static int check_reap(pid_t pid, int seconds) {
  int status = 0;
  for (int i = 0; i < seconds * 100; i++) {
    if (waitpid(pid, &status, WNOHANG) == pid) return status;
    usleep(10000);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

__attribute__((unused))
static int check_report(void) {
  printf("%d passed, %d failed\n", check_passed, check_failed);
  return check_failed ? 1 : 0;
}

#endif
