// Test support: a Transfer whose slots count as device memory (every chunk is staged and copied) but whose copies
// are synchronous memcpys, for tests about what reaches a device slot rather than about asynchronous ordering
// (the CUDA double covers that). Counts bytes copied and ready events recorded.
//
// Thread-safety: as Transfer (counters are atomics).
#pragma once

#include <atomic>
#include <cstring>

#include "tensorstream/engine/transfer.hpp"

namespace tensorstream::testing {

class RecordingTransfer final : public Transfer {
 public:
  class Event final : public TransferEvent {
   public:
    [[nodiscard]] uintptr_t native() const noexcept override { return reinterpret_cast<uintptr_t>(this); }
  };

  [[nodiscard]] std::string name() const override { return "recording"; }
  [[nodiscard]] SlotAccess slot_access() const override { return SlotAccess::kDeviceByCopy; }
  [[nodiscard]] std::unique_ptr<HostAllocator> staging_allocator() const override { return make_pageable_allocator(); }
  int64_t copy_async(StagingLease source, std::span<const std::byte> bytes, std::span<std::byte> slot, uint64_t offset,
                     std::exception_ptr* /*error*/, CopyTag /*tag*/) override {
    if (!bytes.empty()) std::memcpy(slot.data() + offset, bytes.data(), bytes.size());
    source.reset();
    copied += bytes.size();
    return static_cast<int64_t>(bytes.size());
  }
  [[nodiscard]] EventRef record_ready(std::exception_ptr* /*error*/) override {
    ++ready_events;
    return std::make_shared<Event>();
  }
  [[nodiscard]] EventRef record_on_stream(uintptr_t /*stream*/) override { return std::make_shared<Event>(); }
  int stream_wait(const TransferEvent& /*event*/, uintptr_t /*stream*/, std::exception_ptr* /*error*/) override {
    return 0;
  }
  int copy_stream_wait(const TransferEvent& /*event*/, std::exception_ptr* /*error*/) override { return 0; }
  void synchronize(const TransferEvent& /*event*/) override {}
  void drain() noexcept override {}

  std::atomic<uint64_t> copied{0};
  std::atomic<uint64_t> ready_events{0};
};

}  // namespace tensorstream::testing
