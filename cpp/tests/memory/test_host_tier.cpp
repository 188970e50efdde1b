#include "tensorstream/memory/host_tier.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "tensorstream/error.hpp"

namespace tensorstream {
namespace {

// Pageable memory that can be told to fail, counting what is live.
class TestAllocator final : public HostAllocator {
 public:
  TestAllocator(std::atomic<int64_t>* live, std::atomic<bool>* fail) : live_(live), fail_(fail) {}
  [[nodiscard]] std::string name() const override { return "test"; }
  [[nodiscard]] bool pinned() const override { return false; }
  [[nodiscard]] std::byte* allocate(size_t bytes) override {
    if (fail_->load()) throw IoError("test", ENOMEM, "allocate");
    ++*live_;
    return make_pageable_allocator()->allocate(bytes);
  }
  void deallocate(std::byte* buffer, size_t bytes) noexcept override {
    --*live_;
    make_pageable_allocator()->deallocate(buffer, bytes);
  }

 private:
  std::atomic<int64_t>* live_;
  std::atomic<bool>* fail_;
};

TEST(HostTier, HoldsWhatItsLoadsFilledUpToItsCapacity) {
  std::atomic<int64_t> live{0};
  std::atomic<bool> fail{false};
  {
    HostTier tier(4, 3 * 4096, std::make_unique<TestAllocator>(&live, &fail));
    EXPECT_TRUE(tier.find(0).empty());
    ASSERT_TRUE(tier.reserve(0, 5000));  // 8 KiB of the 12
    EXPECT_FALSE(tier.reserve(0, 5000)) << "already being filled";
    EXPECT_FALSE(tier.reserve(1, 8192)) << "does not fit beside block 0";
    ASSERT_TRUE(tier.reserve(1, 100));
    EXPECT_EQ(live.load(), 0) << "reserving allocates nothing";
    const std::span<std::byte> buffer = tier.fill_buffer(0);
    ASSERT_EQ(buffer.size(), 8192u);
    EXPECT_EQ(tier.fill_buffer(0).data(), buffer.data()) << "one buffer per block";
    std::memset(buffer.data(), 7, 5000);
    EXPECT_TRUE(tier.find(0).empty()) << "not held before its load commits";
    tier.commit(0, true);
    ASSERT_EQ(tier.find(0).size(), 8192u);
    EXPECT_EQ(tier.find(0)[4999], std::byte{7});
    EXPECT_EQ(tier.held_bytes(), 8192u);
    tier.commit(1, false);  // a failed load frees its room
    EXPECT_TRUE(tier.find(1).empty());
    EXPECT_TRUE(tier.reserve(2, 4096));
    EXPECT_FALSE(tier.reserve(0, 5000)) << "a held block is not filled again";
    tier.commit(2, false);
  }
  EXPECT_EQ(live.load(), 0) << "the tier frees what it allocated";
}

TEST(HostTier, AFailedAllocationMeansTheBlockIsNotKept) {
  std::atomic<int64_t> live{0};
  std::atomic<bool> fail{true};
  HostTier tier(2, 1 << 20, std::make_unique<TestAllocator>(&live, &fail));
  ASSERT_TRUE(tier.reserve(0, 4096));
  EXPECT_TRUE(tier.fill_buffer(0).empty());
  tier.commit(0, true);  // the load succeeded, but nothing was kept
  EXPECT_TRUE(tier.find(0).empty());
  EXPECT_EQ(tier.held_bytes(), 0u);
  fail = false;
  ASSERT_TRUE(tier.reserve(0, 4096)) << "its room came back";
  EXPECT_FALSE(tier.fill_buffer(0).empty());
  tier.commit(0, true);
  EXPECT_FALSE(tier.find(0).empty());
}

TEST(HostTier, ConcurrentFillsOfOneBlockShareOneBuffer) {
  std::atomic<int64_t> live{0};
  std::atomic<bool> fail{false};
  HostTier tier(1, 1 << 20, std::make_unique<TestAllocator>(&live, &fail));
  ASSERT_TRUE(tier.reserve(0, 65536));
  std::vector<std::thread> workers;
  std::vector<std::byte*> seen(4, nullptr);
  for (size_t i = 0; i < 4; ++i) {
    workers.emplace_back([&, i] {
      const std::span<std::byte> buffer = tier.fill_buffer(0);
      std::memset(buffer.data() + i * 16384, static_cast<int>(i), 16384);  // one chunk each
      seen[i] = buffer.data();
    });
  }
  for (auto& worker : workers) worker.join();
  EXPECT_EQ(live.load(), 1);
  for (std::byte* pointer : seen) EXPECT_EQ(pointer, seen[0]);
  tier.commit(0, true);
  EXPECT_EQ(tier.find(0)[3 * 16384], std::byte{3});
}

}  // namespace
}  // namespace tensorstream
