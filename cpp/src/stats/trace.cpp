#include "tensorstream/stats/trace.hpp"

#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <new>
#include <string>

#include "tensorstream/error.hpp"

namespace tensorstream {

static_assert(sizeof(TraceEvent) == 48, "kDefaultMaxEvents' memory bound assumes 48-byte events");

namespace {
// The calling thread's lane. has_lane is false until set_current_thread_lane() or the first lookup, which then
// caches the OS thread id: gettid is a system call, worth paying once per thread, not once per event.
thread_local TraceLane t_lane;
thread_local bool t_has_lane = false;
}  // namespace

std::string_view trace_kind_name(TraceKind kind) noexcept {
  switch (kind) {
    case TraceKind::kRead: return "read";
    case TraceKind::kVerify: return "verify";
    case TraceKind::kDecompress: return "decompress";
    case TraceKind::kTransfer: return "transfer";
    case TraceKind::kStall: return "stall";
    case TraceKind::kCopy: return "copy";
  }
  return "unknown";
}

std::string_view trace_lane_kind_name(TraceLaneKind kind) noexcept {
  switch (kind) {
    case TraceLaneKind::kIo: return "io";
    case TraceLaneKind::kWorker: return "worker";
    case TraceLaneKind::kCaller: return "caller";
    case TraceLaneKind::kCopy: return "copy";
  }
  return "unknown";
}

uint64_t trace_now_ns() noexcept {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

TraceLane current_thread_lane() noexcept {
  if (!t_has_lane) {
    t_lane = TraceLane{TraceLaneKind::kCaller, static_cast<uint32_t>(::syscall(SYS_gettid))};
    t_has_lane = true;
  }
  return t_lane;
}

void set_current_thread_lane(TraceLane lane) noexcept {
  t_lane = lane;
  t_has_lane = true;
}

void TraceRecorder::enable(size_t max_events) {
  if (max_events == 0 || max_events > kMaxMaxEvents) {
    throw ConfigError("max_events", std::to_string(max_events) + " is not in 1.." + std::to_string(kMaxMaxEvents));
  }
  {
    std::lock_guard lock(mutex_);
    max_events_ = max_events;
  }
  enabled_.store(true, std::memory_order_relaxed);
}

void TraceRecorder::disable() noexcept { enabled_.store(false, std::memory_order_relaxed); }

void TraceRecorder::record(const TraceEvent& event) noexcept {
  if (!enabled()) return;
  std::lock_guard lock(mutex_);
  if (events_.size() >= max_events_) {
    ++dropped_;
    return;
  }
  try {
    events_.push_back(event);
  } catch (const std::bad_alloc&) {
    ++dropped_;  // out of memory: losing a trace event must not take the load down with it
  }
}

TraceBatch TraceRecorder::drain() {
  TraceBatch batch;
  std::lock_guard lock(mutex_);
  batch.events.swap(events_);
  batch.dropped = dropped_;
  dropped_ = 0;
  return batch;
}

size_t TraceRecorder::max_events() const {
  std::lock_guard lock(mutex_);
  return max_events_;
}

TraceSpan::TraceSpan(TraceRecorder& recorder, TraceKind kind, size_t block, int64_t tensor, int64_t chunk,
                     uint64_t bytes) noexcept
    : recorder_(recorder.enabled() ? &recorder : nullptr) {
  if (recorder_ == nullptr) return;
  event_.kind = kind;
  event_.block = static_cast<uint32_t>(block);
  event_.tensor = static_cast<int32_t>(tensor);
  event_.chunk = static_cast<int32_t>(chunk);
  event_.bytes = bytes;
  event_.lane = current_thread_lane();
  event_.start_ns = trace_now_ns();
}

TraceSpan::~TraceSpan() {
  if (recorder_ == nullptr) return;
  event_.end_ns = trace_now_ns();
  recorder_->record(event_);
}

}  // namespace tensorstream
