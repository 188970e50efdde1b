// Private: the load planner. Turns one block of the manifest, and how its slot may be reached (SlotAccess), into
// the reads that bring its bytes in and the chunks to verify. A pure function of its inputs: everything the
// engine decides about a load's shape is decided here, once, and tested without I/O.
//
// Thread-safety: free function over immutable inputs; safe from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "tensorstream/engine/slot_access.hpp"
#include "tensorstream/format/manifest.hpp"

namespace tensorstream::detail {

struct LoadPlanInputs {
  SlotAccess access = SlotAccess::kHost;
  bool map = false;           // the block is served by a view of the file mapping (host slots, all-raw blocks only)
  bool direct = false;        // this block is read with O_DIRECT where the read can be aligned
  bool slots_aligned = true;  // slot addresses are 4 KiB aligned, so reads straight into a slot may be direct
  bool verify = true;         // chunks are verified on the CPU (verify_checksums)
};

// A chunk verified where it lies: `begin` is its offset from the block's start, in the file and in the slot alike
// (for all-raw blocks the two layouts are the same).
struct ChunkInPlace {
  size_t tensor = 0;
  size_t chunk = 0;  // within the tensor
  uint64_t begin = 0;
  uint64_t size = 0;
};

struct PlannedRead {
  uint64_t file_offset = 0;
  uint64_t length = 0;       // bytes to read (4 KiB multiples when direct)
  bool direct = false;       // through the O_DIRECT descriptor
  bool staged = false;       // into a staging buffer; else into the slot at slot_offset
  uint64_t slot_offset = 0;  // !staged: where the bytes land in the slot
  uint64_t skip = 0;         // staged: bytes in the buffer before the chunk's first stored byte (direct rounding)
  size_t tensor = 0;         // per-chunk reads: the chunk read
  size_t chunk = 0;
  size_t first_chunk = 0;    // region reads: the chunks [first_chunk, last_chunk) of LoadPlan::in_place it covers
  size_t last_chunk = 0;
};

struct LoadPlan {
  enum class Kind : uint8_t {
    kEmpty,   // no bytes at all: ready at once
    kMapped,  // a view of the file mapping is the slot: no reads; each chunk is verified in place (faulting it in)
    kRegion,  // all raw: chunk_size reads of the block's region straight into the slot; a chunk is verified in
              // place once every read covering it is done, while the rest of the block is still being read
    kChunks,  // one read per chunk: raw chunks of a host slot into the slot, the rest into staging, then verified,
              // decoded and (for device slots) copied by the Transfer
  };
  Kind kind = Kind::kEmpty;
  std::vector<PlannedRead> reads;
  std::vector<ChunkInPlace> in_place;       // kMapped, kRegion: the block's chunks in file order
  std::vector<uint32_t> reads_per_chunk;    // kRegion: how many reads cover each chunk of in_place
  uint64_t stored_bytes = 0;                // bytes of the block in the file (what the load counts as read)
  uint64_t max_staged_bytes = 0;            // largest staged read (length + nothing else; 0 without staging)
};

// Staging buffer size that fits any staged read of a store with this chunk size: a chunk's stored bytes never
// exceed chunk_size, and a direct read rounds them out to 4 KiB on both sides.
[[nodiscard]] uint64_t staging_bytes_for(uint64_t chunk_size) noexcept;

// Throws FormatError if a chunk's stored size exceeds the manifest's chunk size (the reader validates this; the
// planner re-checks because a staging overflow would be memory corruption).
[[nodiscard]] LoadPlan plan_load(const Manifest& manifest, size_t block, const LoadPlanInputs& inputs);

}  // namespace tensorstream::detail
