// Private: the engine's bounded I/O queue. Hands reads to the IoBackend, at most `depth` at a time, reaps their
// completions on its own thread and passes each finished read to a handler. Reads that need a staging buffer
// (QueuedRead::staged_length > 0) get a lease from the StagingPool when they are handed to the backend, not when
// they are queued, so a block of a thousand compressed chunks holds only as many buffers as it has reads in
// flight; when the pool is exhausted the queue waits (in order) until a lease comes back.
//
// It also keeps the I/O statistics that only it can see (busy time: reads in flight 0 -> 1 -> 0) and gives every
// traced read an I/O lane, so that the reads of one lane never overlap in the trace.
//
// Ownership: a QueuedRead belongs to the queue from submit() until the handler receives it.
// Thread-safety: submit() and pump() from any thread (handlers included); shutdown() from one thread. The handler
// runs on the reaper thread, or on the thread calling shutdown() for cancelled reads.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "tensorstream/io/io_backend.hpp"
#include "tensorstream/memory/staging_pool.hpp"
#include "tensorstream/stats/stats.hpp"
#include "tensorstream/stats/trace.hpp"

namespace tensorstream::detail {

struct QueuedRead {
  virtual ~QueuedRead() = default;
  // fd, offset and, for reads into the slot, the buffer. For staged reads the buffer is set at dispatch to the
  // first staged_length bytes of `staging`.
  ReadRequest request;
  uint64_t staged_length = 0;
  StagingLease staging;
  // What the trace shows for this read.
  uint32_t block = 0;
  int32_t tensor = -1;  // -1 for a read of a region (it covers parts of several chunks)
  int32_t chunk = -1;
  // Set by the queue (under its lock).
  int32_t io_lane = -1;    // the trace lane held while in flight (-1: not traced)
  uint64_t submit_ns = 0;  // when it was handed to the backend (traced reads)
};

class IoQueue {
 public:
  // Receives each read once: `result` is bytes read (== the buffer's size) or -errno; -ECANCELED for reads
  // cancelled by shutdown() before they reached the backend, -ENOMEM for staged reads whose buffer could not be
  // allocated. Must not throw.
  using Handler = std::function<void(std::unique_ptr<QueuedRead> read, int64_t result)>;

  // `staging` may be null when no read will ever be staged. Everything passed in must outlive the queue.
  IoQueue(IoBackend& backend, uint32_t depth, StagingPool* staging, Stats& stats, TraceRecorder& trace,
          Handler handler);
  ~IoQueue() { shutdown(); }
  IoQueue(const IoQueue&) = delete;
  IoQueue& operator=(const IoQueue&) = delete;

  void submit(std::vector<std::unique_ptr<QueuedRead>> reads);
  // Hands queued reads to the backend while there is room (in flight < depth, staging available). Called after a
  // staging lease came back; harmless at any time.
  void pump();
  // Cancels the reads not yet handed to the backend, waits for those in flight, joins the reaper. Idempotent.
  void shutdown() noexcept;

 private:
  // Under mutex_: moves reads from pending_ into `batch` while there is room; reads whose staging buffer could
  // not be allocated go to `failed` (the caller hands them to the handler with -ENOMEM, outside the lock).
  void take_ready(std::vector<ReadRequest>& batch, std::vector<std::unique_ptr<QueuedRead>>& failed);
  void assign_io_lane(QueuedRead& read, uint64_t submit_ns);
  TraceEvent read_event(const QueuedRead& read, int64_t result) const;
  void reap_loop();

  IoBackend& backend_;
  const uint32_t depth_;
  StagingPool* const staging_;
  Stats& stats_;
  TraceRecorder& trace_;
  const Handler handler_;

  std::mutex mutex_;
  std::condition_variable cv_;  // reaper: something is in flight, or stopping
  size_t in_flight_ = 0;
  std::deque<QueuedRead*> pending_;
  std::vector<uint8_t> lane_busy_;  // tracing: 1 while a traced read holds the lane
  bool stopping_ = false;
  std::thread reaper_;  // last: started once everything above exists
};

}  // namespace tensorstream::detail
