#include "engine/io_queue.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <mutex>
#include <set>
#include <vector>

#include "io/pread_backend.hpp"
#include "support/fault_backend.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/io/file.hpp"

namespace tensorstream::detail {
namespace {

using testing::TempDir;
using testing::Watchdog;

// The pread pool, recording the most reads it ever held at once, and holding every read until the gate opens.
class GatedBackend final : public IoBackend {
 public:
  GatedBackend()
      : inner_(make_pread_backend(8, [this](int fd, void* buf, size_t count, off_t offset) {
          std::unique_lock lock(mutex_);
          gate_cv_.wait(lock, [&] { return open_; });
          lock.unlock();
          return ::pread(fd, buf, count, offset);
        })) {}
  void submit(std::span<const ReadRequest> requests) override {
    inner_->submit(requests);
    const size_t now = inner_->in_flight();
    size_t seen = max_in_flight.load();
    while (now > seen && !max_in_flight.compare_exchange_weak(seen, now)) {
    }
    submitted += requests.size();
  }
  size_t reap(std::span<Completion> out, bool wait) override { return inner_->reap(out, wait); }
  [[nodiscard]] size_t in_flight() const override { return inner_->in_flight(); }
  [[nodiscard]] BackendCaps caps() const override { return inner_->caps(); }
  void open() {
    {
      const std::lock_guard lock(mutex_);
      open_ = true;
    }
    gate_cv_.notify_all();
  }
  std::atomic<size_t> max_in_flight{0};
  std::atomic<size_t> submitted{0};

