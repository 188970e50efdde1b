// Transfer: the last stage of the chunk pipeline, which puts decoded bytes into the block's slot.
//
// On the host the slot is ordinary memory, so raw chunks are read straight into it and compressed chunks are
// decoded straight into it: nothing is copied twice. A device implementation (the CUDA issue) instead reads into
// pinned staging buffers and copies them to device memory asynchronously on a copy stream; it plugs in here.
//
// Thread-safety: implementations must accept calls from any engine worker.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>

#include "tensorstream/engine/slot_access.hpp"

namespace tensorstream {

class Transfer {
 public:
  virtual ~Transfer() = default;
  [[nodiscard]] virtual std::string name() const = 0;
  // Where slots live and who may write them (engine/slot_access.hpp); constant for the Transfer's lifetime.
  [[nodiscard]] virtual SlotAccess slot_access() const = 0;
  // Copies `bytes` (host memory the caller may reuse after this returns) into `slot` at `offset`. Only called
  // when slot_access() is not kHost.
  virtual void copy_to_slot(std::span<const std::byte> bytes, std::span<std::byte> slot, size_t offset) = 0;
  // Blocks until every copy issued for the slot so far is complete.
  virtual void finish_slot(std::span<std::byte> slot) = 0;
};

// Slots in host memory: copy_to_slot is a memcpy, finish_slot does nothing.
[[nodiscard]] std::unique_ptr<Transfer> make_host_transfer();

}  // namespace tensorstream
