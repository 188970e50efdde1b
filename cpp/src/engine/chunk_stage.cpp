#include "engine/chunk_stage.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "tensorstream/error.hpp"

namespace tensorstream::detail {

namespace {
// Maps the pages of `range` in one call (MADV_POPULATE_READ, Linux 5.14+) instead of one page fault per 4 KiB page
// when the checksum first touches them; on older kernels the call fails and the faults happen as before.
void prefault(std::span<const std::byte> range) {
#ifndef MADV_POPULATE_READ
  constexpr int MADV_POPULATE_READ = 22;
#endif
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(range.data()) / page * page;
  const auto end = reinterpret_cast<uintptr_t>(range.data()) + range.size();
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_READ);
}
}  // namespace

void ChunkStage::verify_in_place(LoadState& load, size_t chunk_in_place) noexcept {
  const auto& entry = load.plan.in_place[chunk_in_place];
  try {
    if (load.failed()) return;
    if (load.mapped()) {
      // A mapped block is not read: its pages come in here, so this is its read in the trace.
      const TraceSpan span(context_.trace, TraceKind::kRead, load.block, static_cast<int64_t>(entry.tensor),
                           static_cast<int64_t>(entry.chunk), entry.size);
      prefault(load.data.subspan(entry.begin, entry.size));
    }
    if (context_.verify && !load.verified_before) {
      const TraceSpan span(context_.trace, TraceKind::kVerify, load.block, static_cast<int64_t>(entry.tensor),
                           static_cast<int64_t>(entry.chunk), entry.size);
      context_.store.check_chunk(entry.tensor, entry.chunk, load.data.subspan(entry.begin, entry.size));
    }
    load.decoded_bytes += entry.size;  // raw chunks: stored size == raw size
  } catch (const CorruptionError&) {
    context_.stats.on_checksum_failure();
    load.set_error(std::current_exception());
  } catch (...) {
    load.set_error(std::current_exception());
  }
}

void ChunkStage::process(LoadState& load, const PlannedRead& read, std::span<const std::byte> stored,
                         StagingLease staging) noexcept {
  try {
    if (load.failed()) return;
    const Manifest& manifest = context_.store.manifest();
    const TensorRecord& tensor = manifest.tensors[read.tensor];
    const ChunkRecord& chunk = manifest.chunks[tensor.first_chunk + read.chunk];
    const auto tensor_index = static_cast<int64_t>(read.tensor);
    const auto chunk_index = static_cast<int64_t>(read.chunk);
    if (context_.verify) {
      const TraceSpan span(context_.trace, TraceKind::kVerify, load.block, tensor_index, chunk_index, stored.size());
      context_.store.check_chunk(read.tensor, read.chunk, stored);
    }
    const uint64_t slot_offset = tensor.slot_offset + read.chunk * tensor.chunk_size;
    thread_local std::vector<std::byte> scratch;
    if (host_addressable(context_.transfer.slot_access())) {
      if (chunk.codec != Codec::kRaw) {
        const TraceSpan span(context_.trace, TraceKind::kDecompress, load.block, tensor_index, chunk_index,
                             chunk.raw_size);
        context_.store.decode_chunk(read.tensor, read.chunk, stored, load.data.subspan(slot_offset, chunk.raw_size),
                                    scratch);
      } else if (read.staged) {
        std::memcpy(load.data.data() + slot_offset, stored.data(), stored.size());
      }
    } else {
      // The copy owns its source until the device has read it: the read's own buffer for a raw chunk, a decode
      // buffer for a compressed one (the read's buffer then returns as soon as it is decoded).
      StagingLease source;
      std::span<const std::byte> bytes = stored;
      if (chunk.codec != Codec::kRaw) {
        source = context_.decoded->acquire();
        const std::span<std::byte> out = source.bytes().subspan(0, chunk.raw_size);
        const TraceSpan span(context_.trace, TraceKind::kDecompress, load.block, tensor_index, chunk_index,
                             chunk.raw_size);
        context_.store.decode_chunk(read.tensor, read.chunk, stored, out, scratch);
        bytes = out;
        staging.reset();
      } else {
        source = std::move(staging);
      }
      if (load.tier_fill && context_.tier != nullptr) {  // the host tier keeps the verified, decoded bytes too
        const std::span<std::byte> kept = context_.tier->fill_buffer(load.block);
        if (!kept.empty()) std::memcpy(kept.data() + slot_offset, bytes.data(), bytes.size());
      }
      const TraceSpan span(context_.trace, TraceKind::kTransfer, load.block, tensor_index, chunk_index, bytes.size());
      std::exception_ptr error;
      const CopyTag tag{static_cast<uint32_t>(load.block), static_cast<int32_t>(read.tensor),
                        static_cast<int32_t>(read.chunk)};
      if (context_.transfer.copy_async(std::move(source), bytes, load.data, slot_offset, &error, tag) < 0) {
        std::rethrow_exception(error);  // caught below, recorded in the load
      }
    }
    load.decoded_bytes += chunk.raw_size;
  } catch (const CorruptionError&) {
    context_.stats.on_checksum_failure();
    load.set_error(std::current_exception());
  } catch (...) {
    load.set_error(std::current_exception());
  }
}

void ChunkStage::copy_from_tier(LoadState& load) noexcept {
  try {
    if (load.failed()) return;
    const std::span<const std::byte> bytes = load.from_tier.subspan(0, load.data.size());
    const TraceSpan span(context_.trace, TraceKind::kTransfer, load.block, -1, -1, bytes.size());
    std::exception_ptr error;
    const CopyTag tag{static_cast<uint32_t>(load.block), -1, -1};
    // No lease: the tier keeps its buffers for the engine's lifetime, and the engine drains copies first.
    if (context_.transfer.copy_async(StagingLease{}, bytes, load.data, 0, &error, tag) < 0) {
      std::rethrow_exception(error);
    }
    context_.stats.on_host_tier_hit(bytes.size());
    load.decoded_bytes += bytes.size();
  } catch (...) {
    load.set_error(std::current_exception());
  }
}

}  // namespace tensorstream::detail
