#include "tensorstream/error.hpp"

#include <gtest/gtest.h>

#include <cerrno>

namespace tensorstream {
namespace {

TEST(Error, IoErrorNamesPathOperationAndErrno) {
  const IoError error("/data/x", ENOSPC, "write");
  EXPECT_EQ(error.path(), "/data/x");
  EXPECT_EQ(error.errno_value(), ENOSPC);
  const std::string text = error.what();
  EXPECT_NE(text.find("write failed for '/data/x'"), std::string::npos) << text;
  EXPECT_NE(text.find("ENOSPC"), std::string::npos) << text;
}

TEST(Error, FormatErrorCarriesRule) {
  const FormatError error("chunk.offset", "/s/manifest", "starts at 3");
  EXPECT_EQ(error.rule(), "chunk.offset");
  EXPECT_NE(std::string(error.what()).find("chunk.offset"), std::string::npos);
}

TEST(Error, CorruptionErrorNamesModelTensorChunk) {
  const CorruptionError error({"/s/data", "m", "w", 3, 4096}, "checksum mismatch");
  const std::string text = error.what();
  EXPECT_NE(text.find("model 'm'"), std::string::npos) << text;
  EXPECT_NE(text.find("tensor 'w'"), std::string::npos) << text;
  EXPECT_NE(text.find("chunk 3"), std::string::npos) << text;
  EXPECT_EQ(error.site().offset, 4096u);
}

TEST(Error, AllDeriveFromError) {
  EXPECT_THROW(throw ConfigError("f", "bad"), Error);
  EXPECT_THROW(throw CudaError(2, "oom"), Error);
  errno = EACCES;
  try {
    throw_errno("/p", "open");
  } catch (const IoError& error) {
    EXPECT_EQ(error.errno_value(), EACCES);
  }
}

}  // namespace
}  // namespace tensorstream
