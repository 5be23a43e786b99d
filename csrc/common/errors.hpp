// Error types of the native layer. ValueError-like failures are std::invalid_argument (pybind11 maps it to
// ValueError); physai::type_error is translated to TypeError in bindings/module.cpp. Messages name the
// argument, what was expected and what was received.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace physai {

struct type_error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

template <class... Parts>
[[noreturn]] void fail_value(const Parts&... parts) {
  throw std::invalid_argument(concat(parts...));
}

template <class... Parts>
[[noreturn]] void fail_type(const Parts&... parts) {
  throw type_error(concat(parts...));
}

// Cheap re-check at the C++ boundary; the Python layer has already given the friendlier message.
#define PHYSAI_REQUIRE(cond, ...)              \
  do {                                         \
    if (!(cond)) ::physai::fail_value(__VA_ARGS__); \
  } while (0)

}  // namespace physai
