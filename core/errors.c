/*
** errors.c: names of the LPAR_E* codes.
*/
#include "lpar.h"

const char *lpar_strerror(int code) {
  switch (code) {
  case LPAR_OK: return "success";
  case LPAR_ENOMEM: return "out of memory";
  case LPAR_EINVAL: return "invalid argument";
  case LPAR_EBADMSG: return "malformed message";
  case LPAR_ETOOBIG: return "message too large (more than the 1 GiB limit)";
  case LPAR_EDEPTH: return "value nested too deeply";
  case LPAR_EUNSENDABLE: return "value cannot be sent";
  case LPAR_ESPAWN: return "engine could not be started";
  case LPAR_EDEAD: return "engine is not running";
  case LPAR_ENOENGINE: return "no such engine";
  case LPAR_ESYS: return "system call failed";
  case LPAR_ECLOSED: return "cluster is stopped";
  case LPAR_EAUTH: return "message failed authentication";
  case LPAR_EREMOTE: return "the code raised an error";
  case LPAR_ETIMEDOUT: return "timed out";
  default: return "unknown error";
  }
}
