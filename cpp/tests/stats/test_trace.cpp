#include "tensorstream/stats/trace.hpp"

#include <gtest/gtest.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "support/fault_backend.hpp"
#include "support/recording_transfer.hpp"
#include "support/store_fixture.hpp"
#include "support/test_arena.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/error.hpp"

namespace tensorstream {
namespace {

using testing::TempDir;
using testing::TestBlock;

uint32_t os_thread_id() { return static_cast<uint32_t>(::syscall(SYS_gettid)); }

TraceEvent event_at(uint64_t start_ns, uint64_t end_ns, uint32_t block = 0) {
  TraceEvent event;
  event.start_ns = start_ns;
  event.end_ns = end_ns;
  event.block = block;
  return event;
}

// ---- the recorder on its own --------------------------------------------------------------------------------------

TEST(TraceRecorder, OffRecordsNothing) {
  TraceRecorder trace;
  EXPECT_FALSE(trace.enabled());
  trace.record(event_at(1, 2));
  { const TraceSpan span(trace, TraceKind::kVerify, 0, 0, 0, 10); }
  const TraceBatch batch = trace.drain();
  EXPECT_TRUE(batch.events.empty());
  EXPECT_EQ(batch.dropped, 0u);
}

TEST(TraceRecorder, BufferIsBoundedAndCountsWhatItDrops) {
  TraceRecorder trace;
  trace.enable(3);
  EXPECT_EQ(trace.max_events(), 3u);
  for (uint32_t i = 0; i < 5; ++i) trace.record(event_at(i, i + 1, i));
  TraceBatch batch = trace.drain();
  ASSERT_EQ(batch.events.size(), 3u);
  EXPECT_EQ(batch.dropped, 2u);
  EXPECT_EQ(batch.events[0].block, 0u);  // the first events are kept, later ones dropped
  EXPECT_EQ(batch.events[2].block, 2u);
  batch = trace.drain();  // draining empties both the buffer and the count
  EXPECT_TRUE(batch.events.empty());
  EXPECT_EQ(batch.dropped, 0u);
  trace.record(event_at(7, 8));  // room again after a drain
  trace.disable();
  trace.record(event_at(9, 10));  // ignored, not dropped
  batch = trace.drain();
  ASSERT_EQ(batch.events.size(), 1u);
  EXPECT_EQ(batch.events[0].start_ns, 7u);
  EXPECT_EQ(batch.dropped, 0u);
}

TEST(TraceRecorder, BoundOutsideItsRangeIsAConfigError) {
  TraceRecorder trace;
  EXPECT_THROW(trace.enable(0), ConfigError);
  EXPECT_THROW(trace.enable(TraceRecorder::kMaxMaxEvents + 1), ConfigError);
  EXPECT_FALSE(trace.enabled());
}

TEST(TraceRecorder, ConcurrentRecordersAndDrainerLoseNothing) {
  TraceRecorder trace;
  trace.enable();
  constexpr uint32_t kThreads = 8;
  constexpr uint32_t kEach = 2000;
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&trace, t] {
      for (uint32_t i = 0; i < kEach; ++i) trace.record(event_at(i, i, t));
    });
  }
  std::vector<uint64_t> per_thread(kThreads, 0);
  uint64_t dropped = 0;
  auto collect = [&] {
    TraceBatch batch = trace.drain();
    dropped += batch.dropped;
    for (const TraceEvent& event : batch.events) per_thread.at(event.block)++;
  };
  for (int i = 0; i < 50; ++i) collect();  // drains while the recorders run
  for (auto& thread : threads) thread.join();
  collect();
  EXPECT_EQ(dropped, 0u);
  for (uint32_t t = 0; t < kThreads; ++t) EXPECT_EQ(per_thread[t], kEach) << "thread " << t;
}

