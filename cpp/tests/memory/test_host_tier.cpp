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

namespace tensorstream {
namespace {

// Next-use eviction: with a known order, a block used sooner than a held one replaces it; the evicted buffer is
// freed only once its retire check passes (copies queued from it are done).
TEST(HostTierEviction, HeldBlocksUsedLaterMakeRoomOnceTheirCopiesAreDone) {
  std::atomic<int64_t> live{0};
  std::atomic<bool> fail{false};
  HostTier tier(4, 2 * 4096, std::make_unique<TestAllocator>(&live, &fail));
  for (size_t b : {0u, 1u}) {
    ASSERT_TRUE(tier.reserve(b, 4096));
    ASSERT_FALSE(tier.fill_buffer(b).empty());
    tier.commit(b, true);
  }
  // Next uses: block 0 in 9 accesses, block 1 in 2, block 2 (being loaded) in 5.
  const HostTier::NextUse next_use = [](size_t b) -> std::optional<uint64_t> {
    const uint64_t distances[] = {9, 2, 5, 7};
    return distances[b];
  };
  bool copies_done = false;
  int checks_made = 0;
  const auto make_check = [&]() -> HostTier::RetireCheck {
    ++checks_made;
    return [&] { return copies_done; };
  };
  EXPECT_FALSE(tier.reserve(2, 4096)) << "without an order, a full tier evicts nothing";
  EXPECT_FALSE(tier.reserve(2, 4096, next_use, make_check)) << "block 0 is evicted, its room not back yet";
  EXPECT_EQ(tier.evictions(), 1u);
  EXPECT_EQ(checks_made, 1);
  EXPECT_TRUE(tier.find(0).empty()) << "block 0 (used furthest ahead) left";
  EXPECT_FALSE(tier.find(1).empty()) << "block 1 (used soonest) stays";
  EXPECT_EQ(live.load(), 2) << "the evicted buffer waits for its copies";
  EXPECT_FALSE(tier.reserve(2, 4096, next_use, make_check)) << "room on its way back: nothing more is evicted";
  EXPECT_EQ(tier.evictions(), 1u);
  copies_done = true;
  ASSERT_TRUE(tier.reserve(2, 4096, next_use, make_check)) << "reclaimed: block 2 fits";
  EXPECT_FALSE(tier.fill_buffer(2).empty());
  tier.commit(2, true);
  EXPECT_EQ(live.load(), 2);
  // Block 3 is used later (7) than block 1 (2) but sooner than nothing held: block 2 (5) is used sooner too.
  EXPECT_FALSE(tier.reserve(3, 4096, next_use, make_check)) << "every held block is used sooner than block 3";
  EXPECT_EQ(tier.evictions(), 1u);
}

}  // namespace
}  // namespace tensorstream
