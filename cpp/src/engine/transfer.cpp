#include "tensorstream/engine/transfer.hpp"

#include <cstring>

#include "tensorstream/cuda/cuda_transfer.hpp"
#include "tensorstream/error.hpp"

namespace tensorstream {

namespace {
class HostTransfer final : public Transfer {
 public:
  [[nodiscard]] std::string name() const override { return "host"; }
  [[nodiscard]] SlotAccess slot_access() const override { return SlotAccess::kHost; }
  [[nodiscard]] std::unique_ptr<HostAllocator> staging_allocator() const override { return make_pageable_allocator(); }
  // Host slots are written by the reader and the decoder directly; a copy, should one be asked for, is a memcpy.
  int64_t copy_async(StagingLease source, std::span<const std::byte> bytes, std::span<std::byte> slot, uint64_t offset,
                     std::exception_ptr* /*error*/, CopyTag /*tag*/) override {
    if (!bytes.empty()) std::memcpy(slot.data() + offset, bytes.data(), bytes.size());
    source.reset();
    return static_cast<int64_t>(bytes.size());
  }
  [[nodiscard]] EventRef record_ready(std::exception_ptr* /*error*/) override { return nullptr; }
  [[nodiscard]] EventRef record_on_stream(uintptr_t /*stream*/) override { return nullptr; }
  int stream_wait(const TransferEvent& /*event*/, uintptr_t /*stream*/, std::exception_ptr* /*error*/) override {
    return 0;
  }
  int copy_stream_wait(const TransferEvent& /*event*/, std::exception_ptr* /*error*/) override { return 0; }
  void synchronize(const TransferEvent& /*event*/) override {}
  void drain() noexcept override {}
};
}  // namespace

std::unique_ptr<Transfer> make_host_transfer() { return std::make_unique<HostTransfer>(); }

std::unique_ptr<Transfer> make_transfer(BackendKind kind, int device_ordinal) {
  const BackendTraits& traits = backend_traits(kind);
  if (!traits.device_slots) return make_host_transfer();
  const std::string name(traits.name);
  CudaAvailability found;
  std::shared_ptr<CudaApi> api = load_cuda(&found);
  if (!api) throw ConfigError("backend", "'" + name + "' needs a CUDA device: " + found.reason);
  if (traits.reader == BackendKind::kGpuDirect) {
    if (!found.cufile) throw ConfigError("backend", "'" + name + "' needs cuFile: " + found.cufile_reason);
    return std::make_unique<CudaTransfer>(std::move(api), device_ordinal, SlotAccess::kDeviceDirect);
  }
  return std::make_unique<CudaTransfer>(std::move(api), device_ordinal);
}

}  // namespace tensorstream
