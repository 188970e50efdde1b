// Mapping guard: a file mapping whose file shrinks must not kill the process.
//
// Pages of a mapping beyond the end of its file raise SIGBUS when touched, and the default action ends the process
// (exit 135/139) with no word of which file or block. A store's data file can shrink under a live model: another
// process truncates it, a disk fills while a tool rewrites it in place. The engine checks the file's size before it
// hands out a view (engine.cpp), but a view stays in use for a whole forward pass and the file can shrink meanwhile.
//
// So every mapping of a store file is registered here. A process-wide SIGBUS handler (installed on the first
// registration, chained to whatever handler was there before) recognises a fault inside a registered range, maps a
// page of zeros over the faulting page (MAP_FIXED, async-signal-safe) and records the address; the access then
// completes and the computation goes on with zeros. The owner of the view asks `mapping_damaged` after each use and
// turns a damaged view into a typed IoError, so the zeros never reach a caller as a result: the engine checks when
// a mapped block is released (the forward that used it fails) and before it hands a mapped block out again. A fault
// outside every registered range goes to the previous handler, or ends the process as before.
//
// Thread-safety: every function is safe from any thread; the handler takes no lock (atomics only).
#pragma once

#include <cstdint>

namespace tensorstream {

// Registers [base, base + length), a mapping of a file. Returns a handle for unguard_mapping, or 0 when the table
// of guarded ranges is full (1024 ranges: then the range is unguarded and a shrinking file ends the process).
[[nodiscard]] uint32_t guard_mapping(const void* base, uint64_t length) noexcept;
// Before munmap of a guarded range (a range must not be unmapped while registered: another mapping could take its
// addresses and a fault there would be patched with zeros).
void unguard_mapping(uint32_t handle) noexcept;
// Whether a page of [address, address + length) faulted past the end of its file (and now holds zeros).
[[nodiscard]] bool mapping_damaged(const void* address, uint64_t length) noexcept;
// Whether the guarded range `handle` has any such page.
[[nodiscard]] bool mapping_damaged(uint32_t handle) noexcept;

}  // namespace tensorstream