TEST(TraceRecorder, SpanRecordsItsThreadsLaneEvenWhenTheScopeThrows) {
  TraceRecorder trace;
  trace.enable();
  EXPECT_EQ(current_thread_lane().kind, TraceLaneKind::kCaller);
  EXPECT_EQ(current_thread_lane().index, os_thread_id());  // Python's threading.get_native_id()
  std::thread worker([&] {
    set_current_thread_lane({TraceLaneKind::kWorker, 3});
    try {
      const TraceSpan span(trace, TraceKind::kVerify, 5, 2, 1, 4096);
      throw std::runtime_error("checksum mismatch");
    } catch (const std::runtime_error&) {
    }
  });
  worker.join();
  { const TraceSpan span(trace, TraceKind::kDecompress, 6, -1, -1, 0); }
  const TraceBatch batch = trace.drain();
  ASSERT_EQ(batch.events.size(), 2u);
  const TraceEvent& verify = batch.events[0];
  EXPECT_EQ(verify.kind, TraceKind::kVerify);
  EXPECT_EQ(verify.lane.kind, TraceLaneKind::kWorker);
  EXPECT_EQ(verify.lane.index, 3u);
  EXPECT_EQ(verify.block, 5u);
  EXPECT_EQ(verify.tensor, 2);
  EXPECT_EQ(verify.chunk, 1);
  EXPECT_EQ(verify.bytes, 4096u);
  EXPECT_LE(verify.start_ns, verify.end_ns);
  EXPECT_EQ(batch.events[1].lane.kind, TraceLaneKind::kCaller);
  EXPECT_EQ(trace_kind_name(TraceKind::kDecompress), "decompress");
  EXPECT_EQ(trace_lane_kind_name(TraceLaneKind::kIo), "io");
}

// ---- the engine's events ------------------------------------------------------------------------------------------

// 4 KiB-aligned memory standing in for the arena PyTorch owns.


// The pread pool, except that no read completes until open() is called: a caller that waits is then sure to
// block, so a stall is certain to be recorded.
class GatedBackend final : public IoBackend {
 public:
  GatedBackend() : inner_(make_backend(BackendOptions{BackendKind::kPread, 2, 32})) {}
  void submit(std::span<const ReadRequest> requests) override { inner_->submit(requests); }
  size_t reap(std::span<Completion> out, bool wait) override {
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return open_; });
    }
    return inner_->reap(out, wait);
  }
  [[nodiscard]] size_t in_flight() const override { return inner_->in_flight(); }
  [[nodiscard]] BackendCaps caps() const override { return inner_->caps(); }
  void open() {
    {
      std::lock_guard lock(mutex_);
      open_ = true;
    }
    cv_.notify_all();
  }

 private:
  std::unique_ptr<IoBackend> inner_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
};

using Events = std::vector<TraceEvent>;

Events of_kind(const Events& events, TraceKind kind, size_t block) {
  Events out;
  for (const TraceEvent& event : events) {
    if (event.kind == kind && event.block == block) out.push_back(event);
  }
  return out;
}

uint64_t total_bytes(const Events& events) {
  uint64_t total = 0;
  for (const TraceEvent& event : events) total += event.bytes;
  return total;
}

// Every event ends after it starts, and the events of one lane (one thread, or one I/O lane) never overlap.
void expect_well_formed(const Events& events) {
  std::map<std::pair<TraceLaneKind, uint32_t>, Events> lanes;
  for (const TraceEvent& event : events) {
    EXPECT_LE(event.start_ns, event.end_ns) << trace_kind_name(event.kind) << " of block " << event.block;
    lanes[{event.lane.kind, event.lane.index}].push_back(event);
  }
  for (auto& [lane, list] : lanes) {
    std::sort(list.begin(), list.end(), [](const TraceEvent& a, const TraceEvent& b) {
      return a.start_ns != b.start_ns ? a.start_ns < b.start_ns : a.end_ns < b.end_ns;
    });
    for (size_t i = 1; i < list.size(); ++i) {
      EXPECT_GE(list[i].start_ns, list[i - 1].end_ns)
          << trace_lane_kind_name(lane.first) << " lane " << lane.second << ": " << trace_kind_name(list[i].kind)
          << " overlaps the " << trace_kind_name(list[i - 1].kind) << " before it";
    }
  }
}

