#include "tensorstream/memory/staging_pool.hpp"

#include <cerrno>
#include <cstdlib>
#include <utility>

#include "tensorstream/error.hpp"

namespace tensorstream {

namespace {
constexpr uint64_t kStagingAlignment = 4096;  // O_DIRECT and cuFile need 4 KiB-aligned buffers

class PageableAllocator final : public HostAllocator {
 public:
  [[nodiscard]] std::string name() const override { return "pageable"; }
  [[nodiscard]] bool pinned() const override { return false; }
  [[nodiscard]] std::byte* allocate(size_t bytes) override {
    void* memory = std::aligned_alloc(kStagingAlignment, bytes);
    if (memory == nullptr) throw IoError("staging", ENOMEM, "allocate " + std::to_string(bytes) + " bytes");
    return static_cast<std::byte*>(memory);
  }
  void deallocate(std::byte* buffer, size_t /*bytes*/) noexcept override { std::free(buffer); }
};
}  // namespace

std::unique_ptr<HostAllocator> make_pageable_allocator() { return std::make_unique<PageableAllocator>(); }

// ---- StagingLease -------------------------------------------------------------------------------------------------

StagingLease::StagingLease(StagingLease&& other) noexcept
    : pool_(std::move(other.pool_)), bytes_(std::exchange(other.bytes_, {})) {}

StagingLease& StagingLease::operator=(StagingLease&& other) noexcept {
  if (this != &other) {
    reset();
    pool_ = std::move(other.pool_);
    bytes_ = std::exchange(other.bytes_, {});
  }
  return *this;
}

void StagingLease::reset() noexcept {
  if (!pool_) return;
  const std::shared_ptr<StagingPool> pool = std::move(pool_);
  pool->give_back(bytes_);
  bytes_ = {};
}

// ---- StagingPool --------------------------------------------------------------------------------------------------

std::shared_ptr<StagingPool> StagingPool::create(uint64_t buffer_bytes, uint64_t max_buffers,
                                                 std::unique_ptr<HostAllocator> allocator) {
  if (buffer_bytes == 0) throw ConfigError("staging_buffer_bytes", "must be at least 1");
  if (max_buffers == 0) throw ConfigError("staging_buffers", "must be at least 1");
  const uint64_t rounded = (buffer_bytes + kStagingAlignment - 1) / kStagingAlignment * kStagingAlignment;
  if (rounded < buffer_bytes || rounded > (uint64_t{1} << 40) / max_buffers) {
    throw ConfigError("staging_buffers", std::to_string(max_buffers) + " buffers of " + std::to_string(buffer_bytes) +
                                             " bytes exceed 1 TiB");
  }
  // The constructor is private (leases must hold a shared_ptr), so no make_shared.
  return std::shared_ptr<StagingPool>(
      new StagingPool(rounded, max_buffers, allocator ? std::move(allocator) : make_pageable_allocator()));
}

StagingPool::StagingPool(uint64_t buffer_bytes, uint64_t max_buffers, std::unique_ptr<HostAllocator> allocator)
    : buffer_bytes_(buffer_bytes), max_buffers_(max_buffers), allocator_(std::move(allocator)) {}

StagingPool::~StagingPool() {
  // Every lease holds the pool alive, so all buffers are back by now.
  for (std::byte* buffer : all_) allocator_->deallocate(buffer, buffer_bytes_);
}

std::optional<StagingLease> StagingPool::try_acquire() {
  std::byte* buffer = nullptr;
  {
    const std::lock_guard lock(mutex_);
    if (!free_.empty()) {
      buffer = free_.back();
      free_.pop_back();
    } else if (all_.size() < max_buffers_) {
      // Room first, so that neither push_back below nor give_back()'s can throw once the buffer exists.
      all_.reserve(all_.size() + 1);
      free_.reserve(all_.size() + 1);
      buffer = allocator_->allocate(buffer_bytes_);  // under the lock: the bound must hold against racing callers
      all_.push_back(buffer);
    } else {
      ++exhausted_;
      return std::nullopt;
    }
    ++leases_;
    const uint64_t in_use = all_.size() - free_.size();
    if (in_use > peak_in_use_) peak_in_use_ = in_use;
  }
  return StagingLease(shared_from_this(), {buffer, static_cast<size_t>(buffer_bytes_)});
}

StagingLease StagingPool::acquire() {
  for (;;) {
    if (std::optional<StagingLease> lease = try_acquire()) return std::move(*lease);
    std::unique_lock lock(mutex_);
    returned_.wait(lock, [&] { return !free_.empty(); });  // then race for it through try_acquire
  }
}

void StagingPool::give_back(std::span<std::byte> bytes) noexcept {
  std::shared_ptr<const std::function<void()>> callback;
  {
    const std::lock_guard lock(mutex_);
    free_.push_back(bytes.data());  // never reallocates: free_ has room for every buffer (see try_acquire)
    callback = on_available_;
  }
  returned_.notify_one();
  if (callback && *callback) (*callback)();
}

void StagingPool::set_on_available(std::function<void()> callback) {
  auto shared = std::make_shared<const std::function<void()>>(std::move(callback));
  const std::lock_guard lock(mutex_);
  on_available_.swap(shared);
}

StagingStats StagingPool::stats() const {
  const std::lock_guard lock(mutex_);
  StagingStats out;
  out.allocator = allocator_->name();
  out.pinned = allocator_->pinned();
  out.buffer_bytes = buffer_bytes_;
  out.max_buffers = max_buffers_;
  out.allocated_bytes = all_.size() * buffer_bytes_;
  out.in_use_bytes = (all_.size() - free_.size()) * buffer_bytes_;
  out.peak_in_use_bytes = peak_in_use_ * buffer_bytes_;
  out.leases = leases_;
  out.exhausted = exhausted_;
  return out;
}

}  // namespace tensorstream
