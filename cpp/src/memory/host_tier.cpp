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

std::span<std::byte> HostTier::reserve(size_t block, uint64_t bytes) {
  const uint64_t rounded = (bytes + kBufferAlignment - 1) / kBufferAlignment * kBufferAlignment;
  {
    const std::lock_guard lock(mutex_);
    if (block >= entries_.size() || entries_[block].state != State::kEmpty || rounded == 0) return {};
    if (rounded > capacity_ - reserved_) return {};
    entries_[block].state = State::kFilling;
    reserved_ += rounded;
  }
  std::byte* buffer = nullptr;
  try {
    buffer = allocator_->allocate(rounded);  // outside the lock: pinning memory can take a while
  } catch (...) {
    const std::lock_guard lock(mutex_);
    entries_[block].state = State::kEmpty;
    reserved_ -= rounded;
    return {};
  }
  const std::lock_guard lock(mutex_);
  entries_[block].buffer = {buffer, static_cast<size_t>(rounded)};
  return entries_[block].buffer.subspan(0, bytes);
}

void HostTier::commit(size_t block, bool ok) {
  const std::lock_guard lock(mutex_);
  if (block >= entries_.size() || entries_[block].state != State::kFilling) return;
  Entry& entry = entries_[block];
  if (ok) {
    entry.state = State::kHeld;
    held_ += entry.buffer.size();
    return;
  }
  reserved_ -= entry.buffer.size();
  allocator_->deallocate(entry.buffer.data(), entry.buffer.size());
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
