#include "tensorstream/io/memory_headroom.hpp"

#include <gtest/gtest.h>

#include <cstdint>

namespace tensorstream {
namespace {

TEST(MemoryHeadroom, MemAvailableIsReadInKibAndConvertedToBytes) {
  const char* meminfo =
      "MemTotal:       24576000 kB\n"
      "MemFree:         1000000 kB\n"
      "MemAvailable:   20000000 kB\n"
      "Buffers:           12345 kB\n";
  EXPECT_EQ(parse_mem_available(meminfo), uint64_t{20000000} * 1024);
}

TEST(MemoryHeadroom, MalformedOrMissingMemAvailableIsUnknown) {
  EXPECT_EQ(parse_mem_available("MemTotal: 100 kB\n"), std::nullopt);
  EXPECT_EQ(parse_mem_available("MemAvailable: lots kB\n"), std::nullopt);
  EXPECT_EQ(parse_mem_available("MemAvailable: 100\n"), std::nullopt);              // no unit
  EXPECT_EQ(parse_mem_available("XMemAvailable: 100 kB\n"), std::nullopt);          // not at a line start
  EXPECT_EQ(parse_mem_available("MemAvailable: 99999999999999999999 kB\n"), std::nullopt);  // overflows
}

TEST(MemoryHeadroom, CgroupHeadroomIsLimitMinusUsageAndNoLimitIsUnknown) {
  EXPECT_EQ(cgroup_headroom("2147483648\n", "536870912\n"), uint64_t{1610612736});
  EXPECT_EQ(cgroup_headroom("1000\n", "5000\n"), uint64_t{0});  // over the limit (reclaim pending): no room
  EXPECT_EQ(cgroup_headroom("max\n", "536870912\n"), std::nullopt);
  EXPECT_EQ(cgroup_headroom("9223372036854771712\n", "4096\n"), std::nullopt);  // cgroup v1's "unlimited"
  EXPECT_EQ(cgroup_headroom("12x\n", "4096\n"), std::nullopt);
  EXPECT_EQ(cgroup_headroom("4096\n", "\n"), std::nullopt);
}

TEST(MemoryHeadroom, TheV2EntryWinsAndV1FallsBackToTheMemoryController) {
  bool v2 = false;
  EXPECT_EQ(memory_cgroup_path("0::/user.slice/bench.scope\n", &v2), "/user.slice/bench.scope");
  EXPECT_TRUE(v2);
  const char* v1 = "12:cpu,cpuacct:/a\n7:memory:/docker/abc\n1:name=systemd:/x\n";
  EXPECT_EQ(memory_cgroup_path(v1, &v2), "/docker/abc");
  EXPECT_FALSE(v2);
  // A hybrid host (this development VM): v1 controllers, and an empty v2 entry with no memory controller.
  const char* hybrid = "4:memory:/process_api/84f6\n3:cpuset:/\n0::/\n";
  EXPECT_EQ(memory_cgroup_path(hybrid, &v2), "/process_api/84f6");
  EXPECT_FALSE(v2);
  EXPECT_EQ(memory_cgroup_path("12:cpu:/a\n", &v2), std::nullopt);
  EXPECT_EQ(memory_cgroup_path("garbage", &v2), std::nullopt);
}

TEST(MemoryHeadroom, ThisMachineHasSomeHeadroomAndCannotCacheTheImpossible) {
  const std::optional<uint64_t> headroom = memory_headroom_bytes();
  ASSERT_TRUE(headroom.has_value());  // Linux always has /proc/meminfo
  EXPECT_GT(*headroom, 0u);
  EXPECT_TRUE(page_cache_can_hold(0));
  EXPECT_FALSE(page_cache_can_hold(UINT64_MAX / 2));
  EXPECT_EQ(page_cache_can_hold(*headroom), false);  // more than half of the room
}

}  // namespace
}  // namespace tensorstream
