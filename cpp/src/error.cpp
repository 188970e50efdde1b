#include "tensorstream/error.hpp"

#include <cerrno>
#include <cstring>

namespace tensorstream {

namespace {
std::string errno_text(int errno_value) {
  const char* name = strerrorname_np(errno_value);
  return std::string(name != nullptr ? name : "E?") + ": " + std::strerror(errno_value);
}
}  // namespace

IoError::IoError(std::string path, int errno_value, const std::string& operation)
    : Error(operation + " failed for '" + path + "' (" + errno_text(errno_value) + ")"),
      path_(std::move(path)),
      errno_(errno_value) {}

FormatError::FormatError(std::string rule, std::string path, const std::string& detail)
    : Error("'" + path + "' breaks format rule " + rule + ": " + detail),
      rule_(std::move(rule)),
      path_(std::move(path)) {}

CorruptionError::CorruptionError(CorruptionSite site, const std::string& detail)
    : Error("corrupt data in model '" + site.model + "', tensor '" + site.tensor + "', chunk " +
            std::to_string(site.chunk) + " at offset " + std::to_string(site.offset) + " of '" + site.path +
            "': " + detail),
      site_(std::move(site)) {}

ConfigError::ConfigError(std::string field, const std::string& detail)
    : Error("invalid " + field + ": " + detail), field_(std::move(field)) {}

CudaError::CudaError(int code, const std::string& detail)
    : Error("CUDA error " + std::to_string(code) + ": " + detail), code_(code) {}

void throw_errno(const std::string& path, const std::string& operation) {
  throw IoError(path, errno, operation);
}

}  // namespace tensorstream
