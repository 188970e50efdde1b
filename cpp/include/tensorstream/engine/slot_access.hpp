// SlotAccess: how the engine may reach the slot a block is loaded into. Decided once per engine, from the
// Transfer (where slots live) and the reader (whether it can write into them), and handed to the load planner,
// which is the only place that turns it into reads.
//
//   kHost          slots are host memory: raw bytes are read straight into the slot (O_DIRECT when aligned), and
//                  compressed chunks are read into staging and decoded straight into the slot.
//   kDeviceByCopy  slots are device memory the CPU cannot touch: every chunk is read into staging (O_DIRECT when
//                  aligned), verified and decoded there, and the Transfer copies it into the slot.
//   kDeviceDirect  slots are device memory the reader writes into itself (GPUDirect Storage): raw chunks go
//                  storage -> slot; compressed chunks, and raw ones that must be verified on the CPU, go through
//                  staging as with kDeviceByCopy.
//
// Thread-safety: value type.
#pragma once

#include <cstdint>
#include <string_view>

namespace tensorstream {

enum class SlotAccess : uint8_t { kHost, kDeviceByCopy, kDeviceDirect };

[[nodiscard]] constexpr std::string_view slot_access_name(SlotAccess access) noexcept {
  switch (access) {
    case SlotAccess::kHost:
      return "host";
    case SlotAccess::kDeviceByCopy:
      return "device_by_copy";
    case SlotAccess::kDeviceDirect:
      return "device_direct";
  }
  return "?";
}

// True when the CPU may read and write the slot's bytes (decode into it, verify it in place, map a file over it).
[[nodiscard]] constexpr bool host_addressable(SlotAccess access) noexcept { return access == SlotAccess::kHost; }

}  // namespace tensorstream
