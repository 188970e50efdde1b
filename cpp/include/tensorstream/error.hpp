// The only exception types TensorStream throws. Each carries the context a user needs to act on it:
// the path, the format rule that failed, the model / tensor / chunk / offset, the errno.
//
// Thread-safety: values; safe to copy between threads.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace tensorstream {

// Base of every TensorStream error. what() is a complete, human-readable sentence.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// A system call failed. errno_value is the positive errno; path names the file or directory.
class IoError : public Error {
 public:
  IoError(std::string path, int errno_value, const std::string& operation);
  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] int errno_value() const noexcept { return errno_; }

 private:
  std::string path_;
  int errno_;
};

// A file does not follow docs/format.md. rule is the rule identifier from that document
// (for example "manifest.magic"); every rule has its own identifier so callers and tests can tell them apart.
class FormatError : public Error {
 public:
  FormatError(std::string rule, std::string path, const std::string& detail);
  [[nodiscard]] const std::string& rule() const noexcept { return rule_; }
  [[nodiscard]] const std::string& path() const noexcept { return path_; }

 private:
  std::string rule_;
  std::string path_;
};

// Stored bytes failed their checksum or did not decode to the declared size. Never returned as data.
struct CorruptionSite {
  std::string path;
  std::string model;
  std::string tensor;
  uint64_t chunk = 0;
  uint64_t offset = 0;  // file offset of the chunk in the data file
};

class CorruptionError : public Error {
 public:
  CorruptionError(CorruptionSite site, const std::string& detail);
  [[nodiscard]] const CorruptionSite& site() const noexcept { return site_; }

 private:
  CorruptionSite site_;
};

// A caller-supplied value is out of range. field names the setting, e.g. "chunk_size".
class ConfigError : public Error {
 public:
  ConfigError(std::string field, const std::string& detail);
  [[nodiscard]] const std::string& field() const noexcept { return field_; }

 private:
  std::string field_;
};

// A CUDA call failed (used by the GPU transfer stage).
class CudaError : public Error {
 public:
  CudaError(int code, const std::string& detail);
  [[nodiscard]] int code() const noexcept { return code_; }

 private:
  int code_;
};

// Throws IoError for `operation` on `path` with the current errno.
[[noreturn]] void throw_errno(const std::string& path, const std::string& operation);

}  // namespace tensorstream
