// Errors inside the library are C++ exceptions carrying a fap_status; the C boundary (api.cpp) turns them
// into a status code plus the thread-local message returned by fap_last_error(). No exception crosses
// extern "C", and no backend kernel throws from inside a parallel region.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "flash_attn_plus/flash_attn_plus.h"

namespace fap {

class Error : public std::runtime_error {
 public:
  Error(fap_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  fap_status status() const { return status_; }

 private:
  fap_status status_;
};

template <typename... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream stream;
  (stream << ... << std::forward<Parts>(parts));
  return stream.str();
}

template <typename... Parts>
[[noreturn]] void fail(fap_status status, Parts&&... parts) {
  throw Error(status, concat(std::forward<Parts>(parts)...));
}

// Throws FAP_ERROR_INVALID_ARGUMENT with the message built from parts when condition is false.
template <typename... Parts>
void require(bool condition, Parts&&... parts) {
  if (!condition) fail(FAP_ERROR_INVALID_ARGUMENT, std::forward<Parts>(parts)...);
}

}  // namespace fap
