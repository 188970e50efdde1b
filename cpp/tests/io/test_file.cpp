#include "tensorstream/io/file.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>

#include "support/temp_dir.hpp"
#include "tensorstream/error.hpp"

namespace tensorstream {
namespace {

using testing::TempDir;

TEST(File, WriteThenReadBackExactly) {
  TempDir dir;
  const auto path = dir.path() / "f";
  const auto bytes = testing::random_bytes(100000, 7);
  {
    const UniqueFd fd = open_file(path, O_WRONLY | O_CREAT | O_EXCL);
    pwrite_all(fd.get(), bytes, 4096, path.string());
  }
  const UniqueFd fd = open_file(path, O_RDONLY);
  EXPECT_EQ(file_size(fd.get(), path.string()), 4096u + bytes.size());
  std::vector<std::byte> back(bytes.size());
  pread_all(fd.get(), back, 4096, path.string());
  EXPECT_EQ(back, bytes);
}

TEST(File, ReadPastEndIsAnUnexpectedEofError) {
  TempDir dir;
  const auto path = dir.path() / "short";
  testing::write_file_bytes(path, testing::random_bytes(10, 1));
  const UniqueFd fd = open_file(path, O_RDONLY);
  std::vector<std::byte> out(11);
  try {
    pread_all(fd.get(), out, 0, path.string());
    FAIL() << "expected IoError";
  } catch (const IoError& error) {
    EXPECT_EQ(error.errno_value(), EIO);
    EXPECT_EQ(error.path(), path.string());
    EXPECT_NE(std::string(error.what()).find("unexpected end of file"), std::string::npos);
  }
}

TEST(File, OpenMissingFileNamesPathAndErrno) {
  TempDir dir;
  const auto path = dir.path() / "missing";
  try {
    (void)open_file(path, O_RDONLY);
    FAIL() << "expected IoError";
  } catch (const IoError& error) {
    EXPECT_EQ(error.errno_value(), ENOENT);
    EXPECT_NE(std::string(error.what()).find(path.string()), std::string::npos);
    EXPECT_NE(std::string(error.what()).find("ENOENT"), std::string::npos);
  }
}

TEST(File, ReadWholeFileRefusesOversizedFiles) {
  TempDir dir;
  const auto path = dir.path() / "big";
  testing::write_file_bytes(path, testing::random_bytes(1000, 3));
  EXPECT_EQ(read_whole_file(path, 1000).size(), 1000u);
  try {
    (void)read_whole_file(path, 999);
    FAIL() << "expected IoError";
  } catch (const IoError& error) {
    EXPECT_EQ(error.errno_value(), EFBIG);
  }
}

TEST(File, FsyncWorksOnFilesAndDirectories) {
  TempDir dir;
  testing::write_file_bytes(dir.path() / "x", testing::random_bytes(1, 1));
  EXPECT_NO_THROW(fsync_path(dir.path() / "x"));
  EXPECT_NO_THROW(fsync_path(dir.path()));
  EXPECT_THROW(fsync_path(dir.path() / "nope"), IoError);
}

TEST(File, WriteFileDurablyRefusesToOverwriteUnlessAsked) {
  TempDir dir;
  const auto path = dir.path() / "d";
  const auto first = testing::random_bytes(5000, 1);
  write_file_durably(path, first);
  EXPECT_EQ(testing::read_file_bytes(path), first);
  try {
    write_file_durably(path, testing::random_bytes(10, 2));
    FAIL() << "expected IoError";
  } catch (const IoError& error) {
    EXPECT_EQ(error.errno_value(), EEXIST);
  }
  const auto second = testing::random_bytes(10, 3);
  write_file_durably(path, second, /*replace_existing=*/true);
  EXPECT_EQ(testing::read_file_bytes(path), second);
}

TEST(File, UniqueFdClosesOnceAndMoves) {
  TempDir dir;
  UniqueFd a = open_file(dir.path() / "m", O_WRONLY | O_CREAT);
  const int raw = a.get();
  UniqueFd b = std::move(a);
  EXPECT_FALSE(a);
  EXPECT_EQ(b.get(), raw);
  b.reset();
  EXPECT_FALSE(b);
}

}  // namespace
}  // namespace tensorstream
