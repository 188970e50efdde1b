// Private: the mmap backend. Each file is mapped whole, once (MAP_PRIVATE, PROT_READ|PROT_WRITE: callers may
// write into a view, which copies the touched pages and never changes the file), and reads are memcpy from the
// mapping; view() hands out the mapped bytes themselves for CPU execution without a copy.
//
// Thread-safety: every method may be called from any thread, except reap() (one thread at a time).
#pragma once

#include <memory>

#include "tensorstream/io/io_backend.hpp"

namespace tensorstream::detail {

// Mappings live until the backend is destroyed (a file that grew is mapped again; the old mapping stays valid
// for views already handed out). A read or view beyond the file's current size is -ENODATA / empty, checked
// with fstat before touching the mapping; a file truncated by another process *during* a copy can still raise
// SIGBUS, which no user-space check can prevent.
[[nodiscard]] std::unique_ptr<IoBackend> make_mmap_backend();

}  // namespace tensorstream::detail