// The event of `kind` for one chunk (exactly one expected).
const TraceEvent* chunk_event(const Events& events, TraceKind kind, size_t block, size_t tensor, size_t chunk) {
  const TraceEvent* found = nullptr;
  for (const TraceEvent& event : events) {
    if (event.kind == kind && event.block == block && event.tensor == static_cast<int32_t>(tensor) &&
        event.chunk == static_cast<int32_t>(chunk)) {
      EXPECT_EQ(found, nullptr) << trace_kind_name(kind) << " recorded twice for tensor " << tensor << " chunk "
                                << chunk;
      found = &event;
    }
  }
  return found;
}

class TraceEngineTest : public ::testing::Test {
 protected:
  void write(const std::vector<TestBlock>& blocks, int compression_level, uint64_t chunk_size = 4096) {
    storage_ = std::make_unique<StorageDirectory>(StorageDirectory::open_or_create(dir_.path()));
    StoreWriteOptions options;
    options.chunk_size = chunk_size;
    options.compression_level = compression_level;
    (void)testing::write_test_model(*storage_, "m", blocks, options);
    store_ = std::make_shared<const StoreReader>(StoreReader::open(*storage_, "m"));
    arena_ = std::make_unique<testing::TestArena>(total_slot_bytes());
  }

  [[nodiscard]] uint64_t total_slot_bytes() const {
    uint64_t total = 0;
    for (const auto& block : store_->manifest().blocks) total += block.slot_size;
    return total;
  }

  [[nodiscard]] size_t block_count() const { return store_->manifest().blocks.size(); }

  [[nodiscard]] Config config(BackendKind backend = BackendKind::kPread) const {
    Config c;
    c.backend = backend;
    c.direct_io = DirectIoMode::kOff;
    c.num_io_threads = 2;
    c.queue_depth = 4;
    c.prefetch = PrefetchStrategy::kNone;
    return c;
  }

  static void load_every_block(Engine& engine, size_t count) {
    for (size_t b = 0; b < count; ++b) {
      Ticket ticket = engine.acquire(b);
      ticket.wait();
      engine.release(b);
    }
  }

  // Calls `check(tensor index, chunk index within the tensor, chunk record)` for every chunk of `block`.
  template <typename Check>
  void for_each_chunk(size_t block, Check check) const {
    const Manifest& manifest = store_->manifest();
    const BlockRecord& record = manifest.blocks[block];
    for (size_t t = record.first_tensor; t < record.first_tensor + record.tensor_count; ++t) {
      for (size_t c = 0; c < manifest.tensors[t].chunk_count; ++c) {
        check(t, c, manifest.chunks[manifest.tensors[t].first_chunk + c]);
      }
    }
  }

  TempDir dir_;
  std::unique_ptr<StorageDirectory> storage_;
  std::shared_ptr<const StoreReader> store_;
  std::unique_ptr<testing::TestArena> arena_;
};

TEST_F(TraceEngineTest, OffMeansNoEvents) {
  write(testing::sample_model(3), 5);
  testing::FaultPlan plan;
  plan.max_delay_us = 200;
  plan.reorder = true;
  Engine engine(store_, arena_->span(), config(), testing::make_fault_backend(plan, 2),
                std::make_unique<testing::RecordingTransfer>());
  EXPECT_FALSE(engine.tracing());
  load_every_block(engine, block_count());
  const TraceBatch batch = engine.drain_trace();
  EXPECT_TRUE(batch.events.empty());
  EXPECT_EQ(batch.dropped, 0u);
  EXPECT_GT(engine.stats().bytes_read, 0u);  // the blocks were loaded, just not traced
}

