// StagingPool: a bounded set of equal, 4 KiB-aligned host buffers that stored bytes pass through on their way to
// a slot when they cannot be read straight into it: compressed chunks (read here, then decoded into the slot)
// and, for device slots, every chunk (read here, verified, then copied to the device). 4 KiB alignment keeps
// O_DIRECT usable for these reads too: a read covers the chunk's range rounded out to 4 KiB.
//
// A StagingLease is one buffer, owned by whoever holds the lease; it returns to the pool when the lease is
// destroyed (for a device copy: when the copy has completed). Buffers are allocated on first use, up to the
// bound, and kept until the pool goes; where their memory comes from is a HostAllocator: aligned pageable
// memory today, page-locked memory (cuMemHostAlloc) for the CUDA path, through the same interface.
//
// The pool never blocks a thread that holds engine locks: try_acquire() answers at once, and the owner of a
// queue of waiting reads registers set_on_available() to be told when a lease came back.
//
// Thread-safety: every method may be called from any thread. A lease is owned by one thread at a time.
#pragma once

#include <cstddef>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace tensorstream {

// Where staging memory comes from. allocate() returns `bytes` (a multiple of 4096) at a 4 KiB-aligned address or
// throws (IoError with ENOMEM, or the allocator's own typed error); deallocate() never throws.
// Thread-safety: implementations must accept calls from any thread.
class HostAllocator {
 public:
  virtual ~HostAllocator() = default;
  [[nodiscard]] virtual std::string name() const = 0;  // "pageable", "pinned", ...
  [[nodiscard]] virtual bool pinned() const = 0;       // page-locked: a device can DMA from it
  [[nodiscard]] virtual std::byte* allocate(size_t bytes) = 0;
  virtual void deallocate(std::byte* buffer, size_t bytes) noexcept = 0;
};

// Ordinary 4 KiB-aligned memory (aligned_alloc).
[[nodiscard]] std::unique_ptr<HostAllocator> make_pageable_allocator();

struct StagingStats {
  std::string allocator;          // HostAllocator::name()
  bool pinned = false;
  uint64_t buffer_bytes = 0;      // size of each buffer
  uint64_t max_buffers = 0;       // the bound
  uint64_t allocated_bytes = 0;   // buffers allocated so far x buffer_bytes (never above max_buffers x buffer_bytes)
  uint64_t in_use_bytes = 0;      // leased now
  uint64_t peak_in_use_bytes = 0;
  uint64_t leases = 0;            // leases granted
  uint64_t exhausted = 0;         // try_acquire() calls that found every buffer leased
};

class StagingPool;

// One leased buffer. Move-only; returns the buffer to its pool on destruction or reset().
class StagingLease {
 public:
  StagingLease() = default;
  ~StagingLease() { reset(); }
  StagingLease(StagingLease&& other) noexcept;
  StagingLease& operator=(StagingLease&& other) noexcept;
  StagingLease(const StagingLease&) = delete;
  StagingLease& operator=(const StagingLease&) = delete;

  // The whole buffer (buffer_bytes of the pool), 4 KiB aligned; empty for an empty lease.
  [[nodiscard]] std::span<std::byte> bytes() const noexcept { return bytes_; }
  [[nodiscard]] explicit operator bool() const noexcept { return pool_ != nullptr; }
  // Returns the buffer now (the lease becomes empty). Never throws.
  void reset() noexcept;

 private:
  friend class StagingPool;
  StagingLease(std::shared_ptr<StagingPool> pool, std::span<std::byte> bytes) : pool_(std::move(pool)), bytes_(bytes) {}
  std::shared_ptr<StagingPool> pool_;  // keeps the pool alive while the lease is out
  std::span<std::byte> bytes_;
};

class StagingPool : public std::enable_shared_from_this<StagingPool> {
 public:
  // `buffer_bytes` is rounded up to 4096; `max_buffers` >= 1 (else ConfigError). allocator: pageable by default.
  [[nodiscard]] static std::shared_ptr<StagingPool> create(uint64_t buffer_bytes, uint64_t max_buffers,
                                                           std::unique_ptr<HostAllocator> allocator = nullptr);
  ~StagingPool();
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  // Thread-safe, never blocks. A free buffer (allocating one while under the bound), or nullopt when all
  // max_buffers are leased. Throws only what the allocator throws.
  [[nodiscard]] std::optional<StagingLease> try_acquire();
  // Thread-safe. Blocks until a buffer is free. Only for callers whose wait cannot hold up the return of leases
  // (a worker waiting for device copies to finish, never a thread that must reap reads).
  [[nodiscard]] StagingLease acquire();
  // Thread-safe. `callback` runs after each returned lease, on the returning thread, without the pool's lock held
  // (so it may call try_acquire). It must not throw. An empty function removes it.
  void set_on_available(std::function<void()> callback);
  [[nodiscard]] uint64_t buffer_bytes() const noexcept { return buffer_bytes_; }
  [[nodiscard]] StagingStats stats() const;

 private:
  friend class StagingLease;
  StagingPool(uint64_t buffer_bytes, uint64_t max_buffers, std::unique_ptr<HostAllocator> allocator);
  void give_back(std::span<std::byte> bytes) noexcept;

  const uint64_t buffer_bytes_;
  const uint64_t max_buffers_;
  const std::unique_ptr<HostAllocator> allocator_;
  mutable std::mutex mutex_;
  std::condition_variable returned_;  // acquire(): a lease came back
  std::vector<std::byte*> all_;   // every buffer allocated (freed by the destructor)
  std::vector<std::byte*> free_;  // not leased
  uint64_t peak_in_use_ = 0;
  uint64_t leases_ = 0;
  uint64_t exhausted_ = 0;
  std::shared_ptr<const std::function<void()>> on_available_;
};

}  // namespace tensorstream
