#include "tensorstream/memory/host_tier.hpp"

#include <algorithm>

namespace tensorstream {

namespace {
constexpr uint64_t kBufferAlignment = 4096;  // allocators hand out 4 KiB multiples
}

HostTier::HostTier(size_t num_blocks, uint64_t capacity_bytes, std::unique_ptr<HostAllocator> allocator)
    : capacity_(capacity_bytes), allocator_(std::move(allocator)), entries_(num_blocks) {}

HostTier::~HostTier() {
  // The engine drains every copy before its tier goes: retired buffers are free to go too.
  for (Entry& entry : entries_) {
    if (!entry.buffer.empty()) allocator_->deallocate(entry.buffer.data(), entry.buffer.size());
  }
  for (Retired& retired : retired_) allocator_->deallocate(retired.buffer.data(), retired.buffer.size());
}

void HostTier::reclaim() {
  std::vector<Retired> candidates;
  {
    const std::lock_guard lock(mutex_);
    if (retired_.empty()) return;
    candidates.swap(retired_);
  }
  std::vector<Retired> still;
  uint64_t freed = 0;
  for (Retired& retired : candidates) {  // checks outside the lock: they may ask the driver
    if (retired.check && *retired.check && (*retired.check)()) {
      freed += retired.buffer.size();
      allocator_->deallocate(retired.buffer.data(), retired.buffer.size());
    } else {
      still.push_back(std::move(retired));
    }
  }
  const std::lock_guard lock(mutex_);
  reserved_ -= freed;
  retired_.insert(retired_.end(), still.begin(), still.end());
}

bool HostTier::reserve(size_t block, uint64_t bytes, const NextUse& next_use,
                       const std::function<RetireCheck()>& make_check) {
  reclaim();
  const uint64_t rounded = (bytes + kBufferAlignment - 1) / kBufferAlignment * kBufferAlignment;
  const std::lock_guard lock(mutex_);
  if (block >= entries_.size() || entries_[block].state != State::kEmpty || rounded == 0) return false;
  if (rounded > capacity_) return false;
  uint64_t retiring = 0;
  for (const Retired& retired : retired_) retiring += retired.buffer.size();
  if (rounded > capacity_ - reserved_ && rounded <= capacity_ - (reserved_ - retiring)) {
    return false;  // room is on its way back (retired buffers whose copies are not done yet): evict nothing more
  }
  if (rounded > capacity_ - reserved_ && next_use) {
    // Belady: evict the held blocks used furthest ahead, as long as each is used later than `block`.
    const std::optional<uint64_t> mine = next_use(block);
    if (!mine) return false;
    std::vector<std::pair<uint64_t, size_t>> later;  // (next use, block)
    for (size_t b = 0; b < entries_.size(); ++b) {
      if (entries_[b].state != State::kHeld) continue;
      const std::optional<uint64_t> theirs = next_use(b);
      if (theirs && *theirs > *mine) later.emplace_back(*theirs, b);
    }
    std::sort(later.rbegin(), later.rend());
    uint64_t could_free = 0;
    size_t victims = 0;
    while (victims < later.size() && rounded > capacity_ - reserved_ + could_free) {
      could_free += entries_[later[victims].second].buffer.size();
      ++victims;
    }
    if (rounded > capacity_ - reserved_ + could_free) return false;  // not even then: keep what is held
    auto check = std::make_shared<RetireCheck>(make_check ? make_check() : RetireCheck{});
    for (size_t v = 0; v < victims; ++v) {
      Entry& victim = entries_[later[v].second];
      retired_.push_back({victim.buffer, check});  // freed by reclaim() once queued copies are done
      held_ -= victim.buffer.size();
      victim = Entry{};
      ++evictions_;
    }
  }
  if (rounded > capacity_ - reserved_) return false;  // retired buffers count until reclaimed (a later load)
  Entry& entry = entries_[block];
  entry.state = State::kFilling;
  entry.bytes = rounded;
  entry.allocation_failed = false;
  entry.allocated = std::make_unique<std::once_flag>();
  reserved_ += rounded;
  return true;
}

std::span<std::byte> HostTier::fill_buffer(size_t block) {
  std::once_flag* once = nullptr;
  uint64_t bytes = 0;
  {
    const std::lock_guard lock(mutex_);
    if (block >= entries_.size() || entries_[block].state != State::kFilling) return {};
    once = entries_[block].allocated.get();
    bytes = entries_[block].bytes;
  }
  // Outside the lock: other blocks' fills go on while this one's memory is pinned. The entry stays kFilling (and
  // its once_flag alive) until its own load commits, which happens after every fill_buffer call of that load.
  std::call_once(*once, [&] {
    std::byte* buffer = nullptr;
    try {
      buffer = allocator_->allocate(bytes);
    } catch (...) {
      buffer = nullptr;
    }
    const std::lock_guard lock(mutex_);
    if (buffer != nullptr) {
      entries_[block].buffer = {buffer, static_cast<size_t>(bytes)};
    } else {
      entries_[block].allocation_failed = true;
    }
  });
  const std::lock_guard lock(mutex_);
  return entries_[block].buffer;
}

void HostTier::commit(size_t block, bool ok) {
  const std::lock_guard lock(mutex_);
  if (block >= entries_.size() || entries_[block].state != State::kFilling) return;
  Entry& entry = entries_[block];
  if (ok && !entry.allocation_failed && !entry.buffer.empty()) {
    entry.state = State::kHeld;
    held_ += entry.buffer.size();
    return;
  }
  reserved_ -= entry.bytes;
  if (!entry.buffer.empty()) allocator_->deallocate(entry.buffer.data(), entry.buffer.size());
  entry = Entry{};
}

std::span<const std::byte> HostTier::find(size_t block) const {
  const std::lock_guard lock(mutex_);
  if (block >= entries_.size() || entries_[block].state != State::kHeld) return {};
  return entries_[block].buffer;
}

uint64_t HostTier::evictions() const {
  const std::lock_guard lock(mutex_);
  return evictions_;
}

uint64_t HostTier::held_bytes() const {
  const std::lock_guard lock(mutex_);
  return held_;
}

}  // namespace tensorstream