// Compressed chunks through a transfer stage, on a disk that delays, shortens and reorders reads: every kind of
// chunk event, for every chunk, in causal order, with bytes that add up to the statistics.
TEST_F(TraceEngineTest, EveryChunkIsReadVerifiedDecodedAndTransferred) {
  write(testing::sample_model(5), 5);
  testing::FaultPlan plan;
  plan.max_delay_us = 300;
  plan.short_read_probability = 0.2;
  plan.reorder = true;
  const Config c = config();
  Engine engine(store_, arena_->span(), c, testing::make_fault_backend(plan, 2),
                std::make_unique<testing::RecordingTransfer>());
  engine.enable_tracing();
  EXPECT_TRUE(engine.tracing());
  load_every_block(engine, block_count());
  const TraceBatch batch = engine.drain_trace();
  EXPECT_EQ(batch.dropped, 0u);
  const Events& events = batch.events;
  expect_well_formed(events);
  const StatsSnapshot stats = engine.stats();
  size_t compressed_chunks = 0;
  for (size_t b = 0; b < block_count(); ++b) {
    SCOPED_TRACE("block " + store_->manifest().blocks[b].name);
    const Events reads = of_kind(events, TraceKind::kRead, b);
    ASSERT_FALSE(reads.empty());
    EXPECT_EQ(total_bytes(reads), stats.blocks[b].bytes_read);
    uint64_t raw_bytes = 0;
    for_each_chunk(b, [&](size_t t, size_t ch, const ChunkRecord& chunk) {
      raw_bytes += chunk.raw_size;
      const TraceEvent* read = chunk_event(events, TraceKind::kRead, b, t, ch);
      const TraceEvent* verify = chunk_event(events, TraceKind::kVerify, b, t, ch);
      const TraceEvent* decode = chunk_event(events, TraceKind::kDecompress, b, t, ch);
      const TraceEvent* copy = chunk_event(events, TraceKind::kTransfer, b, t, ch);
      ASSERT_NE(read, nullptr);
      ASSERT_NE(verify, nullptr);
      ASSERT_NE(copy, nullptr);
      EXPECT_EQ(read->bytes, chunk.stored_size);
      EXPECT_EQ(read->lane.kind, TraceLaneKind::kIo);
      EXPECT_LT(read->lane.index, c.queue_depth);
      EXPECT_EQ(verify->bytes, chunk.stored_size);
      EXPECT_EQ(verify->lane.kind, TraceLaneKind::kWorker);
      EXPECT_LT(verify->lane.index, c.num_io_threads);
      EXPECT_LE(read->end_ns, verify->start_ns);  // each stage starts after the one before it ended
      const TraceEvent* before_copy = verify;
      if (chunk.codec == Codec::kRaw) {
        EXPECT_EQ(decode, nullptr);
      } else {
        ++compressed_chunks;
        ASSERT_NE(decode, nullptr);
        EXPECT_EQ(decode->bytes, chunk.raw_size);
        EXPECT_EQ(decode->lane.kind, TraceLaneKind::kWorker);
        EXPECT_LE(verify->end_ns, decode->start_ns);
        before_copy = decode;
      }
      EXPECT_EQ(copy->bytes, chunk.raw_size);
      EXPECT_LE(before_copy->end_ns, copy->start_ns);
    });
    const Events transfers = of_kind(events, TraceKind::kTransfer, b);
    EXPECT_EQ(total_bytes(transfers), raw_bytes);  // the block finish carries no bytes of its own
    const auto finishes = std::count_if(transfers.begin(), transfers.end(),
                                        [](const TraceEvent& e) { return e.chunk == -1 && e.tensor == -1; });
    EXPECT_EQ(finishes, 1);
  }
  EXPECT_GT(compressed_chunks, 0u) << "the sample model should have compressible chunks";
  EXPECT_EQ(total_bytes([&] {
              Events all;
              for (const TraceEvent& e : events) {
                if (e.kind == TraceKind::kRead) all.push_back(e);
              }
              return all;
            }()),
            stats.bytes_read);
}

