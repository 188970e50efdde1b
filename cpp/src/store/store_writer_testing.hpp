// Private: test hooks into StoreWriter's encode/write pipeline (store_writer.cpp). They let tests prove that the
// compression of one batch of chunks overlaps the write of the previous one, and fail a chosen write the way a full
// disk does, without timing anything. Production code never sets them; an unset hook costs one branch per batch
// or per chunk.
//
// Thread-safety: set_store_writer_hooks_for_testing from any thread; each StoreWriter copies the hooks once, at
// construction. encode_started runs on a compression thread, before_write on the thread that writes (the
// caller's), so a hook that records anything must synchronize.
#pragma once

#include <cstdint>
#include <functional>

namespace tensorstream::detail {

struct StoreWriterHooks {
  // A compression thread starts on batch `batch` (a writer numbers its batches 0, 1, 2, ... across tensors).
  std::function<void(uint64_t batch)> encode_started;
  // Before the stored bytes of one chunk of `batch` are written at `offset`: returning an errno fails that write
  // as if pwrite() had (IoError naming the data file and the offset); 0 writes normally.
  std::function<int(uint64_t batch, uint64_t offset, uint64_t size)> before_write;
};

// Hooks for the writers constructed from now on; StoreWriterHooks{} removes them.
void set_store_writer_hooks_for_testing(StoreWriterHooks hooks);

}  // namespace tensorstream::detail
