#include "tensorstream/memory/host_tier.hpp"

namespace tensorstream {

namespace {
constexpr uint64_t kBufferAlignment = 4096;  // allocators hand out 4 KiB multiples
}

HostTier::HostTier(size_t num_blocks, uint64_t capacity_bytes, std::unique_ptr<HostAllocator> allocator)
    : capacity_(capacity_bytes), allocator_(std::move(allocator)), entries_(num_blocks) {}

HostTier::~HostTier() {
  for (Entry& entry : entries_) {
    if (!entry.buffer.empty()) allocator_->deallocate(entry.buffer.data(), entry.buffer.size());
  }
}

bool HostTier::reserve(size_t block, uint64_t bytes) {
  const uint64_t rounded = (bytes + kBufferAlignment - 1) / kBufferAlignment * kBufferAlignment;
  const std::lock_guard lock(mutex_);
  if (block >= entries_.size() || entries_[block].state != State::kEmpty || rounded == 0) return false;
  if (rounded > capacity_ - reserved_) return false;
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

uint64_t HostTier::held_bytes() const {
  const std::lock_guard lock(mutex_);
  return held_;
}

}  // namespace tensorstream