// Compressed chunks on the host: decoded straight into the slot, so there is nothing to transfer.
TEST_F(TraceEngineTest, CompressedChunksOnTheHostDecodeIntoTheSlot) {
  write(testing::sample_model(15), 5);
  Engine engine(store_, arena_->span(), config());
  engine.enable_tracing();
  load_every_block(engine, block_count());
  const Events events = engine.drain_trace().events;
  expect_well_formed(events);
  const StatsSnapshot stats = engine.stats();
  uint64_t decoded = 0;
  for (size_t b = 0; b < block_count(); ++b) {
    SCOPED_TRACE("block " + store_->manifest().blocks[b].name);
    EXPECT_EQ(total_bytes(of_kind(events, TraceKind::kRead, b)), stats.blocks[b].bytes_read);
    EXPECT_TRUE(of_kind(events, TraceKind::kTransfer, b).empty());
    for_each_chunk(b, [&](size_t t, size_t ch, const ChunkRecord& chunk) {
      const TraceEvent* verify = chunk_event(events, TraceKind::kVerify, b, t, ch);
      const TraceEvent* decode = chunk_event(events, TraceKind::kDecompress, b, t, ch);
      ASSERT_NE(verify, nullptr);
      if (chunk.codec == Codec::kRaw) {
        EXPECT_EQ(decode, nullptr);
        return;
      }
      ASSERT_NE(decode, nullptr);
      EXPECT_EQ(decode->bytes, chunk.raw_size);
      EXPECT_LE(verify->end_ns, decode->start_ns);
      decoded += chunk.raw_size;
    });
  }
  EXPECT_GT(decoded, 0u);
}

// Raw blocks on the host: a few large region reads straight into the slot, then one in-place verify per chunk.
TEST_F(TraceEngineTest, RawBlocksAreRegionReadsThenVerifiedInPlace) {
  write(testing::sample_model(7), 0);
  Engine engine(store_, arena_->span(), config());
  engine.enable_tracing();
  load_every_block(engine, block_count());
  const Events events = engine.drain_trace().events;
  expect_well_formed(events);
  const StatsSnapshot stats = engine.stats();
  for (size_t b = 0; b < block_count(); ++b) {
    SCOPED_TRACE("block " + store_->manifest().blocks[b].name);
    const Events reads = of_kind(events, TraceKind::kRead, b);
    ASSERT_FALSE(reads.empty());
    EXPECT_EQ(total_bytes(reads), stats.blocks[b].bytes_read);
    uint64_t first_read_end = UINT64_MAX;
    for (const TraceEvent& read : reads) {
      EXPECT_EQ(read.lane.kind, TraceLaneKind::kIo);
      EXPECT_EQ(read.chunk, -1);  // a region read covers parts of several chunks
      first_read_end = std::min(first_read_end, read.end_ns);
    }
    uint64_t stored = 0;
    for_each_chunk(b, [&](size_t t, size_t ch, const ChunkRecord& chunk) {
      stored += chunk.stored_size;
      const TraceEvent* verify = chunk_event(events, TraceKind::kVerify, b, t, ch);
      ASSERT_NE(verify, nullptr);
      EXPECT_EQ(verify->bytes, chunk.stored_size);
      EXPECT_GE(verify->start_ns, first_read_end);  // no chunk is verified before some of its bytes arrived
    });
    EXPECT_EQ(total_bytes(of_kind(events, TraceKind::kVerify, b)), stored);
    EXPECT_TRUE(of_kind(events, TraceKind::kDecompress, b).empty());
    EXPECT_TRUE(of_kind(events, TraceKind::kTransfer, b).empty());  // host slots: nothing to transfer
  }
}

