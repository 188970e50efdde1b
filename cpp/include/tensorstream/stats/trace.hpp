// Trace: a timeline of what the engine did, one event per read, checksum, decode, copy and caller wait, for a
// Chrome-trace view of a generation (python/tensorstream/trace.py turns the events into trace-event JSON).
//
// Statistics (stats.hpp) say how much; a trace says when and where: which block was read on which I/O lane while
// the caller computed or waited. Times are std::chrono::steady_clock nanoseconds, which on Linux is
// CLOCK_MONOTONIC, the clock of Python's time.monotonic_ns(): spans recorded in Python line up with these.
//
// Cost: tracing is off by default, and then each place that could record pays one relaxed atomic load
// (TraceRecorder::enabled) and nothing else. When on, events go into one bounded buffer under a mutex: events
// are per chunk (kilobytes to megabytes of work each), so a short critical section per event is noise, and a
// single buffer keeps draining simple and exact. Once the buffer holds max_events, further events are counted
// as dropped rather than stored, so memory stays bounded however long tracing stays on.
//
// Thread-safety: TraceRecorder may be used from any thread concurrently (each method says so); TraceEvent,
// TraceLane and TraceBatch are plain values.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string_view>
#include <vector>

namespace tensorstream {

// What an event measures. kRead: an I/O request from submit to completion, or, for a block mapped instead of read,
// prefaulting one chunk's pages. kVerify: one chunk's checksum. kDecompress: decoding one chunk. kTransfer: the
// Transfer stage queuing one chunk's copy into a slot that is not host memory, or (chunk -1) recording a block's
// ready event once all its copies are queued; host slots receive reads and decodes in place, so they have no
// transfer events. kStall: a caller blocked in Ticket::wait. kCopy: a host-to-device copy on the copy stream, from
// when the copy before it completed (or it was queued) to its own completion, as the host learns of them.
enum class TraceKind : uint8_t { kRead, kVerify, kDecompress, kTransfer, kStall, kCopy };

// Where an event ran. kIo: an I/O lane, index 0..queue_depth-1; each read in flight holds the lowest free lane
// from submit to completion, so the reads of one lane never overlap (a pread pool or io_uring thread is not
// visible through IoBackend, and what a reader wants to see is how many reads were in flight). kWorker: engine
// worker `index` (0..num_io_threads-1). kCaller: any other thread, `index` being its OS thread id (gettid, the
// same number as Python's threading.get_native_id()). kCopy: a Transfer's copy stream (index 0).
enum class TraceLaneKind : uint8_t { kIo, kWorker, kCaller, kCopy };

[[nodiscard]] std::string_view trace_kind_name(TraceKind kind) noexcept;            // "read", "verify", ...
[[nodiscard]] std::string_view trace_lane_kind_name(TraceLaneKind kind) noexcept;   // "io", "worker", "caller"

struct TraceLane {
  TraceLaneKind kind = TraceLaneKind::kCaller;
  uint32_t index = 0;
};

struct TraceEvent {
  uint64_t start_ns = 0;  // steady_clock
  uint64_t end_ns = 0;    // >= start_ns
  uint64_t bytes = 0;     // bytes read / verified / decoded (raw size) / copied; 0 for stalls and block finishes
  uint32_t block = 0;     // block index in the store's manifest
  int32_t tensor = -1;    // tensor index in the manifest, -1 when the event is not about one tensor
  int32_t chunk = -1;     // chunk index within that tensor, -1 when not about one chunk (a read of a whole region)
  TraceKind kind = TraceKind::kRead;
  TraceLane lane;
};

// What drain() hands over: the events recorded since the last drain (in recording order, which is not time
// order across threads) and how many were dropped because the buffer was full.
struct TraceBatch {
  std::vector<TraceEvent> events;
  uint64_t dropped = 0;
};

// Steady-clock nanoseconds (the events' clock). Thread-safety: any thread.
[[nodiscard]] uint64_t trace_now_ns() noexcept;

// The lane of the calling thread: what set_current_thread_lane() gave it, else {kCaller, OS thread id}.
// Thread-safety: any thread; each thread sees its own value (thread_local).
[[nodiscard]] TraceLane current_thread_lane() noexcept;
// Names the calling thread's lane for the events it records from now on (engine workers call it once at start).
// Thread-safety: any thread; affects only the calling thread.
void set_current_thread_lane(TraceLane lane) noexcept;

class TraceRecorder {
 public:
  // One event is 48 bytes: a million of them (48 MiB at most) covers many forward passes of a large model at
  // 4 MiB chunks (about three events per chunk) without letting a forgotten trace grow without bound.
  static constexpr size_t kDefaultMaxEvents = size_t{1} << 20;
  // A larger buffer (over 6 GiB) is almost certainly a mistake in the caller, not a wish.
  static constexpr size_t kMaxMaxEvents = size_t{1} << 27;

  TraceRecorder() = default;
  TraceRecorder(const TraceRecorder&) = delete;
  TraceRecorder& operator=(const TraceRecorder&) = delete;

  // True while recording. One relaxed load: the check every recording site makes before doing anything else.
  // Relaxed suffices because an event that starts just before disable() (or is skipped just after enable()) is
  // harmless; the buffer itself is guarded by the mutex. Thread-safety: any thread.
  [[nodiscard]] bool enabled() const noexcept { return enabled_.load(std::memory_order_relaxed); }

  // Starts recording into a buffer of at most `max_events` (1..kMaxMaxEvents, else ConfigError "max_events").
  // Events recorded before and not drained are kept (the new bound applies to the total).
  // Thread-safety: any thread.
  void enable(size_t max_events = kDefaultMaxEvents);
  // Stops recording; what was recorded stays until drained. Thread-safety: any thread.
  void disable() noexcept;

  // Appends `event` if recording and the buffer has room; counts it as dropped if full; ignores it if tracing
  // is off. Never throws (engine threads must not): an allocation failure counts as a drop.
  // Thread-safety: any thread.
  void record(const TraceEvent& event) noexcept;

  // Hands over every buffered event and the drop count, leaving both empty. Thread-safety: any thread.
  [[nodiscard]] TraceBatch drain();

  // The current bound. Thread-safety: any thread.
  [[nodiscard]] size_t max_events() const;

 private:
  std::atomic<bool> enabled_{false};
  mutable std::mutex mutex_;  // guards everything below
  std::vector<TraceEvent> events_;
  size_t max_events_ = kDefaultMaxEvents;
  uint64_t dropped_ = 0;
};

// Records one event around a scope: timestamps at construction and destruction, the lane of the thread, and the
// event even when the scope exits by an exception (a checksum that fails still took its time). When tracing is
// off at construction it does nothing else, ever.
// Thread-safety: a stack object of one thread; the recorder it writes to is shared.
class TraceSpan {
 public:
  TraceSpan(TraceRecorder& recorder, TraceKind kind, size_t block, int64_t tensor, int64_t chunk,
            uint64_t bytes) noexcept;
  ~TraceSpan();
  TraceSpan(const TraceSpan&) = delete;
  TraceSpan& operator=(const TraceSpan&) = delete;

 private:
  TraceRecorder* recorder_;  // null when tracing was off at construction
  TraceEvent event_;
};

}  // namespace tensorstream
