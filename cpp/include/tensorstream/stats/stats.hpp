// Engine statistics: relaxed atomic counters updated on the hot path, read as a plain snapshot.
//
// Thread-safety: every method may be called from any thread. A snapshot is not a consistent cut across
// counters (each counter is exact on its own), which is fine for monitoring.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "tensorstream/stats/latency_histogram.hpp"

namespace tensorstream {

struct BlockStatsSnapshot {
  uint64_t loads = 0;          // times the block was read from storage
  uint64_t hits = 0;           // acquires that found it resident
  uint64_t reuses = 0;         // hits that no read preceded for this use (not a prefetch's block on its first use)
  uint64_t prefetch_hits = 0;  // acquires that found it resident or in flight thanks to a prefetch
  uint64_t evictions = 0;
  uint64_t bytes_read = 0;
  uint64_t wait_ns = 0;        // time callers waited for this block
  uint64_t load_ns = 0;        // time from read start to ready, summed over loads
};

struct StatsSnapshot {
  uint64_t bytes_read = 0;          // from storage (stored bytes, compressed or not)
  uint64_t bytes_delivered = 0;     // decoded bytes placed into slots
  uint64_t acquires = 0;
  uint64_t hits = 0;                // resident at acquire ("ready when asked")
  uint64_t reuses = 0;              // resident at acquire and not brought in by a prefetch for this use: served from
                                    // memory with no read for it (a hit of the cache, in the usual sense)
  uint64_t misses = 0;              // not resident at acquire (in flight counts as a miss unless prefetched)
  uint64_t prefetch_hits = 0;       // resident or in flight at acquire because of a prefetch
  uint64_t prefetches_issued = 0;
  uint64_t evictions = 0;
  uint64_t checksum_failures = 0;
  uint64_t io_errors = 0;
  uint64_t wait_ns = 0;             // total time callers blocked in Ticket::wait
  uint64_t io_busy_ns = 0;          // wall time during which at least one read was in flight
  uint64_t resident_bytes = 0;      // gauges, filled in by the owner of the residency state (Engine::stats)
  uint64_t in_flight_bytes = 0;
  uint64_t staging_bytes = 0;            // host staging buffers allocated (bounded; outside the budget)
  uint64_t staging_peak_in_use_bytes = 0;
  uint64_t h2d_bytes = 0;                // device slots: bytes copied host -> device by the Transfer
  uint64_t h2d_busy_ns = 0;              // time at least one such copy was queued or running
  uint64_t device_stall_ns = 0;          // device slots: time consumer streams waited for ready events (part of
                                         // wait_ns, measured with timed events on the stream)
  uint64_t host_tier_hits = 0;           // loads served from the host tier instead of storage
  uint64_t host_tier_bytes = 0;          // bytes those loads copied from it
  uint64_t host_tier_held_bytes = 0;     // gauge: bytes the host tier holds
  uint64_t host_tier_evictions = 0;      // blocks the host tier let go for ones used sooner
  uint64_t direct_bytes = 0;             // device-direct slots: bytes read storage -> device (GPUDirect), which
                                         // the CPU never saw (only with verify_checksums off)
  std::vector<BlockStatsSnapshot> blocks;
  LatencyHistogramSnapshot load_latency;  // one observation per load from storage (read start to ready)
  LatencyHistogramSnapshot wait_latency;  // one observation per Ticket::wait that blocked (the caller's stall)

  // bytes_read / io_busy time, in bytes per second (0 when nothing was read).
  [[nodiscard]] double io_throughput_bytes_per_s() const noexcept;
  [[nodiscard]] double hit_rate() const noexcept;  // hits / acquires
};

class Stats {
 public:
  explicit Stats(size_t num_blocks);

  void on_acquire(size_t block, bool hit, bool prefetched) noexcept;
  void on_prefetch_issued() noexcept { add(prefetches_issued_, 1); }
  void on_load_done(size_t block, uint64_t stored_bytes, uint64_t decoded_bytes, uint64_t load_ns) noexcept;
  void on_eviction(size_t block) noexcept;
  void on_wait(size_t block, uint64_t ns) noexcept;
  void on_checksum_failure() noexcept { add(checksum_failures_, 1); }
  void on_io_error() noexcept { add(io_errors_, 1); }
  void on_direct_read(uint64_t bytes) noexcept { add(direct_bytes_, bytes); }
  void on_device_stall(uint64_t ns) noexcept { add(device_stall_ns_, ns); }
  void on_host_tier_hit(uint64_t bytes) noexcept {
    add(host_tier_hits_, 1);
    add(host_tier_bytes_, bytes);
  }
  // I/O busy time: the engine reports when the number of reads in flight goes 0 -> 1 and 1 -> 0.
  void on_io_started(uint64_t now_ns) noexcept;
  void on_io_idle(uint64_t now_ns) noexcept;
  // I/O time that happened outside submitted reads (page faults of a mapped block while it was verified).
  void add_io_busy_ns(uint64_t ns) noexcept { add(io_busy_ns_, ns); }

  [[nodiscard]] StatsSnapshot snapshot() const;
  void reset() noexcept;  // counters to zero

 private:
  using Counter = std::atomic<uint64_t>;
  static void add(Counter& counter, uint64_t value) noexcept { counter.fetch_add(value, std::memory_order_relaxed); }
  struct BlockCounters {
    Counter loads{0}, hits{0}, reuses{0}, prefetch_hits{0}, evictions{0}, bytes_read{0}, wait_ns{0}, load_ns{0};
  };
  Counter bytes_read_{0}, bytes_delivered_{0}, acquires_{0}, hits_{0}, reuses_{0}, misses_{0}, prefetch_hits_{0},
      prefetches_issued_{0}, evictions_{0}, checksum_failures_{0}, io_errors_{0}, wait_ns_{0}, io_busy_ns_{0},
      direct_bytes_{0}, host_tier_hits_{0}, host_tier_bytes_{0}, device_stall_ns_{0};
  Counter io_busy_since_ns_{0};
  LatencyHistogram load_latency_;
  LatencyHistogram wait_latency_;
  std::unique_ptr<BlockCounters[]> blocks_;
  size_t num_blocks_;
};

}  // namespace tensorstream
