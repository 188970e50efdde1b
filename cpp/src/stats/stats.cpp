#include "tensorstream/stats/stats.hpp"

namespace tensorstream {

namespace {
uint64_t load(const std::atomic<uint64_t>& counter) { return counter.load(std::memory_order_relaxed); }
}  // namespace

double StatsSnapshot::io_throughput_bytes_per_s() const noexcept {
  return io_busy_ns == 0 ? 0.0 : static_cast<double>(bytes_read) * 1e9 / static_cast<double>(io_busy_ns);
}

double StatsSnapshot::hit_rate() const noexcept {
  return acquires == 0 ? 0.0 : static_cast<double>(hits) / static_cast<double>(acquires);
}

Stats::Stats(size_t num_blocks) : blocks_(std::make_unique<BlockCounters[]>(num_blocks)), num_blocks_(num_blocks) {}

void Stats::on_acquire(size_t block, bool hit, bool prefetched) noexcept {
  add(acquires_, 1);
  add(hit ? hits_ : misses_, 1);
  if (hit) add(blocks_[block].hits, 1);
  if (hit && !prefetched) {
    add(reuses_, 1);
    add(blocks_[block].reuses, 1);
  }
  if (prefetched) {
    add(prefetch_hits_, 1);
    add(blocks_[block].prefetch_hits, 1);
  }
}

void Stats::on_load_done(size_t block, uint64_t stored_bytes, uint64_t decoded_bytes, uint64_t load_ns) noexcept {
  add(bytes_read_, stored_bytes);
  add(bytes_delivered_, decoded_bytes);
  add(blocks_[block].loads, 1);
  add(blocks_[block].bytes_read, stored_bytes);
  add(blocks_[block].load_ns, load_ns);
  load_latency_.observe(load_ns);
}

void Stats::on_eviction(size_t block) noexcept {
  add(evictions_, 1);
  add(blocks_[block].evictions, 1);
}

void Stats::on_wait(size_t block, uint64_t ns) noexcept {
  add(wait_ns_, ns);
  add(blocks_[block].wait_ns, ns);
  wait_latency_.observe(ns);
}

void Stats::on_io_started(uint64_t now_ns) noexcept { io_busy_since_ns_.store(now_ns, std::memory_order_relaxed); }

void Stats::on_io_idle(uint64_t now_ns) noexcept {
  const uint64_t since = io_busy_since_ns_.load(std::memory_order_relaxed);
  if (since != 0 && now_ns > since) add(io_busy_ns_, now_ns - since);
  io_busy_since_ns_.store(0, std::memory_order_relaxed);
}

StatsSnapshot Stats::snapshot() const {
  StatsSnapshot s;
  s.bytes_read = load(bytes_read_);
  s.bytes_delivered = load(bytes_delivered_);
  s.acquires = load(acquires_);
  s.hits = load(hits_);
  s.reuses = load(reuses_);
  s.misses = load(misses_);
  s.prefetch_hits = load(prefetch_hits_);
  s.prefetches_issued = load(prefetches_issued_);
  s.evictions = load(evictions_);
  s.checksum_failures = load(checksum_failures_);
  s.io_errors = load(io_errors_);
  s.wait_ns = load(wait_ns_);
  s.io_busy_ns = load(io_busy_ns_);
  s.direct_bytes = load(direct_bytes_);
  s.host_tier_hits = load(host_tier_hits_);
  s.host_tier_bytes = load(host_tier_bytes_);
  s.device_stall_ns = load(device_stall_ns_);
  s.blocks.resize(num_blocks_);
  for (size_t i = 0; i < num_blocks_; ++i) {
    const BlockCounters& c = blocks_[i];
    s.blocks[i] = {load(c.loads),      load(c.hits),    load(c.reuses), load(c.prefetch_hits), load(c.evictions),
                   load(c.bytes_read), load(c.wait_ns), load(c.load_ns)};
  }
  s.load_latency = load_latency_.snapshot();
  s.wait_latency = wait_latency_.snapshot();
  return s;
}

void Stats::reset() noexcept {
  for (Counter* counter : {&bytes_read_, &bytes_delivered_, &acquires_, &hits_, &reuses_, &misses_, &prefetch_hits_,
                           &prefetches_issued_, &evictions_, &checksum_failures_, &io_errors_, &wait_ns_,
                           &io_busy_ns_, &direct_bytes_, &host_tier_hits_, &host_tier_bytes_, &device_stall_ns_}) {
    counter->store(0, std::memory_order_relaxed);
  }
  for (size_t i = 0; i < num_blocks_; ++i) {
    BlockCounters& c = blocks_[i];
    for (Counter* counter : {&c.loads, &c.hits, &c.reuses, &c.prefetch_hits, &c.evictions, &c.bytes_read, &c.wait_ns, &c.load_ns}) {
      counter->store(0, std::memory_order_relaxed);
    }
  }
  load_latency_.reset();
  wait_latency_.reset();
}

}  // namespace tensorstream
