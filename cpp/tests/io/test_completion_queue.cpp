#include "tensorstream/io/completion_queue.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <set>
#include <thread>
#include <vector>

#include "support/fault_backend.hpp"

namespace tensorstream {
namespace {

using testing::Watchdog;

TEST(CompletionQueue, ReapMovesOutWhatArrivedInOrder) {
  CompletionQueue queue;
  queue.add_submitted(3);
  EXPECT_EQ(queue.in_flight(), 3u);
  const std::vector<Completion> done = {{7, 10}, {8, -5}};
  queue.push(done);
  std::vector<Completion> out(1);
  ASSERT_EQ(queue.reap(out, false), 1u);
  EXPECT_EQ(out[0].user_data, 7u);
  EXPECT_EQ(out[0].result, 10);
  EXPECT_EQ(queue.in_flight(), 2u);  // reaped ones stop counting; arrived-but-unreaped still count
  out.resize(4);
  ASSERT_EQ(queue.reap(out, false), 1u);
  EXPECT_EQ(out[0].user_data, 8u);
  EXPECT_EQ(out[0].result, -5);
  EXPECT_EQ(queue.reap(out, false), 0u);  // one still in flight, nothing arrived: no waiting without wait
  EXPECT_EQ(queue.in_flight(), 1u);
}

TEST(CompletionQueue, WaitReturnsAtOnceWhenNothingIsInFlight) {
  const Watchdog dog("CompletionQueue.WaitReturnsAtOnceWhenNothingIsInFlight");
  CompletionQueue queue;
  std::vector<Completion> out(2);
  EXPECT_EQ(queue.reap(out, true), 0u);
  EXPECT_EQ(queue.reap({}, true), 0u);
}

TEST(CompletionQueue, WaitBlocksUntilACompletionArrives) {
  const Watchdog dog("CompletionQueue.WaitBlocksUntilACompletionArrives");
  CompletionQueue queue;
  queue.add_submitted(1);
  std::atomic<bool> pushed{false};
  std::thread producer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    pushed = true;
    queue.push(Completion{42, 1});
  });
  std::vector<Completion> out(2);
  ASSERT_EQ(queue.reap(out, true), 1u);
  EXPECT_TRUE(pushed.load()) << "reap returned before the completion was pushed";
  EXPECT_EQ(out[0].user_data, 42u);
  producer.join();
}

TEST(CompletionQueue, ManyProducersOneReaperSeeEachCompletionOnce) {
  const Watchdog dog("CompletionQueue.ManyProducersOneReaperSeeEachCompletionOnce");
  CompletionQueue queue;
  constexpr uint64_t kThreads = 4;
  constexpr uint64_t kEach = 2000;
  std::vector<std::thread> producers;
  for (uint64_t t = 0; t < kThreads; ++t) {
    producers.emplace_back([&, t] {
      for (uint64_t i = 0; i < kEach; ++i) {
        queue.add_submitted(1);
        queue.push(Completion{t * kEach + i, 0});
      }
    });
  }
  std::set<uint64_t> seen;
  std::vector<Completion> out(16);
  while (seen.size() < kThreads * kEach) {
    const size_t n = queue.reap(out, true);
    for (size_t i = 0; i < n; ++i) ASSERT_TRUE(seen.insert(out[i].user_data).second);
    if (n == 0) std::this_thread::yield();
  }
  for (auto& thread : producers) thread.join();
  EXPECT_EQ(queue.in_flight(), 0u);
}

}  // namespace
}  // namespace tensorstream
