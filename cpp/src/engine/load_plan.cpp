#include "engine/load_plan.hpp"

#include <algorithm>

#include "tensorstream/error.hpp"
#include "tensorstream/io/direct_io.hpp"

namespace tensorstream::detail {

namespace {

// The block's chunks in file order with their offsets from the block's start.
std::vector<ChunkInPlace> chunks_in_place(const Manifest& manifest, const BlockRecord& record) {
  std::vector<ChunkInPlace> out;
  for (size_t t = record.first_tensor; t < record.first_tensor + record.tensor_count; ++t) {
    const TensorRecord& tensor = manifest.tensors[t];
    for (size_t c = 0; c < tensor.chunk_count; ++c) {
      const ChunkRecord& chunk = manifest.chunks[tensor.first_chunk + c];
      out.push_back({t, c, chunk.offset - record.offset, chunk.stored_size});
    }
  }
  return out;
}

// Reads of the whole region, chunk_size bytes each, and which chunks each covers.
void plan_region(const Manifest& manifest, const BlockRecord& record, const LoadPlanInputs& inputs, LoadPlan& plan) {
  const uint64_t length = align_up(record.end - record.offset, kBlockAlignment);
  const uint64_t read_size = manifest.chunk_size;
  const bool direct = inputs.direct && inputs.slots_aligned;  // offsets and lengths are 4 KiB multiples already
  for (uint64_t done = 0; done < length; done += read_size) {
    PlannedRead read;
    read.file_offset = record.offset + done;
    read.length = std::min<uint64_t>(read_size, length - done);
    read.direct = direct;
    read.slot_offset = done;
    read.first_chunk = plan.in_place.size();  // narrowed below
    read.last_chunk = 0;
    plan.reads.push_back(read);
  }
  plan.reads_per_chunk.resize(plan.in_place.size());
  for (size_t k = 0; k < plan.in_place.size(); ++k) {
    const ChunkInPlace& chunk = plan.in_place[k];
    const size_t first = chunk.begin / read_size;
    const size_t last = std::min((chunk.begin + chunk.size - 1) / read_size, plan.reads.size() - 1);
    plan.reads_per_chunk[k] = static_cast<uint32_t>(last - first + 1);
    for (size_t r = first; r <= last; ++r) {
      plan.reads[r].first_chunk = std::min(plan.reads[r].first_chunk, k);
      plan.reads[r].last_chunk = std::max(plan.reads[r].last_chunk, k + 1);
    }
  }
  for (PlannedRead& read : plan.reads) {
    if (read.last_chunk == 0) read.first_chunk = 0;  // covers only padding: an empty range
  }
}

// One read per chunk. Raw chunks of a host slot land in the slot; everything else is staged.
void plan_chunks(const Manifest& manifest, const BlockRecord& record, const LoadPlanInputs& inputs, LoadPlan& plan) {
  for (size_t t = record.first_tensor; t < record.first_tensor + record.tensor_count; ++t) {
    const TensorRecord& tensor = manifest.tensors[t];
    for (size_t c = 0; c < tensor.chunk_count; ++c) {
      const ChunkRecord& chunk = manifest.chunks[tensor.first_chunk + c];
      if (chunk.stored_size > manifest.chunk_size) {
        throw FormatError("chunk.size", "manifest",
                          "chunk " + std::to_string(c) + " of tensor '" + tensor.name + "' stores " +
                              std::to_string(chunk.stored_size) + " bytes, more than the chunk size");
      }
      PlannedRead read;
      read.tensor = t;
      read.chunk = c;
      read.staged = !(chunk.codec == Codec::kRaw && host_addressable(inputs.access));
      if (!read.staged) {
        // Into the slot at the tensor's own offset, which is only 256-byte aligned: buffered.
        read.file_offset = chunk.offset;
        read.length = chunk.stored_size;
        read.slot_offset = tensor.slot_offset + c * tensor.chunk_size;
      } else if (inputs.direct) {
        // Staging buffers are 4 KiB aligned: round the chunk's range out to 4 KiB and skip the head afterwards.
        // The data file's size is a 4 KiB multiple, so the rounded range never passes its end.
        read.direct = true;
        read.file_offset = chunk.offset / kDirectIoAlignment * kDirectIoAlignment;
        read.skip = chunk.offset - read.file_offset;
        read.length = align_up(chunk.offset + chunk.stored_size, kDirectIoAlignment) - read.file_offset;
      } else {
        read.file_offset = chunk.offset;
        read.length = chunk.stored_size;
      }
      if (read.staged) plan.max_staged_bytes = std::max(plan.max_staged_bytes, read.length);
      plan.reads.push_back(read);
    }
  }
}

}  // namespace

uint64_t staging_bytes_for(uint64_t chunk_size) noexcept {
  return align_up(chunk_size, kDirectIoAlignment) + 2 * kDirectIoAlignment;
}

LoadPlan plan_load(const Manifest& manifest, size_t block, const LoadPlanInputs& inputs) {
  const BlockRecord& record = manifest.blocks.at(block);
  LoadPlan plan;
  plan.stored_bytes = record.end - record.offset;
  if (plan.stored_bytes == 0) return plan;  // kEmpty
  // The reader may write raw bytes into the slot itself: host memory, or device memory through GPUDirect when
  // nothing needs to be verified on the CPU on the way.
  const bool reads_into_slot =
      host_addressable(inputs.access) || (inputs.access == SlotAccess::kDeviceDirect && !inputs.verify);
  if (record.all_raw && inputs.map && host_addressable(inputs.access)) {
    plan.kind = LoadPlan::Kind::kMapped;
    plan.in_place = chunks_in_place(manifest, record);
  } else if (record.all_raw && reads_into_slot) {
    plan.kind = LoadPlan::Kind::kRegion;
    plan.in_place = chunks_in_place(manifest, record);
    plan_region(manifest, record, inputs, plan);
  } else {
    plan.kind = LoadPlan::Kind::kChunks;
    plan_chunks(manifest, record, inputs, plan);
  }
  return plan;
}

}  // namespace tensorstream::detail
