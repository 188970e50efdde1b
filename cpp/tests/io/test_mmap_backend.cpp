#include "io/mmap_backend.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "support/fault_backend.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/io/file.hpp"

namespace tensorstream {
namespace {

using detail::make_mmap_backend;
using testing::TempDir;
using testing::Watchdog;

struct TestFile {
  TestFile(const std::filesystem::path& file_path, uint64_t size, uint64_t seed = 8)
      : path(file_path), bytes(testing::random_bytes(size, seed)) {
    testing::write_file_bytes(path, bytes);
    fd = open_file(path, O_RDONLY);
  }
  std::filesystem::path path;
  std::vector<std::byte> bytes;
  UniqueFd fd;
};

bool matches(std::span<const std::byte> got, const std::vector<std::byte>& file, uint64_t offset) {
  return std::equal(got.begin(), got.end(), file.begin() + static_cast<std::ptrdiff_t>(offset));
}

int64_t read_one(IoBackend& backend, int fd, uint64_t offset, std::span<std::byte> buffer) {
  const ReadRequest request{fd, offset, buffer, 77};
  backend.submit({&request, 1});
  EXPECT_EQ(backend.in_flight(), 1u);
  std::vector<Completion> out(2);
  EXPECT_EQ(backend.reap(out, true), 1u);
  EXPECT_EQ(out[0].user_data, 77u);
  return out[0].result;
}

TEST(MmapBackend, ViewsEqualTheFileBytes) {
  TempDir dir;
  TestFile file(dir.path() / "a", 300000);
  const auto backend = make_mmap_backend();
  EXPECT_EQ(backend->caps().name, "mmap");
  EXPECT_TRUE(backend->caps().zero_copy_views);
  for (const auto& [offset, length] : std::vector<std::pair<uint64_t, uint64_t>>{
           {0, 300000}, {1, 10}, {4095, 4097}, {299999, 1}, {123456, 100000}}) {
    const auto view = backend->view(file.fd.get(), offset, length);
    ASSERT_EQ(view.size(), length);
    EXPECT_TRUE(matches(view, file.bytes, offset)) << offset;
  }
  // The file is mapped once: two views of the same bytes are the same memory.
  EXPECT_EQ(backend->view(file.fd.get(), 10, 5).data(), backend->view(file.fd.get(), 0, 20).data() + 10);
  EXPECT_TRUE(backend->view(file.fd.get(), 0, 0).empty());
}

TEST(MmapBackend, SubmitCopiesIntoTheCallersBuffer) {
  TempDir dir;
  TestFile file(dir.path() / "a", 100000);
  const auto backend = make_mmap_backend();
  std::vector<std::byte> buffer(5000);
  EXPECT_EQ(read_one(*backend, file.fd.get(), 777, buffer), 5000);
  EXPECT_TRUE(matches(buffer, file.bytes, 777));
  buffer[0] = ~buffer[0];  // a copy: the mapping does not change
  EXPECT_TRUE(matches(backend->view(file.fd.get(), 777, 5000), file.bytes, 777));
  EXPECT_EQ(backend->in_flight(), 0u);
  EXPECT_EQ(read_one(*backend, file.fd.get(), 0, {}), 0);
}

TEST(MmapBackend, WritingIntoAViewNeverChangesTheFile) {
  TempDir dir;
  TestFile file(dir.path() / "a", 8192);
  const auto backend = make_mmap_backend();
  const auto view = backend->view(file.fd.get(), 0, 8192);
  ASSERT_EQ(view.size(), 8192u);
  auto* writable = const_cast<std::byte*>(view.data());  // copy-on-write views are allowed to be written
  writable[100] = ~writable[100];
  EXPECT_NE(view[100], file.bytes[100]);
  EXPECT_EQ(testing::read_file_bytes(file.path), file.bytes);
}

TEST(MmapBackend, RangesBeyondTheFileAreEnodata) {
  TempDir dir;
  TestFile file(dir.path() / "a", 10000);
  const auto backend = make_mmap_backend();
  std::vector<std::byte> buffer(200);
  EXPECT_EQ(read_one(*backend, file.fd.get(), 9900, buffer), -ENODATA);
  EXPECT_EQ(read_one(*backend, file.fd.get(), 20000, buffer), -ENODATA);
  EXPECT_EQ(read_one(*backend, file.fd.get(), UINT64_MAX - 10, buffer), -ENODATA);
  EXPECT_TRUE(backend->view(file.fd.get(), 9900, 200).empty());

  // Truncated after it was mapped: checked against the current size, so no SIGBUS.
  ASSERT_EQ(read_one(*backend, file.fd.get(), 8000, buffer), 200);
  {
    const UniqueFd writer = open_file(file.path, O_WRONLY);
    ASSERT_EQ(::ftruncate(writer.get(), 4096), 0);
  }
  EXPECT_EQ(read_one(*backend, file.fd.get(), 8000, buffer), -ENODATA);
  EXPECT_TRUE(backend->view(file.fd.get(), 8000, 200).empty());
  EXPECT_EQ(read_one(*backend, file.fd.get(), 100, buffer), 200);
  EXPECT_TRUE(matches(buffer, file.bytes, 100));
}

TEST(MmapBackend, GrownFilesAndReusedDescriptorsAreMappedAgain) {
  TempDir dir;
  TestFile file(dir.path() / "a", 5000);
  const auto backend = make_mmap_backend();
  const auto old_view = backend->view(file.fd.get(), 0, 5000);
  ASSERT_EQ(old_view.size(), 5000u);

  const auto more = testing::random_bytes(20000, 99);
  {
    const UniqueFd writer = open_file(file.path, O_WRONLY);
    pwrite_all(writer.get(), more, 5000, file.path.string());
  }
  const auto grown = backend->view(file.fd.get(), 5000, 20000);
  ASSERT_EQ(grown.size(), 20000u);
  EXPECT_TRUE(std::equal(grown.begin(), grown.end(), more.begin()));
  EXPECT_TRUE(matches(old_view, file.bytes, 0));  // views handed out earlier stay valid

  // Same descriptor number, another file.
  const int number = file.fd.get();
  file.fd.reset();
  const auto other = testing::random_bytes(6000, 123);
  testing::write_file_bytes(dir.path() / "b", other);
  UniqueFd reopened = open_file(dir.path() / "b", O_RDONLY);
  ASSERT_EQ(reopened.get(), number) << "the kernel hands out the lowest free number";
  const auto view = backend->view(reopened.get(), 0, 6000);
  ASSERT_EQ(view.size(), 6000u);
  EXPECT_TRUE(std::equal(view.begin(), view.end(), other.begin()));
}

TEST(MmapBackend, EmptyFilesAndBadDescriptors) {
  TempDir dir;
  testing::write_file_bytes(dir.path() / "empty", {});
  const UniqueFd empty = open_file(dir.path() / "empty", O_RDONLY);
  const auto backend = make_mmap_backend();
  std::vector<std::byte> buffer(1);
  EXPECT_EQ(read_one(*backend, empty.get(), 0, {}), 0);
  EXPECT_EQ(read_one(*backend, empty.get(), 0, buffer), -ENODATA);
  EXPECT_TRUE(backend->view(empty.get(), 0, 1).empty());
  EXPECT_EQ(read_one(*backend, -1, 0, buffer), -EBADF);
  EXPECT_TRUE(backend->view(-1, 0, 1).empty());
  std::vector<Completion> out(1);
  EXPECT_EQ(backend->reap(out, true), 0u);  // nothing in flight: returns at once
}

TEST(MmapBackend, HintsDoNotBreakReadsOrViews) {
  TempDir dir;
  TestFile file(dir.path() / "a", 1 << 20);
  TestFile unmapped(dir.path() / "b", 1 << 16, 3);
  const auto backend = make_mmap_backend();
  backend->will_need(file.fd.get(), 100, 500000);
  const auto view = backend->view(file.fd.get(), 0, 1 << 20);
  ASSERT_EQ(view.size(), size_t{1} << 20);
  backend->dont_need(file.fd.get(), 4097, 300000);  // unaligned: rounded out to whole pages
  EXPECT_TRUE(matches(view, file.bytes, 0));        // dropped pages fault back in from the file
  backend->will_need(file.fd.get(), 0, 0);
  backend->dont_need(file.fd.get(), 1 << 20, 1);        // beyond the end
  backend->dont_need(unmapped.fd.get(), 0, 1 << 16);    // never mapped: page-cache hint
  backend->will_need(-1, 0, 10);
  std::vector<std::byte> buffer(1 << 16);
  EXPECT_EQ(read_one(*backend, unmapped.fd.get(), 0, buffer), 1 << 16);
  EXPECT_EQ(buffer, unmapped.bytes);
}

TEST(MmapBackend, ConcurrentSubmitsAndViews) {
  const Watchdog dog("MmapBackend.ConcurrentSubmitsAndViews");
  TempDir dir;
  TestFile file(dir.path() / "a", 1 << 20);
  const auto backend = make_mmap_backend();
  std::vector<std::vector<std::byte>> buffers(400, std::vector<std::byte>(1000));
  std::vector<std::thread> threads;
  std::atomic<int> bad_views{0};
  for (size_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = 0; i < 100; ++i) {
        const size_t id = t * 100 + i;
        const ReadRequest request{file.fd.get(), id * 2000, buffers[id], id};
        backend->submit({&request, 1});
        const auto view = backend->view(file.fd.get(), id * 2000, 1000);
        if (!matches(view, file.bytes, id * 2000) || view.size() != 1000) bad_views.fetch_add(1);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(bad_views.load(), 0);
  std::vector<Completion> out(1000);
  EXPECT_EQ(backend->reap(out, false), 400u);
  for (size_t id = 0; id < buffers.size(); ++id) ASSERT_TRUE(matches(buffers[id], file.bytes, id * 2000)) << id;
}

}  // namespace
}  // namespace tensorstream
