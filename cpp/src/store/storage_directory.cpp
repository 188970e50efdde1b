#include "tensorstream/store/storage_directory.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "tensorstream/error.hpp"
#include "tensorstream/format/manifest.hpp"

namespace tensorstream {

namespace fs = std::filesystem;

namespace {
constexpr char kStoreMagic[8] = {'T', 'S', 'S', 'T', 'O', 'R', 'E', '\0'};
constexpr size_t kStoreFileSize = 40;

uint64_t random_u64() {
  uint64_t value = 0;
  auto* out = reinterpret_cast<uint8_t*>(&value);
  size_t done = 0;
  while (done < sizeof(value)) {
    const ssize_t n = ::getrandom(out + done, sizeof(value) - done, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("getrandom", "getrandom");
    }
    done += static_cast<size_t>(n);
  }
  return value;
}

std::string unique_suffix() {
  return std::to_string(::getpid()) + "." + hex64(random_u64());
}

// mkdir that tolerates an existing directory.
void ensure_dir(const fs::path& path) {
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) throw_errno(path.string(), "mkdir");
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw_errno(path.string(), "stat");
  if (!S_ISDIR(st.st_mode)) throw IoError(path.string(), ENOTDIR, "open storage directory");
}

uint32_t get_le32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint32_t>(p[i]);
  return v;
}
uint64_t get_le64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint64_t>(p[i]);
  return v;
}
void put_le(std::byte* p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}

void remove_tree_quietly(const fs::path& path) noexcept {
  std::error_code ec;
  fs::remove_all(path, ec);
}

StoreId read_store_id(const fs::path& store_file) {
  // Read at most one byte more than a valid file so an oversized file is refused without reading it all.
  const UniqueFd fd = open_file(store_file, O_RDONLY);
  std::vector<std::byte> bytes(kStoreFileSize + 1);
  size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t n = ::pread(fd.get(), bytes.data() + got, bytes.size() - got, static_cast<off_t>(got));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(store_file.string(), "read");
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  bytes.resize(got);
  return parse_store_file(bytes, store_file.string());
}
}  // namespace

StoreId parse_store_file(std::span<const std::byte> bytes, const std::string& path) {
  if (bytes.size() != kStoreFileSize) {
    throw FormatError("store.size", path, "STORE is " + std::to_string(bytes.size()) + " bytes, expected 40");
  }
  if (std::memcmp(bytes.data(), kStoreMagic, sizeof(kStoreMagic)) != 0) {
    throw FormatError("store.magic", path, "not a TensorStream STORE file");
  }
  if (const uint32_t version = get_le32(bytes.data() + 8); version != kFormatVersion) {
    throw FormatError("store.version", path, "format version " + std::to_string(version) + " is not supported (this build reads 1)");
  }
  if (get_le32(bytes.data() + 12) != 0) throw FormatError("store.reserved", path, "reserved field is not zero");
  if (plain_checksum(bytes.first(32)) != get_le64(bytes.data() + 32)) {
    throw FormatError("store.checksum", path, "header checksum mismatch");
  }
  StoreId id{};
  std::memcpy(id.data(), bytes.data() + 16, id.size());
  bool all_zero = true;
  for (uint8_t b : id) all_zero = all_zero && b == 0;
  if (all_zero) throw FormatError("store.id", path, "store id is all zero");
  return id;
}

std::vector<std::byte> serialize_store_file(const StoreId& id) {
  std::vector<std::byte> bytes(kStoreFileSize);
  std::memcpy(bytes.data(), kStoreMagic, sizeof(kStoreMagic));
  put_le(bytes.data() + 8, kFormatVersion, 4);
  put_le(bytes.data() + 12, 0, 4);
  std::memcpy(bytes.data() + 16, id.data(), id.size());
  put_le(bytes.data() + 32, plain_checksum(std::span(bytes).first(32)), 8);
  return bytes;
}

TempModelDir::TempModelDir(fs::path path, UniqueFd lock_fd) : path_(std::move(path)), lock_fd_(std::move(lock_fd)) {}

TempModelDir::~TempModelDir() {
  if (!path_.empty()) remove_tree_quietly(path_);
}

TempModelDir::TempModelDir(TempModelDir&& other) noexcept
    : path_(std::exchange(other.path_, {})), lock_fd_(std::move(other.lock_fd_)) {}

TempModelDir& TempModelDir::operator=(TempModelDir&& other) noexcept {
  if (this != &other) {
    if (!path_.empty()) remove_tree_quietly(path_);
    path_ = std::exchange(other.path_, {});
    lock_fd_ = std::move(other.lock_fd_);
  }
  return *this;
}

StorageDirectory StorageDirectory::open_existing(const fs::path& root) {
  const fs::path store_file = root / "STORE";
  struct stat st {};
  if (::stat(store_file.c_str(), &st) != 0) {
    if (errno == ENOENT) {
      throw IoError(store_file.string(), ENOENT, "open storage directory (no STORE file: not a TensorStream storage)");
    }
    throw_errno(store_file.string(), "open storage directory");
  }
  return StorageDirectory(root, read_store_id(store_file));
}

