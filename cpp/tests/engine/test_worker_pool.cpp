#include "engine/worker_pool.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <set>
#include <thread>

#include "support/fault_backend.hpp"

namespace tensorstream::detail {
namespace {

TEST(WorkerPool, RunsEveryJobOnItsOwnThreads) {
  const testing::Watchdog dog("WorkerPool.RunsEveryJobOnItsOwnThreads");
  std::mutex mutex;
  std::set<uint32_t> started;
  std::set<std::thread::id> ran_on;
  std::atomic<int> ran{0};
  {
    WorkerPool pool(3, [&](uint32_t i) {
      const std::lock_guard lock(mutex);
      started.insert(i);
    });
    for (int i = 0; i < 1000; ++i) {
      pool.post([&] {
        ++ran;
        const std::lock_guard lock(mutex);
        ran_on.insert(std::this_thread::get_id());
      });
    }
  }
  EXPECT_EQ(ran.load(), 1000);
  EXPECT_EQ(started, (std::set<uint32_t>{0, 1, 2}));
  EXPECT_EQ(ran_on.count(std::this_thread::get_id()), 0u);
  EXPECT_LE(ran_on.size(), 3u);
}

TEST(WorkerPool, ShutdownRunsQueuedJobsAndTheJobsTheyPost) {
  const testing::Watchdog dog("WorkerPool.ShutdownRunsQueuedJobsAndTheJobsTheyPost");
  std::atomic<int> ran{0};
  WorkerPool pool(1, {});
  pool.post([&] { std::this_thread::sleep_for(std::chrono::milliseconds(20)); });
  for (int i = 0; i < 10; ++i) {
    pool.post([&] {
      ++ran;
      pool.post([&] { ++ran; });  // a job that posts a follow-up, as a finished read posts its verification
    });
  }
  pool.shutdown();
  EXPECT_EQ(ran.load(), 20);
  pool.shutdown();  // idempotent
}

}  // namespace
}  // namespace tensorstream::detail
