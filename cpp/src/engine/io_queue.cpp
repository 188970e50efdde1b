#include "engine/io_queue.hpp"

#include <algorithm>
#include <cerrno>

namespace tensorstream::detail {

IoQueue::IoQueue(IoBackend& backend, uint32_t depth, StagingPool* staging, Stats& stats, TraceRecorder& trace,
                 Handler handler)
    : backend_(backend), depth_(depth), staging_(staging), stats_(stats), trace_(trace), handler_(std::move(handler)) {
  reaper_ = std::thread([this] { reap_loop(); });
}

void IoQueue::submit(std::vector<std::unique_ptr<QueuedRead>> reads) {
  std::vector<std::unique_ptr<QueuedRead>> cancelled;
  std::vector<std::unique_ptr<QueuedRead>> failed;
  {
    const std::lock_guard lock(mutex_);
    for (auto& read : reads) {
      if (stopping_) {
        cancelled.push_back(std::move(read));
      } else {
        read->request.user_data = reinterpret_cast<uint64_t>(read.get());
        pending_.push_back(read.release());
      }
    }
    std::vector<ReadRequest> batch;
    take_ready(batch, failed);
    if (!batch.empty()) backend_.submit(batch);
  }
  cv_.notify_all();
  for (auto& read : cancelled) handler_(std::move(read), -ECANCELED);
  for (auto& read : failed) handler_(std::move(read), -ENOMEM);
}

void IoQueue::pump() {
  std::vector<std::unique_ptr<QueuedRead>> failed;
  {
    const std::lock_guard lock(mutex_);
    if (stopping_) return;
    std::vector<ReadRequest> batch;
    take_ready(batch, failed);
    if (!batch.empty()) backend_.submit(batch);
  }
  cv_.notify_all();
  for (auto& read : failed) handler_(std::move(read), -ENOMEM);
}

void IoQueue::take_ready(std::vector<ReadRequest>& batch, std::vector<std::unique_ptr<QueuedRead>>& failed) {
  const bool tracing = trace_.enabled();
  const uint64_t submit_ns = tracing ? trace_now_ns() : 0;  // taken under the lock: see assign_io_lane
  while (!pending_.empty() && in_flight_ < depth_ && !stopping_) {
    QueuedRead* read = pending_.front();
    if (read->staged_length > 0 && !read->staging) {
      std::optional<StagingLease> lease;
      try {
        lease = staging_ != nullptr ? staging_->try_acquire() : std::nullopt;
      } catch (...) {
        // The pool could not allocate a buffer (pinned memory exhausted, say): this read fails, later ones try again.
        pending_.pop_front();
        failed.emplace_back(read);
        continue;
      }
      if (!lease) break;  // in order: the next returned lease pumps again
      read->staging = std::move(*lease);
      read->request.buffer = read->staging.bytes().subspan(0, read->staged_length);
    }
    pending_.pop_front();
    if (in_flight_ == 0) stats_.on_io_started(trace_now_ns());
    ++in_flight_;
    if (tracing) assign_io_lane(*read, submit_ns);
    batch.push_back(read->request);
  }
}

void IoQueue::shutdown() noexcept {
  std::deque<QueuedRead*> cancelled;
  {
    const std::lock_guard lock(mutex_);
    if (stopping_ && !reaper_.joinable()) return;
    stopping_ = true;
    cancelled.swap(pending_);
  }
  for (QueuedRead* read : cancelled) handler_(std::unique_ptr<QueuedRead>(read), -ECANCELED);
  cv_.notify_all();
  if (reaper_.joinable()) reaper_.join();  // returns once nothing is in flight
}

// Tracing, under mutex_: gives a read about to be handed to the backend the lowest free I/O lane. A lane is freed
// only after its read's end time was taken, and taken again only with a start time read after that (both under
// mutex_), so the reads of one lane never overlap. At most `depth` reads are in flight, so a lane is always free;
// were none, the read would simply go untraced.
void IoQueue::assign_io_lane(QueuedRead& read, uint64_t submit_ns) {
  if (lane_busy_.size() < depth_) lane_busy_.resize(depth_, 0);
  for (size_t lane = 0; lane < lane_busy_.size(); ++lane) {
    if (lane_busy_[lane] == 0) {
      lane_busy_[lane] = 1;
      read.io_lane = static_cast<int32_t>(lane);
      read.submit_ns = submit_ns;
      return;
    }
  }
}

TraceEvent IoQueue::read_event(const QueuedRead& read, int64_t result) const {
  TraceEvent event;
  event.kind = TraceKind::kRead;
  event.start_ns = read.submit_ns;
  event.end_ns = std::max(trace_now_ns(), read.submit_ns);
  event.bytes = result > 0 ? static_cast<uint64_t>(result) : 0;
  event.block = read.block;
  event.tensor = read.tensor;
  event.chunk = read.chunk;
  event.lane = {TraceLaneKind::kIo, static_cast<uint32_t>(read.io_lane)};
  return event;
}

void IoQueue::reap_loop() {
  std::vector<Completion> completions(64);
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return in_flight_ > 0 || stopping_; });
      if (in_flight_ == 0 && stopping_) return;
    }
    const size_t count = backend_.reap(completions, /*wait=*/true);
    for (size_t i = 0; i < count; ++i) {
      std::unique_ptr<QueuedRead> read(reinterpret_cast<QueuedRead*>(completions[i].user_data));
      std::vector<std::unique_ptr<QueuedRead>> failed;
      TraceEvent event;
      bool traced = false;
      {
        const std::lock_guard lock(mutex_);
        if (read->io_lane >= 0) {  // read under mutex_, where take_ready wrote it
          event = read_event(*read, completions[i].result);
          lane_busy_[static_cast<size_t>(read->io_lane)] = 0;  // after the end time: lanes never overlap
          traced = true;
        }
        --in_flight_;
        std::vector<ReadRequest> batch;
        take_ready(batch, failed);
        if (!batch.empty()) backend_.submit(batch);
        if (in_flight_ == 0) stats_.on_io_idle(trace_now_ns());
      }
      if (traced) trace_.record(event);
      handler_(std::move(read), completions[i].result);
      for (auto& failed_read : failed) handler_(std::move(failed_read), -ENOMEM);
      failed.clear();
    }
  }
}

}  // namespace tensorstream::detail
