#include "tensorstream/store/storage_directory.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <functional>

#include "support/temp_dir.hpp"
#include "tensorstream/error.hpp"

namespace tensorstream {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

TEST(StorageDirectory, CreateLaysOutDirectoriesAndKeepsItsId) {
  TempDir dir;
  const fs::path root = dir.path() / "a" / "b";
  const StorageDirectory created = StorageDirectory::open_or_create(root);
  for (const char* sub : {"models", "tmp", "locks"}) EXPECT_TRUE(fs::is_directory(root / sub)) << sub;
  EXPECT_EQ(fs::file_size(root / "STORE"), 40u);
  EXPECT_EQ(StorageDirectory::open_or_create(root).id(), created.id());
  EXPECT_EQ(StorageDirectory::open_existing(root).id(), created.id());
  EXPECT_TRUE(fs::is_empty(root / "tmp"));  // the STORE candidate was cleaned up
}

TEST(StorageDirectory, OpenExistingWithoutStoreIsENOENT) {
  TempDir dir;
  try {
    (void)StorageDirectory::open_existing(dir.path());
    FAIL() << "expected IoError";
  } catch (const IoError& error) {
    EXPECT_EQ(error.errno_value(), ENOENT);
    EXPECT_NE(std::string(error.what()).find("not a TensorStream storage"), std::string::npos);
  }
}

TEST(StorageDirectory, RootThatIsAFileIsAnIoError) {
  TempDir dir;
  testing::write_file_bytes(dir.path() / "file", testing::random_bytes(3, 1));
  EXPECT_THROW((void)StorageDirectory::open_or_create(dir.path() / "file"), IoError);
}

// One generated corrupt STORE file per rule of docs/format.md §2.
struct StoreCase {
  const char* rule;
  std::function<void(std::vector<std::byte>&)> corrupt;
};

void put_le(std::vector<std::byte>& bytes, size_t offset, uint64_t value, int width) {
  for (int i = 0; i < width; ++i) bytes[offset + i] = static_cast<std::byte>(value >> (8 * i));
}
void reseal(std::vector<std::byte>& bytes) { put_le(bytes, 32, plain_checksum(std::span(bytes).first(32)), 8); }

TEST(StorageDirectory, EachStoreFileRuleHasItsOwnError) {
  StoreId id{};
  id[3] = 7;
  const std::vector<StoreCase> cases = {
      {"store.size", [](auto& b) { b.push_back(std::byte{0}); }},
      {"store.size", [](auto& b) { b.resize(39); }},
      {"store.magic", [](auto& b) { b[0] = std::byte{'X'}; reseal(b); }},
      {"store.version", [](auto& b) { put_le(b, 8, 2, 4); reseal(b); }},
      {"store.reserved", [](auto& b) { put_le(b, 12, 1, 4); reseal(b); }},
      {"store.checksum", [](auto& b) { b[20] ^= std::byte{1}; }},
      {"store.id", [](auto& b) { std::fill(b.begin() + 16, b.begin() + 32, std::byte{0}); reseal(b); }},
  };
  EXPECT_EQ(parse_store_file(serialize_store_file(id), "STORE"), id);
  for (const StoreCase& c : cases) {
    std::vector<std::byte> bytes = serialize_store_file(id);
    c.corrupt(bytes);
    try {
      (void)parse_store_file(bytes, "STORE");
      ADD_FAILURE() << "no error for " << c.rule;
    } catch (const FormatError& error) {
      EXPECT_EQ(error.rule(), c.rule);
    }
  }
}

TEST(StorageDirectory, CorruptStoreFileIsRefusedOnOpen) {
  TempDir dir;
  (void)StorageDirectory::open_or_create(dir.path());
  testing::flip_bit(dir.path() / "STORE", 18);
  try {
    (void)StorageDirectory::open_existing(dir.path());
    FAIL() << "expected FormatError";
  } catch (const FormatError& error) {
    EXPECT_EQ(error.rule(), "store.checksum");
  }
}

TEST(StorageDirectory, ModelIdsAreNeverArbitraryPaths) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  for (const char* bad : {"", "..", "../x", "a/b", ".hidden", "-rf", "x y", "é"}) {
    EXPECT_THROW((void)storage.model_dir(bad), ConfigError) << bad;
  }
  EXPECT_THROW((void)storage.model_dir(std::string(129, 'a')), ConfigError);
  EXPECT_EQ(storage.model_dir("Llama-3.1_8B").filename(), "Llama-3.1_8B");
  EXPECT_NO_THROW((void)storage.model_dir(std::string(128, 'a')));
}