 private:
  std::mutex mutex_;
  std::condition_variable gate_cv_;
  bool open_ = false;
  std::unique_ptr<IoBackend> inner_;  // last: its workers call back into the gate
};

struct File {
  explicit File(const TempDir& dir) : bytes(testing::random_bytes(1 << 20, 5)) {
    testing::write_file_bytes(dir.path() / "data", bytes);
    fd = open_file(dir.path() / "data", O_RDONLY);
  }
  std::vector<std::byte> bytes;
  UniqueFd fd;
};

// Collects what the handler receives.
struct Received {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<std::pair<std::unique_ptr<QueuedRead>, int64_t>> reads;
  IoQueue::Handler handler() {
    return [this](std::unique_ptr<QueuedRead> read, int64_t result) {
      {
        const std::lock_guard lock(mutex);
        reads.emplace_back(std::move(read), result);
      }
      cv.notify_all();
    };
  }
  void wait_for(size_t count) {
    std::unique_lock lock(mutex);
    cv.wait(lock, [&] { return reads.size() >= count; });
  }
  size_t size() {
    const std::lock_guard lock(mutex);
    return reads.size();
  }
};

std::vector<std::unique_ptr<QueuedRead>> reads_of(const File& file, size_t count, uint64_t length, bool staged,
                                                  std::vector<std::vector<std::byte>>* buffers) {
  std::vector<std::unique_ptr<QueuedRead>> out;
  for (size_t i = 0; i < count; ++i) {
    auto read = std::make_unique<QueuedRead>();
    read->request.fd = file.fd.get();
    read->request.offset = i * length;
    if (staged) {
      read->staged_length = length;
    } else {
      buffers->emplace_back(length);
      read->request.buffer = buffers->back();
    }
    read->block = static_cast<uint32_t>(i);
    out.push_back(std::move(read));
  }
  return out;
}

TEST(IoQueue, NeverHoldsMoreThanItsDepthInTheBackend) {
  const Watchdog dog("IoQueue.NeverHoldsMoreThanItsDepthInTheBackend");
  TempDir dir;
  File file(dir);
  GatedBackend backend;
  Stats stats(1);
  TraceRecorder trace;
  Received received;
  std::vector<std::vector<std::byte>> buffers;
  buffers.reserve(40);
  IoQueue queue(backend, 3, nullptr, stats, trace, received.handler());
  queue.submit(reads_of(file, 40, 4096, false, &buffers));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(backend.submitted.load(), 3u);  // the rest wait in the queue, not in the backend
  backend.open();
  received.wait_for(40);
  EXPECT_LE(backend.max_in_flight.load(), 3u);
  for (auto& [read, result] : received.reads) {
    ASSERT_EQ(result, 4096);
    const uint64_t offset = read->request.offset;
    EXPECT_TRUE(std::equal(read->request.buffer.begin(), read->request.buffer.end(),
                           file.bytes.begin() + static_cast<std::ptrdiff_t>(offset)));
  }
}

TEST(IoQueue, StagedReadsTakeALeaseAtDispatchAndWaitInOrderWhenThePoolIsEmpty) {
  const Watchdog dog("IoQueue.StagedReadsTakeALeaseAtDispatchAndWaitInOrderWhenThePoolIsEmpty");
  TempDir dir;
  File file(dir);
  const auto backend = make_pread_backend(2);
  const auto pool = StagingPool::create(8192, 2);
  Stats stats(1);
  TraceRecorder trace;
  Received received;
  IoQueue queue(*backend, 16, pool.get(), stats, trace, received.handler());
  pool->set_on_available([&] { queue.pump(); });
  queue.submit(reads_of(file, 6, 8192, true, nullptr));
  received.wait_for(2);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(received.size(), 2u) << "only as many staged reads as buffers may run";
  EXPECT_EQ(pool->stats().in_use_bytes, 2u * 8192u);
  {
    const std::lock_guard lock(received.mutex);
    std::set<uint32_t> first{received.reads[0].first->block, received.reads[1].first->block};
    EXPECT_EQ(first, (std::set<uint32_t>{0, 1})) << "the first two reads submitted are the first dispatched";
  }
  // The handler's owner keeps each lease until it has used the bytes; returning one lets the next read go. With one
  // lease back at a time only one read is in flight, so the later ones arrive in submission order.
  for (size_t done = 0; done < 6; ++done) {
    std::unique_ptr<QueuedRead> read;
    int64_t result = 0;
    {
      const std::lock_guard lock(received.mutex);
      read = std::move(received.reads[done].first);
      result = received.reads[done].second;
    }
    ASSERT_EQ(result, 8192);
    if (done >= 2) EXPECT_EQ(read->block, done) << "staged reads are dispatched in submission order";
    const std::span<std::byte> bytes = read->staging.bytes().subspan(0, 8192);
    EXPECT_TRUE(std::equal(bytes.begin(), bytes.end(),
                           file.bytes.begin() + static_cast<std::ptrdiff_t>(read->block * 8192)));
    read.reset();  // returns the lease
    if (done + 2 < 6) received.wait_for(done + 3);
  }
  EXPECT_LE(pool->stats().peak_in_use_bytes, 2u * 8192u);
  queue.shutdown();
  pool->set_on_available({});
}

TEST(IoQueue, ShutdownCancelsQueuedReadsAndFinishesThoseInFlight) {
  const Watchdog dog("IoQueue.ShutdownCancelsQueuedReadsAndFinishesThoseInFlight");
  TempDir dir;
  File file(dir);
  GatedBackend backend;
  Stats stats(1);
  TraceRecorder trace;
  Received received;
  std::vector<std::vector<std::byte>> buffers;
  buffers.reserve(10);
  {
    IoQueue queue(backend, 2, nullptr, stats, trace, received.handler());
    queue.submit(reads_of(file, 10, 4096, false, &buffers));
    std::thread opener([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      backend.open();
    });
    queue.shutdown();  // 8 cancelled at once; waits for the 2 in flight, which the opener lets finish
    opener.join();
    std::vector<std::unique_ptr<QueuedRead>> late;
    late.push_back(std::make_unique<QueuedRead>());
    queue.submit(std::move(late));  // after shutdown: cancelled too, never lost
  }
  ASSERT_EQ(received.size(), 11u);
  size_t cancelled = 0;
  size_t read = 0;
  for (auto& [entry, result] : received.reads) {
    if (result == -ECANCELED) ++cancelled;
    if (result == 4096) ++read;
  }
  EXPECT_EQ(cancelled, 9u);
  EXPECT_EQ(read, 2u);
}

TEST(IoQueue, BusyTimeCountsOnlyWhileReadsAreInFlight) {
  TempDir dir;
  File file(dir);
  const auto backend = make_pread_backend(2);
  Stats stats(1);
  TraceRecorder trace;
  Received received;
  std::vector<std::vector<std::byte>> buffers;
  buffers.reserve(4);
  IoQueue queue(*backend, 4, nullptr, stats, trace, received.handler());
  queue.submit(reads_of(file, 4, 65536, false, &buffers));
  received.wait_for(4);
  queue.shutdown();
  const uint64_t busy = stats.snapshot().io_busy_ns;
  EXPECT_GT(busy, 0u);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_EQ(stats.snapshot().io_busy_ns, busy) << "idle time must not count as busy";
}

}  // namespace
}  // namespace tensorstream::detail
