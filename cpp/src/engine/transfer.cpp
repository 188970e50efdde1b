#include "tensorstream/engine/transfer.hpp"

#include <cstring>

namespace tensorstream {

namespace {
class HostTransfer final : public Transfer {
 public:
  [[nodiscard]] std::string name() const override { return "host"; }
  [[nodiscard]] SlotAccess slot_access() const override { return SlotAccess::kHost; }
  void copy_to_slot(std::span<const std::byte> bytes, std::span<std::byte> slot, size_t offset) override {
    if (!bytes.empty()) std::memcpy(slot.data() + offset, bytes.data(), bytes.size());
  }
  void finish_slot(std::span<std::byte>) override {}
};
}  // namespace

std::unique_ptr<Transfer> make_host_transfer() { return std::make_unique<HostTransfer>(); }

}  // namespace tensorstream