// Mapped blocks are not read: their "read" is the prefault of each chunk, on the worker that verifies it next.
TEST_F(TraceEngineTest, MappedBlocksPrefaultEachChunkOnAWorker) {
  write(testing::sample_model(9), 0);
  Engine engine(store_, arena_->span(), config(BackendKind::kMmap));
  ASSERT_EQ(engine.backend_name(), "mmap");
  engine.enable_tracing();
  load_every_block(engine, block_count());
  const Events events = engine.drain_trace().events;
  expect_well_formed(events);
  for (size_t b = 0; b < block_count(); ++b) {
    SCOPED_TRACE("block " + store_->manifest().blocks[b].name);
    uint64_t stored = 0;
    for_each_chunk(b, [&](size_t t, size_t ch, const ChunkRecord& chunk) {
      stored += chunk.stored_size;
      const TraceEvent* read = chunk_event(events, TraceKind::kRead, b, t, ch);
      const TraceEvent* verify = chunk_event(events, TraceKind::kVerify, b, t, ch);
      ASSERT_NE(read, nullptr);
      ASSERT_NE(verify, nullptr);
      EXPECT_EQ(read->lane.kind, TraceLaneKind::kWorker);
      EXPECT_EQ(read->lane.index, verify->lane.index);
      EXPECT_LE(read->end_ns, verify->start_ns);
    });
    EXPECT_EQ(total_bytes(of_kind(events, TraceKind::kRead, b)), stored);
  }
}

// A caller that waits for its block is a stall on its own thread's lane, with the statistics' exact wait time.
TEST_F(TraceEngineTest, WaitingCallerIsAStallOnItsThread) {
  write(testing::sample_model(11), 0);
  auto gated = std::make_unique<GatedBackend>();
  GatedBackend* gate = gated.get();
  Engine engine(store_, arena_->span(), config(), std::move(gated));
  engine.enable_tracing();
  Ticket ticket = engine.acquire(0);
  std::thread opener([gate] {
    // No read completes before this, so the caller, inside wait() well before, blocks there (only a caller
    // descheduled for the whole 100 ms would miss it, and then this test fails rather than passes wrongly).
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    gate->open();
  });
  ticket.wait();
  opener.join();
  engine.release(0);
  load_every_block(engine, block_count());  // the gate is open now: the rest may or may not stall
  const Events events = engine.drain_trace().events;
  expect_well_formed(events);
  const StatsSnapshot stats = engine.stats();
  const Events first = of_kind(events, TraceKind::kStall, 0);
  ASSERT_EQ(first.size(), 1u) << "block 0's caller waited for reads held back by the gate";
  EXPECT_EQ(first[0].lane.kind, TraceLaneKind::kCaller);
  EXPECT_EQ(first[0].lane.index, os_thread_id());
  const Events reads = of_kind(events, TraceKind::kRead, 0);
  ASSERT_FALSE(reads.empty());
  EXPECT_GE(first[0].start_ns, reads.front().start_ns);
  for (size_t b = 0; b < block_count(); ++b) {
    const Events stalls = of_kind(events, TraceKind::kStall, b);
    uint64_t waited = 0;
    for (const TraceEvent& stall : stalls) waited += stall.end_ns - stall.start_ns;
    EXPECT_EQ(waited, stats.blocks[b].wait_ns) << "block " << b;
  }
}

// The engine's buffer stays within its bound, counts the rest, and nothing is recorded once tracing is off.
TEST_F(TraceEngineTest, BoundedBufferAndDisable) {
  write(testing::sample_model(13), 5);
  Engine engine(store_, arena_->span(), config());
  EXPECT_THROW(engine.enable_tracing(0), ConfigError);
  engine.enable_tracing(4);
  load_every_block(engine, 1);
  engine.disable_tracing();
  EXPECT_FALSE(engine.tracing());
  load_every_block(engine, block_count());  // blocks 1.. load untraced
  const TraceBatch batch = engine.drain_trace();
  EXPECT_EQ(batch.events.size(), 4u);
  EXPECT_GT(batch.dropped, 0u);
  for (const TraceEvent& event : batch.events) EXPECT_EQ(event.block, 0u);
}

}  // namespace
}  // namespace tensorstream