bool lock_is_held(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0);
  const bool held = ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);
  return held;
}

TEST(StorageDirectory, TempDirIsLockedWhileAliveAndRemovedAfter) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  fs::path path;
  {
    TempModelDir temp = storage.make_temp_dir("m");
    path = temp.path();
    EXPECT_EQ(path.parent_path(), storage.tmp_dir());
    EXPECT_TRUE(lock_is_held(path));
    testing::write_file_bytes(path / "data", testing::random_bytes(10, 1));
  }
  EXPECT_FALSE(fs::exists(path));
}

TEST(StorageDirectory, MovingATempDirHandsOverOwnershipAndAssignmentRemovesTheOldOne) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  TempModelDir first = storage.make_temp_dir("a");
  const fs::path first_path = first.path();
  TempModelDir moved = std::move(first);
  EXPECT_TRUE(first.path().empty());
  EXPECT_EQ(moved.path(), first_path);
  moved = storage.make_temp_dir("b");
  EXPECT_FALSE(fs::exists(first_path));
  EXPECT_TRUE(fs::exists(moved.path()));
  moved = TempModelDir();
  EXPECT_TRUE(fs::is_empty(storage.tmp_dir()));
}

TEST(StorageDirectory, PublishKeepExistingAndReplace) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  auto publish_with = [&](const char* content, PublishMode mode) {
    TempModelDir temp = storage.make_temp_dir("m");
    testing::write_file_bytes(temp.path() / "manifest", std::as_bytes(std::span(content, std::strlen(content))));
    return storage.publish(temp, "m", mode);
  };
  auto content = [&] {
    auto bytes = testing::read_file_bytes(storage.model_dir("m") / "manifest");
    return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  };
  EXPECT_FALSE(storage.has_model("m"));
  EXPECT_EQ(publish_with("one", PublishMode::kKeepExisting), PublishOutcome::kPublished);
  EXPECT_TRUE(storage.has_model("m"));
  EXPECT_EQ(publish_with("two", PublishMode::kKeepExisting), PublishOutcome::kAlreadyExisted);
  EXPECT_EQ(content(), "one");
  EXPECT_EQ(publish_with("three", PublishMode::kReplace), PublishOutcome::kReplaced);
  EXPECT_EQ(content(), "three");
  EXPECT_TRUE(fs::is_empty(storage.tmp_dir()));  // losers and replaced models leave nothing behind
  EXPECT_EQ(storage.list_models(), std::vector<std::string>{"m"});
  storage.remove_model("m");
  EXPECT_FALSE(storage.has_model("m"));
  EXPECT_TRUE(storage.list_models().empty());
  EXPECT_TRUE(fs::is_empty(storage.tmp_dir()));
}

TEST(StorageDirectory, ModelLockIsExclusive) {
  TempDir dir;
  const auto storage = StorageDirectory::open_or_create(dir.path());
  {
    const ModelLock lock = storage.lock_model("m");
    EXPECT_TRUE(lock_is_held(storage.locks_dir() / "m.lock"));
  }
  EXPECT_FALSE(lock_is_held(storage.locks_dir() / "m.lock"));
}

}  // namespace
}  // namespace tensorstream
