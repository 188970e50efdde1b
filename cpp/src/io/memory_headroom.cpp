#include "tensorstream/io/memory_headroom.hpp"

#include <algorithm>
#include <charconv>
#include <fstream>
#include <sstream>
#include <string>

namespace tensorstream {
namespace {

std::string_view trim(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ' || text.back() == '\t')) text.remove_suffix(1);
  return text;
}

std::optional<uint64_t> parse_u64(std::string_view text) {
  text = trim(text);
  uint64_t value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc{} || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return value;
}

std::optional<std::string> read_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit value, not as "max".
constexpr uint64_t kV1Unlimited = uint64_t{1} << 62;

}  // namespace

std::optional<uint64_t> parse_mem_available(std::string_view meminfo) {
  constexpr std::string_view kKey = "MemAvailable:";
  const size_t at = meminfo.find(kKey);
  if (at == std::string_view::npos || (at != 0 && meminfo[at - 1] != '\n')) return std::nullopt;
  std::string_view line = meminfo.substr(at + kKey.size());
  line = line.substr(0, line.find('\n'));
  line = trim(line);
  if (line.size() < 3 || line.substr(line.size() - 2) != "kB") return std::nullopt;
  const std::optional<uint64_t> kib = parse_u64(line.substr(0, line.size() - 2));
  if (!kib || *kib > UINT64_MAX / 1024) return std::nullopt;
  return *kib * 1024;
}

std::optional<uint64_t> cgroup_headroom(std::string_view limit, std::string_view usage) {
  if (trim(limit) == "max") return std::nullopt;
  const std::optional<uint64_t> max = parse_u64(limit);
  const std::optional<uint64_t> used = parse_u64(usage);
  if (!max || !used || *max >= kV1Unlimited) return std::nullopt;
  return *max > *used ? *max - *used : 0;
}

std::optional<std::string_view> memory_cgroup_path(std::string_view text, bool* v2) {
  std::optional<std::string_view> v1_path;
  std::optional<std::string_view> v2_path;
  while (!text.empty()) {
    std::string_view line = text.substr(0, text.find('\n'));
    text.remove_prefix(std::min(text.size(), line.size() + 1));
    // hierarchy-id:controllers:path
    const size_t first = line.find(':');
    const size_t second = first == std::string_view::npos ? first : line.find(':', first + 1);
    if (second == std::string_view::npos) continue;
    const std::string_view id = line.substr(0, first);
    const std::string_view controllers = line.substr(first + 1, second - first - 1);
    const std::string_view path = line.substr(second + 1);
    if (id == "0" && controllers.empty()) {
      v2_path = path;
      continue;
    }
    std::string_view rest = controllers;
    while (!rest.empty()) {
      const std::string_view name = rest.substr(0, rest.find(','));
      rest.remove_prefix(std::min(rest.size(), name.size() + 1));
      if (name == "memory") v1_path = path;
    }
  }
  if (v2 != nullptr) *v2 = !v1_path && v2_path;
  return v1_path ? v1_path : v2_path;
}

std::optional<uint64_t> memory_headroom_bytes() {
  std::optional<uint64_t> headroom;
  if (const auto meminfo = read_file("/proc/meminfo")) headroom = parse_mem_available(*meminfo);
  if (const auto cgroups = read_file("/proc/self/cgroup")) {
    bool v2 = false;
    if (const auto path = memory_cgroup_path(*cgroups, &v2)) {
      // This cgroup and every ancestor up to the root: the tightest limit wins.
      std::string relative(*path);
      for (;;) {
        const std::string dir = (v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/memory") + relative;
        const auto limit = read_file(dir + (v2 ? "/memory.max" : "/memory.limit_in_bytes"));
        const auto usage = read_file(dir + (v2 ? "/memory.current" : "/memory.usage_in_bytes"));
        if (limit && usage) {
          if (const auto room = cgroup_headroom(*limit, *usage)) headroom = headroom ? std::min(*headroom, *room) : *room;
        }
        if (relative.empty() || relative == "/") break;
        const size_t slash = relative.find_last_of('/');
        relative = slash == std::string::npos || slash == 0 ? std::string("/") : relative.substr(0, slash);
      }
    }
  }
  return headroom;
}

bool page_cache_can_hold(uint64_t bytes) {
  const std::optional<uint64_t> headroom = memory_headroom_bytes();
  return headroom && bytes <= *headroom / 2;
}

}  // namespace tensorstream