StorageDirectory StorageDirectory::open_or_create(const fs::path& root) {
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) throw IoError(root.string(), ec.value(), "create storage directory");
  ensure_dir(root);
  for (const char* sub : {"models", "tmp", "locks"}) ensure_dir(root / sub);

  const fs::path store_file = root / "STORE";
  if (::access(store_file.c_str(), F_OK) != 0) {
    // Several processes may create the same storage at once: each writes a complete candidate and link()s it
    // into place; link never replaces, so exactly one identity wins and everyone reads that one back.
    StoreId id{};
    const uint64_t a = random_u64();
    const uint64_t b = random_u64() | 1;  // never all zero
    std::memcpy(id.data(), &a, 8);
    std::memcpy(id.data() + 8, &b, 8);
    const fs::path candidate = root / "tmp" / ("STORE." + unique_suffix());
    write_file_durably(candidate, serialize_store_file(id));
    const int linked = ::link(candidate.c_str(), store_file.c_str());
    const int link_errno = errno;
    ::unlink(candidate.c_str());
    if (linked != 0 && link_errno != EEXIST) throw IoError(store_file.string(), link_errno, "create STORE");
    fsync_path(root);
  }
  return StorageDirectory(root, read_store_id(store_file));
}

fs::path StorageDirectory::model_dir(std::string_view model_id) const {
  if (!is_valid_model_id(model_id)) {
    throw ConfigError("model_id", "'" + std::string(model_id) +
                                      "' is not a valid model id (1-128 of [A-Za-z0-9._-], not starting with '.' or '-')");
  }
  return models_dir() / std::string(model_id);
}

std::vector<std::string> StorageDirectory::list_models() const {
  std::vector<std::string> ids;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(models_dir(), ec)) {
    const std::string name = entry.path().filename().string();
    if (is_valid_model_id(name) && entry.is_directory()) ids.push_back(name);
  }
  if (ec) throw IoError(models_dir().string(), ec.value(), "list models");
  std::sort(ids.begin(), ids.end());
  return ids;
}

bool StorageDirectory::has_model(std::string_view model_id) const {
  return ::access((model_dir(model_id) / "manifest").c_str(), F_OK) == 0;
}

void StorageDirectory::remove_model(std::string_view model_id) const {
  const fs::path dir = model_dir(model_id);
  const fs::path doomed = tmp_dir() / (std::string(model_id) + ".removed." + unique_suffix());
  if (::rename(dir.c_str(), doomed.c_str()) != 0) throw_errno(dir.string(), "remove model");
  fsync_path(models_dir());
  remove_tree_quietly(doomed);
}

TempModelDir StorageDirectory::make_temp_dir(std::string_view model_id) const {
  const fs::path path = tmp_dir() / (std::string(model_dir(model_id).filename()) + "." + unique_suffix());
  if (::mkdir(path.c_str(), 0755) != 0) throw_errno(path.string(), "create temporary directory");
  UniqueFd fd;
  try {
    fd = open_file(path, O_RDONLY | O_DIRECTORY);
  } catch (...) {
    ::rmdir(path.c_str());
    throw;
  }
  // Held for the writer's lifetime: cleanup_orphaned_files deletes only directories whose lock it can take.
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::rmdir(path.c_str());
    throw IoError(path.string(), err, "lock temporary directory");
  }
  return TempModelDir(path, std::move(fd));
}

PublishOutcome StorageDirectory::publish(TempModelDir& temp, std::string_view model_id, PublishMode mode) const {
  const fs::path target = model_dir(model_id);
  fsync_path(temp.path());
  if (::rename(temp.path().c_str(), target.c_str()) == 0) {
    fsync_path(models_dir());
    temp.release();
    return PublishOutcome::kPublished;
  }
  if (errno != EEXIST && errno != ENOTEMPTY) throw_errno(target.string(), "publish (rename)");
  if (mode == PublishMode::kKeepExisting) return PublishOutcome::kAlreadyExisted;  // temp is removed by its owner

  // Atomic swap: readers see the old model or the new one, never neither. The old one ends up under the temp
  // name and is removed with it.
  if (::renameat2(AT_FDCWD, temp.path().c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) != 0) {
    throw_errno(target.string(), "publish (rename exchange)");
  }
  fsync_path(models_dir());
  return PublishOutcome::kReplaced;
}

ModelLock StorageDirectory::lock_model(std::string_view model_id) const {
  const fs::path path = locks_dir() / (model_dir(model_id).filename().string() + ".lock");
  UniqueFd fd = open_file(path, O_RDWR | O_CREAT, 0644);
  while (::flock(fd.get(), LOCK_EX) != 0) {
    if (errno != EINTR) throw_errno(path.string(), "lock");
  }
  return ModelLock(std::move(fd));
}

}  // namespace tensorstream
