// The per-thread last-error string behind hep_last_error (and hep_mn_last_error).
#include "common/status.h"

#include <cstdarg>
#include <cstdio>
#include <string>

namespace hep {
namespace {
thread_local std::string last_error_message;
}

void set_last_error(const char* format, ...) {
  char buffer[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buffer, sizeof(buffer), format, args);
  va_end(args);
  last_error_message = buffer;
}

void clear_last_error() { last_error_message.clear(); }

const char* last_error() { return last_error_message.c_str(); }

}  // namespace hep
