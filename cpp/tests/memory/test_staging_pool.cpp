#include "tensorstream/memory/staging_pool.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <set>
#include <thread>
#include <vector>

#include "tensorstream/error.hpp"

namespace tensorstream {
namespace {

// Counts what it hands out, so a test can see the pool frees exactly what it allocated.
class CountingAllocator final : public HostAllocator {
 public:
  explicit CountingAllocator(std::atomic<int64_t>* live) : live_(live) {}
  [[nodiscard]] std::string name() const override { return "counting"; }
  [[nodiscard]] bool pinned() const override { return true; }
  [[nodiscard]] std::byte* allocate(size_t bytes) override {
    ++*live_;
    return make_pageable_allocator()->allocate(bytes);
  }
  void deallocate(std::byte* buffer, size_t bytes) noexcept override {
    --*live_;
    make_pageable_allocator()->deallocate(buffer, bytes);
  }

 private:
  std::atomic<int64_t>* live_;
};

TEST(StagingPool, LeasesAreAlignedDistinctAndBounded) {
  const auto pool = StagingPool::create(5000, 3);
  EXPECT_EQ(pool->buffer_bytes(), 8192u);  // rounded up to 4 KiB
  std::vector<StagingLease> leases;
  std::set<std::byte*> addresses;
  for (int i = 0; i < 3; ++i) {
    auto lease = pool->try_acquire();
    ASSERT_TRUE(lease.has_value());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(lease->bytes().data()) % 4096, 0u);
    EXPECT_EQ(lease->bytes().size(), 8192u);
    addresses.insert(lease->bytes().data());
    leases.push_back(std::move(*lease));
  }
  EXPECT_EQ(addresses.size(), 3u);
  EXPECT_FALSE(pool->try_acquire().has_value());  // the bound holds
  StagingStats stats = pool->stats();
  EXPECT_EQ(stats.allocated_bytes, 3u * 8192u);
  EXPECT_EQ(stats.in_use_bytes, 3u * 8192u);
  EXPECT_EQ(stats.exhausted, 1u);
  EXPECT_EQ(stats.leases, 3u);
  leases.pop_back();  // returns one
  auto again = pool->try_acquire();
  ASSERT_TRUE(again.has_value());
  EXPECT_TRUE(addresses.count(again->bytes().data()) == 1) << "a returned buffer is reused, not a new one made";
  stats = pool->stats();
  EXPECT_EQ(stats.allocated_bytes, 3u * 8192u);
  EXPECT_EQ(stats.peak_in_use_bytes, 3u * 8192u);
}

TEST(StagingPool, AllocatesOnFirstUseAndFreesEverythingWithTheLastLease) {
  std::atomic<int64_t> live{0};
  std::optional<StagingLease> outlives;
  {
    const auto pool = StagingPool::create(4096, 8, std::make_unique<CountingAllocator>(&live));
    EXPECT_EQ(live.load(), 0);
    EXPECT_EQ(pool->stats().allocator, "counting");
    EXPECT_TRUE(pool->stats().pinned);
    auto a = pool->try_acquire();
    auto b = pool->try_acquire();
    EXPECT_EQ(live.load(), 2);
    a.reset();
    outlives = std::move(b);  // the lease keeps the pool alive past its last shared_ptr
  }
  EXPECT_EQ(live.load(), 2);
  outlives->reset();
  EXPECT_EQ(live.load(), 0);
}

TEST(StagingPool, ReturningALeaseCallsOnAvailableWithoutTheLockHeld) {
  const auto pool = StagingPool::create(4096, 1);
  int calls = 0;
  std::optional<StagingLease> taken_in_callback;
  pool->set_on_available([&] {
    ++calls;
    if (!taken_in_callback) taken_in_callback = pool->try_acquire();  // would deadlock were the lock held
  });
  auto lease = pool->try_acquire();
  ASSERT_TRUE(lease.has_value());
  lease->reset();
  EXPECT_EQ(calls, 1);
  ASSERT_TRUE(taken_in_callback.has_value());
  EXPECT_TRUE(static_cast<bool>(*taken_in_callback));
  pool->set_on_available({});
  taken_in_callback->reset();
  EXPECT_EQ(calls, 1);  // removed: not called any more
}

TEST(StagingPool, MovedLeasesReturnOnce) {
  const auto pool = StagingPool::create(4096, 2);
  auto lease = *pool->try_acquire();
  StagingLease moved = std::move(lease);
  EXPECT_FALSE(static_cast<bool>(lease));  // NOLINT(bugprone-use-after-move): the moved-from state is the point
  EXPECT_TRUE(lease.bytes().empty());
  StagingLease assigned;
  assigned = std::move(moved);
  EXPECT_EQ(pool->stats().in_use_bytes, 4096u);
  assigned.reset();
  assigned.reset();
  EXPECT_EQ(pool->stats().in_use_bytes, 0u);
}

TEST(StagingPool, ConcurrentLeasesNeverShareABuffer) {
  const auto pool = StagingPool::create(4096, 4);
  std::atomic<int> overlaps{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        auto lease = pool->try_acquire();
        if (!lease) continue;
        const auto mark = static_cast<std::byte>(t);
        lease->bytes()[0] = mark;
        std::this_thread::yield();
        if (lease->bytes()[0] != mark) ++overlaps;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(overlaps.load(), 0);
  EXPECT_LE(pool->stats().allocated_bytes, 4u * 4096u);
  EXPECT_EQ(pool->stats().in_use_bytes, 0u);
}

TEST(StagingPool, BadSizesAreConfigErrors) {
  EXPECT_THROW((void)StagingPool::create(0, 1), ConfigError);
  EXPECT_THROW((void)StagingPool::create(4096, 0), ConfigError);
  EXPECT_THROW((void)StagingPool::create(uint64_t{1} << 40, 2), ConfigError);
}

}  // namespace
}  // namespace tensorstream
