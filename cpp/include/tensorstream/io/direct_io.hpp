// O_DIRECT decisions: direct reads skip the page cache (no double buffering, no eviction of useful pages, full
// device bandwidth with little CPU), buffered reads win when the data already sits in the page cache. AUTO mode
// checks residency with mincore on a small mapping of the range.
//
// Thread-safety: free functions; safe from any thread.
#pragma once

#include <cstdint>

#include "tensorstream/config.hpp"

namespace tensorstream {

inline constexpr uint64_t kDirectIoAlignment = 4096;

// Fraction (0..1) of the pages of [offset, offset+length) of `fd` that are in the page cache.
[[nodiscard]] double page_cache_fraction(int fd, uint64_t offset, uint64_t length);
// Whether a read of that range should use O_DIRECT under `mode`.
[[nodiscard]] bool should_read_direct(DirectIoMode mode, int fd, uint64_t offset, uint64_t length);
// True when the file system under `fd`'s file accepts O_DIRECT (tmpfs does not).
[[nodiscard]] bool direct_io_supported(const char* path);

}  // namespace tensorstream
