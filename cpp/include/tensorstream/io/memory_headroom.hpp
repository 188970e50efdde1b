// Memory headroom: how much more this process may bring into memory, page cache included, before the kernel has to
// take memory from someone. AUTO reads a store through the page cache when the store fits in that headroom (later
// passes are then views of cached pages, and nothing is read twice), and around it (O_DIRECT) when it does not, so
// that a store larger than memory never evicts everything else for pages it will read again only after evicting
// them itself.
//
// Two limits apply, and the smaller wins: the machine's (MemAvailable in /proc/meminfo: free memory plus what the
// kernel can reclaim without swapping) and the memory cgroup's (cgroup v2 memory.max - memory.current, or v1
// memory.limit_in_bytes - memory.usage_in_bytes): page cache pages are charged to the cgroup that faulted them in,
// so a container limited to 2 GiB cannot cache a 3 GiB store whatever the machine has.
//
// Thread-safety: free functions; safe from any thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace tensorstream {

// MemAvailable from the text of /proc/meminfo, in bytes; nullopt when absent or malformed.
[[nodiscard]] std::optional<uint64_t> parse_mem_available(std::string_view meminfo);
// A cgroup's room from the text of its limit and usage files: limit - usage (0 when usage exceeds the limit);
// nullopt for no limit ("max", or v1's near-2^63 "unlimited") or malformed text.
[[nodiscard]] std::optional<uint64_t> cgroup_headroom(std::string_view limit, std::string_view usage);
// The memory cgroup path of this process from the text of /proc/self/cgroup: the v1 memory controller's path when
// there is one (a hybrid host lists an empty v2 entry "0::/" beside it, with no memory controller behind it), else
// the v2 entry ("0::/path"); nullopt when neither is there.
[[nodiscard]] std::optional<std::string_view> memory_cgroup_path(std::string_view proc_self_cgroup, bool* v2);

// The smallest of the machine's headroom and that of this process's memory cgroup and each of its ancestors (a
// container's limit usually sits on a parent), read now; nullopt when none can be read.
[[nodiscard]] std::optional<uint64_t> memory_headroom_bytes();
// Whether `bytes` more in memory leave at least half the headroom free: the rule AUTO uses to cache a store
// (engine.cpp). False when the headroom cannot be read (O_DIRECT is then the safe choice).
[[nodiscard]] bool page_cache_can_hold(uint64_t bytes);

}  // namespace tensorstream
