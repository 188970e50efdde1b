#include "tensorstream/engine/engine.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "support/fault_backend.hpp"
#include "support/recording_transfer.hpp"
#include "support/store_fixture.hpp"
#include "support/test_arena.hpp"
#include "support/temp_dir.hpp"
#include "tensorstream/cuda/cuda_api.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/io/direct_io.hpp"
#include "tensorstream/residency/residency_manager.hpp"

namespace tensorstream {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;
using Arena = testing::TestArena;
using testing::RecordingTransfer;
using testing::TestBlock;


// N blocks of one 60000-byte tensor each (slot size 61440): equal blocks for the cyclic-order tests.
std::vector<TestBlock> equal_blocks(size_t count, uint64_t seed) {
  std::vector<TestBlock> blocks;
  for (size_t i = 0; i < count; ++i) {
    const std::string name = "layers." + std::to_string(i);
    blocks.push_back({name, {{name + ".w", Dtype::kBfloat16, {30000}, testing::normal_bf16_bytes(30000, seed + i)}}});
  }
  return blocks;
}

class EngineTest : public ::testing::Test {
 protected:
  void write(const std::vector<TestBlock>& blocks, int compression_level = 0, uint64_t chunk_size = 16384) {
    blocks_ = blocks;
    storage_ = std::make_unique<StorageDirectory>(StorageDirectory::open_or_create(dir_.path()));
    StoreWriteOptions options;
    options.chunk_size = chunk_size;
    options.compression_level = compression_level;
    options.mode = PublishMode::kReplace;  // tests rewrite "m" with other content
    (void)testing::write_test_model(*storage_, "m", blocks, options);
    store_ = std::make_shared<const StoreReader>(StoreReader::open(*storage_, "m"));
  }

  uint64_t total_slot_bytes() const {
    uint64_t total = 0;
    for (const auto& block : store_->manifest().blocks) total += block.slot_size;
    return total;
  }

  // Checks the bytes of every tensor of `block` in `data` against what was written.
  void expect_block_bytes(size_t block, std::span<const std::byte> data) const {
    const Manifest& manifest = store_->manifest();
    for (const TensorRecord& tensor : manifest.tensors_of(manifest.blocks[block])) {
      const auto& expected = find_expected(tensor.name);
      ASSERT_GE(data.size(), tensor.slot_offset + tensor.nbytes);
      EXPECT_TRUE(std::equal(expected.begin(), expected.end(), data.begin() + tensor.slot_offset)) << tensor.name;
    }
  }

  const std::vector<std::byte>& find_expected(const std::string& name) const {
    for (const auto& block : blocks_) {
      for (const auto& tensor : block.tensors) {
        if (tensor.name == name) return tensor.bytes;
      }
    }
    throw std::runtime_error("no tensor " + name);
  }

  Config config(PrefetchStrategy prefetch = PrefetchStrategy::kNone) const {
    Config c;
    c.backend = BackendKind::kPread;
    c.direct_io = DirectIoMode::kOff;
    c.num_io_threads = 2;
    c.prefetch = prefetch;
    return c;
  }

  TempDir dir_;
  std::unique_ptr<StorageDirectory> storage_;
  std::shared_ptr<const StoreReader> store_;
  std::vector<TestBlock> blocks_;
};

TEST_F(EngineTest, LoadsEveryBlockRawAndCompressed) {
  for (int level : {0, 1, 5}) {
    write(testing::sample_model(static_cast<uint64_t>(level) + 1), level, 4096);
    Arena arena(total_slot_bytes());
    Engine engine(store_, arena.span(), config());
    for (size_t b = 0; b < store_->manifest().blocks.size(); ++b) {
      Ticket ticket = engine.acquire(b);
      ticket.wait();
      expect_block_bytes(b, ticket.data());
      engine.release(b);
    }
    const StatsSnapshot stats = engine.stats();
    EXPECT_EQ(stats.misses, store_->manifest().blocks.size()) << "level " << level;
    EXPECT_EQ(stats.bytes_delivered, [&] {
      uint64_t raw = 0;
      for (const auto& t : store_->manifest().tensors) raw += t.nbytes;
      return raw;
    }()) << "level " << level;
    // Everything fits: a second pass is all hits and reads nothing.
    engine.reset_stats();
    for (size_t b = 0; b < store_->manifest().blocks.size(); ++b) {
      engine.acquire(b).wait();
      engine.release(b);
    }
    EXPECT_EQ(engine.stats().bytes_read, 0u);
    EXPECT_EQ(engine.stats().hits, store_->manifest().blocks.size());
  }
}

// Tensors with their own 4 KiB chunks in a model of 16 KiB chunks: every load plan (region reads, direct or not;
// mapped views; staged chunks into host or device slots) puts each chunk at its tensor's own offsets.
TEST_F(EngineTest, LoadsTensorsWithTheirOwnChunkSize) {
  auto blocks = testing::sample_model(41);
  for (auto& block : blocks) {
    for (auto& tensor : block.tensors) {
      if (tensor.bytes.size() > 4096) tensor.chunk_size = 4096;
    }
  }
  for (const int level : {0, 5}) {
    write(blocks, level, 16384);
    ASSERT_EQ(store_->manifest().tensors[0].chunk_count, 3u);  // embed.weight: 10240 bytes
    for (const BackendKind backend : {BackendKind::kPread, BackendKind::kMmap}) {
      for (const bool device : {false, true}) {
        if (device && backend == BackendKind::kMmap) continue;  // a mapped view is host memory
        SCOPED_TRACE("level " + std::to_string(level) + (backend == BackendKind::kMmap ? " mmap" : " pread") +
                     (device ? " device" : " host"));
        Config c = config();
        c.backend = backend;
        c.direct_io = backend == BackendKind::kPread ? DirectIoMode::kOn : DirectIoMode::kOff;
        Arena arena(total_slot_bytes());
        std::unique_ptr<RecordingTransfer> transfer = device ? std::make_unique<RecordingTransfer>() : nullptr;
        Engine engine(store_, arena.span(), c, nullptr, std::move(transfer));
        for (size_t b = 0; b < store_->manifest().blocks.size(); ++b) {
          Ticket ticket = engine.acquire(b);
          ticket.wait();
          expect_block_bytes(b, ticket.data());
          engine.release(b);
        }
      }
    }
  }
}

// A compressed block has far more chunks than staging buffers (queue depth 1 + 1 worker = 2): its reads wait for
// buffers to come back instead of holding one each, and every byte still arrives; direct or buffered alike.
TEST_F(EngineTest, StagedReadsShareABoundedPool) {
  std::vector<TestBlock> blocks = {{"big", {{"big.w", Dtype::kBfloat16, {200000}, testing::normal_bf16_bytes(200000, 7)}}}};
  write(blocks, 5, 4096);
  ASSERT_FALSE(store_->manifest().blocks[0].all_raw);
  for (const DirectIoMode direct : {DirectIoMode::kOff, DirectIoMode::kOn}) {
    if (direct == DirectIoMode::kOn && !direct_io_supported(store_->data_path().c_str())) continue;
    Arena arena(total_slot_bytes());
    Config c = config();
    c.queue_depth = 1;
    c.num_io_threads = 1;
    c.direct_io = direct;
    Engine engine(store_, arena.span(), c, testing::make_fault_backend({.max_delay_us = 20, .reorder = true}, 2));
    Ticket ticket = engine.acquire(0);
    ticket.wait();
    expect_block_bytes(0, ticket.data());
    engine.release(0);
    const StatsSnapshot stats = engine.stats();
    const uint64_t buffer = align_up(4096, 4096) + 2 * 4096;
    EXPECT_LE(stats.staging_bytes, 2 * buffer) << "the pool is bounded by queue depth + workers";
    EXPECT_GT(stats.staging_peak_in_use_bytes, 0u);
    uint64_t stored = 0;
    for (const ChunkRecord& chunk : store_->manifest().chunks) stored += chunk.stored_size;
    EXPECT_EQ(stats.bytes_read, stored) << "bytes_read counts stored bytes, not a direct read's 4 KiB rounding";
  }
}

TEST_F(EngineTest, FaultyDiskStillDeliversExactBytes) {
  write(equal_blocks(6, 3), 0, 4096);
  testing::FaultPlan plan;
  plan.short_read_probability = 0.3;
  plan.eintr_probability = 0.2;
  plan.max_delay_us = 200;
  plan.reorder = true;
  Arena arena(total_slot_bytes());
  Engine engine(store_, arena.span(), config(), testing::make_fault_backend(plan, 3));
  for (size_t b = 0; b < 6; ++b) {
    Ticket ticket = engine.acquire(b);
    ticket.wait();
    expect_block_bytes(b, ticket.data());
    engine.release(b);
  }
}

TEST_F(EngineTest, IoErrorOnOneChunkFailsThatBlockOnlyAndEngineStaysUsable) {
  write(equal_blocks(4, 5), 0, 4096);
  const BlockRecord& bad = store_->manifest().blocks[2];
  testing::FaultPlan plan;
  plan.eio_offset = bad.offset + 5000;
  Arena arena(total_slot_bytes());
  Engine engine(store_, arena.span(), config(), testing::make_fault_backend(plan, 2));
  for (int attempt = 0; attempt < 2; ++attempt) {  // the failure is reported again on retry, never cached as data
    Ticket ticket = engine.acquire(2);
    try {
      ticket.wait();
      FAIL() << "expected IoError";
    } catch (const IoError& error) {
      EXPECT_EQ(error.errno_value(), EIO);
      EXPECT_EQ(error.path(), store_->data_path());
      EXPECT_NE(std::string(error.what()).find("layers.2"), std::string::npos) << error.what();
    }
    engine.release(2);
  }
  for (size_t b : {0, 1, 3}) {
    Ticket ticket = engine.acquire(b);
    ticket.wait();
    expect_block_bytes(b, ticket.data());
    engine.release(b);
  }
  EXPECT_GE(engine.stats().io_errors, 2u);
}

TEST_F(EngineTest, CorruptChunkIsACorruptionErrorNeverData) {
  for (int level : {0, 5}) {
    write(equal_blocks(3, 7), level, 4096);
    const ChunkRecord& chunk = store_->manifest().chunks[store_->manifest().tensors[1].first_chunk + 2];
    testing::flip_bit(store_->data_path(), chunk.offset + 7, 2);
    Arena arena(total_slot_bytes());
    Engine engine(store_, arena.span(), config());
    Ticket ticket = engine.acquire(1);
    try {
      ticket.wait();
      FAIL() << "expected CorruptionError at level " << level;
    } catch (const CorruptionError& error) {
      EXPECT_EQ(error.site().tensor, "layers.1.w");
      EXPECT_EQ(error.site().chunk, 2u);
    }
    engine.release(1);
    EXPECT_EQ(engine.stats().checksum_failures, 1u);
    engine.acquire(0).wait();
    engine.release(0);
  }
}

// Loads per pass that the residency policy decides for `n` equal blocks of `slot` bytes under `budget`, driven the
// way the engine drives it: demand accesses in order, the learned order handed over when the second pass starts.
std::vector<uint64_t> policy_loads_per_pass(size_t n, uint64_t slot, uint64_t budget, int passes) {
  ResidencyManager policy(std::vector<uint64_t>(n, slot), budget, budget, plan_for(MemoryPressureMode::kBalanced));
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::vector<uint64_t> loads;
  for (int pass = 0; pass < passes; ++pass) {
    uint64_t count = 0;
    for (size_t b = 0; b < n; ++b) {
      const auto decision = policy.acquire(b);
      if (pass == 1 && b == 0) policy.set_order(order);
      if (decision.action == ResidencyManager::Action::kLoad) {
        ++count;
        (void)policy.load_finished(b, true);
      }
      (void)policy.release(b);
    }
    loads.push_back(count);
  }
  return loads;
}

// The promise of the residency policy: with room for K of N equal blocks and a ring of R streaming slots, a pass
// after warm-up reads at most N - (K - R) blocks (exactly that without a learned order, fewer when furthest-next-use
// eviction helps), never fewer than N - K, and exactly what the policy decides: the engine adds no read of its own.
TEST_F(EngineTest, CyclicPassesReadExactlyWhatThePolicyPromises) {
  const size_t n = 8;
  const int passes = 5;
  write(equal_blocks(n, 11), 0, 16384);
  const uint64_t slot = store_->manifest().blocks[0].slot_size;
  const uint64_t block_bytes = store_->manifest().blocks[0].end - store_->manifest().blocks[0].offset;
  const uint64_t read_per_load = align_up(block_bytes, 4096);
  const uint64_t ring = plan_for(MemoryPressureMode::kBalanced).ring_slots;
  for (const PrefetchStrategy prefetch : {PrefetchStrategy::kNone, PrefetchStrategy::kNextLayer, PrefetchStrategy::kAdaptive}) {
    for (size_t k = ring; k <= n + 1; ++k) {
      Arena arena(slot * k);
      Engine engine(store_, arena.span(), config(prefetch));
      const std::vector<uint64_t> promised = policy_loads_per_pass(n, slot, slot * k, passes);
      std::vector<uint64_t> measured;
      for (int pass = 0; pass < passes; ++pass) {
        // Prefetches issued at the end of a pass must land in that pass's count: wait for them first.
        while (engine.stats().in_flight_bytes > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        engine.reset_stats();
        for (size_t b = 0; b < n; ++b) {
          Ticket ticket = engine.acquire(b);
          ticket.wait();
          expect_block_bytes(b, ticket.data());
          engine.release(b);
        }
        while (engine.stats().in_flight_bytes > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        ASSERT_EQ(engine.stats().bytes_read % read_per_load, 0u);
        measured.push_back(engine.stats().bytes_read / read_per_load);
      }
      const std::string where = "k=" + std::to_string(k) + " prefetch=" + std::string(prefetch_name(prefetch));
      const uint64_t upper = k >= n ? 0 : n - (k - ring);
      const uint64_t lower = k >= n ? 0 : n - k;
      // Demand loads only: the engine reads exactly what the policy decides, pass by pass.
      if (prefetch == PrefetchStrategy::kNone) {
        for (int pass = 0; pass < passes; ++pass) EXPECT_EQ(measured[pass], promised[pass]) << where << " pass " << pass;
      }
      // With prefetch, blocks of pass p+1 are read during pass p, up to the lookahead: a window of passes can hold
      // that many reads that belong to the pass after it (more when the adaptive lookahead grows at a boundary),
      // and miss as many that were done before it. Beyond that slack the same bounds hold.
      const uint64_t slack = plan_for(MemoryPressureMode::kBalanced).max_lookahead;
      uint64_t steady = 0;
      for (int pass = 2; pass < passes; ++pass) steady += measured[pass];
      EXPECT_LE(steady, upper * (passes - 2) + slack) << where;
      EXPECT_GE(steady + slack, lower * (passes - 2)) << where;
    }
  }
}

TEST_F(EngineTest, PrefetchTurnsMissesIntoPrefetchHits) {
  write(equal_blocks(8, 13), 0, 16384);
  const uint64_t slot = store_->manifest().blocks[0].slot_size;
  Arena arena(slot * 5);
  Engine engine(store_, arena.span(), config(PrefetchStrategy::kNextLayer));
  for (int pass = 0; pass < 3; ++pass) {
    for (size_t b = 0; b < 8; ++b) {
      Ticket ticket = engine.acquire(b);
      ticket.wait();
      expect_block_bytes(b, ticket.data());
      engine.release(b);
    }
  }
  const StatsSnapshot stats = engine.stats();
  EXPECT_GT(stats.prefetches_issued, 0u);
  EXPECT_GT(stats.prefetch_hits, 0u);
  EXPECT_LE(stats.resident_bytes + stats.in_flight_bytes, engine.budget_bytes());
}

TEST_F(EngineTest, EightThreadsAcquireAndReleaseConcurrently) {
  write(equal_blocks(10, 17), 1, 8192);
  const uint64_t slot = store_->manifest().blocks[0].slot_size;
  Arena arena(slot * 9);  // room for every thread's pin at once
  Engine engine(store_, arena.span(), config(PrefetchStrategy::kAdaptive));
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      for (int i = 0; i < 60; ++i) {
        const size_t b = rng() % 10;
        Ticket ticket = engine.acquire(b);
        ticket.wait();
        const Manifest& manifest = store_->manifest();
        const TensorRecord& tensor = manifest.tensors[manifest.blocks[b].first_tensor];
        const auto& expected = find_expected(tensor.name);
        if (!std::equal(expected.begin(), expected.end(), ticket.data().begin() + tensor.slot_offset)) failures++;
        engine.release(b);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_LE(engine.stats().resident_bytes, engine.budget_bytes());
}

TEST_F(EngineTest, ShutsDownCleanlyWithReadsInFlight) {
  write(equal_blocks(8, 19), 0, 4096);
  testing::FaultPlan plan;
  plan.max_delay_us = 3000;
  Arena arena(total_slot_bytes());
  {
    Engine engine(store_, arena.span(), config(), testing::make_fault_backend(plan, 2));
    for (size_t b = 0; b < 8; ++b) engine.prefetch(b);
    Ticket first = engine.acquire(0);  // not waited for
  }  // destruction must neither hang nor leak (ASan)
  SUCCEED();
}

TEST_F(EngineTest, BudgetShrinksAtRunTime) {
  write(equal_blocks(6, 23), 0, 16384);
  const uint64_t slot = store_->manifest().blocks[0].slot_size;
  Arena arena(slot * 6);
  Engine engine(store_, arena.span(), config());
  std::vector<size_t> evicted;
  engine.set_eviction_callback([&](size_t b) { evicted.push_back(b); });
  for (size_t b = 0; b < 6; ++b) {
    engine.acquire(b).wait();
    engine.release(b);
  }
  EXPECT_EQ(engine.stats().resident_bytes, slot * 6);
  engine.set_budget(slot * 3);
  EXPECT_EQ(engine.budget_bytes(), slot * 3);
  EXPECT_LE(engine.stats().resident_bytes, slot * 3);
  EXPECT_EQ(evicted.size(), 3u);
  EXPECT_THROW(engine.set_budget(slot / 2), ConfigError);  // smaller than one block
  for (size_t b = 0; b < 6; ++b) {
    Ticket ticket = engine.acquire(b);
    ticket.wait();
    expect_block_bytes(b, ticket.data());
    engine.release(b);
  }
}

TEST_F(EngineTest, NonHostTransferReceivesEveryByte) {
  write(testing::sample_model(29), 5, 4096);
  Arena arena(total_slot_bytes());
  auto transfer = std::make_unique<RecordingTransfer>();
  RecordingTransfer* recording = transfer.get();
  Engine engine(store_, arena.span(), config(), nullptr, std::move(transfer));
  uint64_t raw = 0;
  for (size_t b = 0; b < store_->manifest().blocks.size(); ++b) {
    Ticket ticket = engine.acquire(b);
    ticket.wait();
    expect_block_bytes(b, ticket.data());
    engine.release(b);
  }
  for (const auto& tensor : store_->manifest().tensors) raw += tensor.nbytes;
  EXPECT_EQ(recording->copied.load(), raw);
  EXPECT_EQ(recording->ready_events.load(), store_->manifest().blocks.size());
}

TEST_F(EngineTest, MmapBackendGivesZeroCopyViews) {
  write(equal_blocks(3, 31), 0, 16384);
  Arena arena(total_slot_bytes());
  Config c = config();
  c.backend = BackendKind::kMmap;
  Engine engine(store_, arena.span(), c);
  EXPECT_EQ(engine.backend_name(), "mmap");
  for (size_t b = 0; b < 3; ++b) {
    Ticket ticket = engine.acquire(b);
    ticket.wait();
    expect_block_bytes(b, ticket.data());
    const auto* begin = arena.span().data();
    const bool inside_arena = ticket.data().data() >= begin && ticket.data().data() < begin + arena.span().size();
    EXPECT_FALSE(inside_arena) << "block " << b << " was copied instead of mapped";
    engine.release(b);
  }
  // Every chunk was verified before its block was declared ready; mapped loads count as I/O time.
  EXPECT_EQ(engine.stats().bytes_delivered, 3u * 60000u);
  EXPECT_GT(engine.stats().io_throughput_bytes_per_s(), 0.0);
}

// A mapped block's pages count in the process's RSS from the moment they are touched. The block an acquire evicts
// must therefore leave (eviction callback, then MADV_DONTNEED) before the new block's verification faults its pages
// in; the other order held one extra block in RSS for a moment (0.3 GB on a 3.2 GB Llama).
TEST_F(EngineTest, MappedLoadsStartAfterTheEvictionsTheyCaused) {
  write(equal_blocks(4, 43), 0, 16384);
  const uint64_t slot = store_->manifest().blocks[0].slot_size;
  Arena arena(slot);  // one slot: every acquire evicts the block before
  Config c = config();
  c.backend = BackendKind::kMmap;
  c.prefetch = PrefetchStrategy::kNone;
  Engine engine(store_, arena.span(), c);
  engine.enable_tracing();
  std::vector<std::pair<size_t, uint64_t>> evictions;  // (block, when its callback ran)
  engine.set_eviction_callback([&](size_t block) { evictions.emplace_back(block, trace_now_ns()); });
  for (size_t b = 0; b < 4; ++b) {
    Ticket ticket = engine.acquire(b);
    ticket.wait();
    expect_block_bytes(b, ticket.data());
    engine.release(b);
  }
  ASSERT_EQ(evictions.size(), 3u);
  const TraceBatch trace = engine.drain_trace();
  for (const auto& [evicted, when] : evictions) {
    const size_t next = evicted + 1;
    size_t verifies = 0;
    for (const TraceEvent& event : trace.events) {
      if (event.kind != TraceKind::kVerify || event.block != next) continue;
      ++verifies;
      EXPECT_GE(event.start_ns, when) << "block " << next << " was verified before block " << evicted << " left";
    }
    EXPECT_GT(verifies, 0u) << "block " << next;
  }
}

// AUTO with host slots maps blocks that are already in the page cache (no copy) and reads the others.
TEST_F(EngineTest, AutoMapsWarmBlocksAndReadsColdOnes) {
  write(equal_blocks(4, 41), 0, 16384);
  Arena arena(total_slot_bytes());
  auto inside_arena = [&](const Ticket& ticket) {
    const auto* begin = arena.span().data();
    return ticket.data().data() >= begin && ticket.data().data() < begin + arena.span().size();
  };
  Config c = config();
  c.backend = BackendKind::kAuto;
  c.direct_io = DirectIoMode::kAuto;  // forcing O_DIRECT on or off also turns mapping off
  {
    // Warm: the writer just wrote the file, and a full read leaves it cached.
    (void)testing::read_file_bytes(store_->data_path());
    ASSERT_GE(page_cache_fraction(store_->data_fd(), 0, store_->manifest().data_size), 0.5);
    Engine engine(store_, arena.span(), c);
    for (size_t b = 0; b < 4; ++b) {
      Ticket ticket = engine.acquire(b);
      ticket.wait();
      expect_block_bytes(b, ticket.data());
      EXPECT_FALSE(inside_arena(ticket)) << "warm block " << b << " was copied";
      engine.release(b);
      Ticket hit = engine.acquire(b);  // a hit returns the same view
      EXPECT_EQ(hit.data().data(), ticket.data().data());
      engine.release(b);
    }
  }
  ::posix_fadvise(store_->data_fd(), 0, 0, POSIX_FADV_DONTNEED);
  if (page_cache_fraction(store_->data_fd(), 0, store_->manifest().data_size) >= 0.5) {
    GTEST_SKIP() << "this file system keeps the file cached after POSIX_FADV_DONTNEED (tmpfs?)";
  }
  if (!direct_io_supported(store_->data_path().c_str())) GTEST_SKIP() << "no O_DIRECT on this file system";
  c.direct_io = DirectIoMode::kOn;  // buffered reads would let readahead warm the next blocks
  Engine engine(store_, arena.span(), c);
  // Forced O_DIRECT never maps, cold or warm; what AUTO does for cold blocks is the same read into the slot.
  for (size_t b = 0; b < 4; ++b) {
    Ticket ticket = engine.acquire(b);
    ticket.wait();
    expect_block_bytes(b, ticket.data());
    EXPECT_TRUE(inside_arena(ticket)) << "cold block " << b << " should be read into its slot";
    engine.release(b);
  }
}

// A store block outside the engine's list (offload's "(resident)" block, here the first and larger than the whole
// arena) is invisible: the budget is sized without it, no prefetch strategy ever loads it, acquiring it is refused,
// and every index the engine reports is still a store index.
TEST_F(EngineTest, StreamsOnlyTheBlocksItIsGiven) {
  std::vector<TestBlock> blocks = equal_blocks(4, 41);
  blocks.insert(blocks.begin(), TestBlock{"(resident)", {{"big", Dtype::kBfloat16, {200000},
                                                          testing::normal_bf16_bytes(200000, 40)}}});
  write(blocks, 0, 16384);
  const uint64_t slot = store_->manifest().blocks[1].slot_size;
  ASSERT_GT(store_->manifest().blocks[0].slot_size, 4 * slot);
  const std::vector<size_t> layers = {1, 2, 3, 4};
  Arena arena(slot * 3);
  EXPECT_THROW(Engine(store_, arena.span(), config()), ConfigError);  // with it, not even one block fits
  EXPECT_THROW(Engine(store_, arena.span(), config(), nullptr, nullptr, std::vector<size_t>{1, 5}), ConfigError);
  EXPECT_THROW(Engine(store_, arena.span(), config(), nullptr, nullptr, std::vector<size_t>{1, 1}), ConfigError);
  for (const PrefetchStrategy prefetch :
       {PrefetchStrategy::kNone, PrefetchStrategy::kNextLayer, PrefetchStrategy::kAdaptive}) {
    Engine engine(store_, arena.span(), config(prefetch), nullptr, nullptr, layers);
    std::vector<size_t> evicted;
    std::mutex evicted_mutex;
    engine.set_eviction_callback([&](size_t block) {
      std::lock_guard lock(evicted_mutex);
      evicted.push_back(block);
    });
    for (int pass = 0; pass < 4; ++pass) {
      for (size_t b : layers) {
        Ticket ticket = engine.acquire(b);
        ticket.wait();
        EXPECT_EQ(ticket.block(), b);
        expect_block_bytes(b, ticket.data());
        engine.release(b);
      }
    }
    while (engine.stats().in_flight_bytes > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const std::string where = std::string(prefetch_name(prefetch));
    const StatsSnapshot stats = engine.stats();
    EXPECT_EQ(stats.blocks[0].loads, 0u) << where;
    EXPECT_EQ(stats.blocks[0].bytes_read, 0u) << where;
    EXPECT_GT(stats.blocks[4].loads, 0u) << where;
    EXPECT_LE(stats.resident_bytes + stats.in_flight_bytes, slot * 3) << where;
    EXPECT_THROW((void)engine.acquire(0), ConfigError) << where;
    EXPECT_THROW(engine.prefetch(0), ConfigError) << where;
    {
      std::lock_guard lock(evicted_mutex);
      EXPECT_FALSE(evicted.empty()) << where;
      for (size_t block : evicted) EXPECT_TRUE(block >= 1 && block <= 4) << where << ": evicted " << block;
    }
    if (prefetch == PrefetchStrategy::kAdaptive) EXPECT_EQ(engine.learned_order(), layers);
  }
}

TEST_F(EngineTest, DeviceBackendsRefuseHostSlots) {
  write(equal_blocks(2, 41), 0, 16384);
  Arena arena(total_slot_bytes());
  for (const BackendKind kind : {BackendKind::kCuda, BackendKind::kGpuDirect}) {
    Config c = config();
    c.backend = kind;
    try {  // a host transfer given explicitly
      Engine engine(store_, arena.span(), c, nullptr, make_host_transfer());
      ADD_FAILURE() << backend_name(kind) << " ran with host slots";
    } catch (const ConfigError& error) {
      EXPECT_EQ(error.field(), "backend");
      EXPECT_NE(std::string(error.what()).find("device Transfer"), std::string::npos) << error.what();
    }
  }
  // The default transfer comes from the backend table: on a machine without CUDA, a ConfigError with the reason.
  CudaAvailability found;
  (void)load_cuda(&found);
  if (!found.available) {
    Config c = config();
    c.backend = BackendKind::kCuda;
    try {
      Engine engine(store_, arena.span(), c);
      ADD_FAILURE() << "cuda ran without a CUDA driver";
    } catch (const ConfigError& error) {
      EXPECT_EQ(error.field(), "backend");
      EXPECT_NE(std::string(error.what()).find(found.reason), std::string::npos) << error.what();
    }
  }
  // With a device transfer, 'cuda' reads with the host reader and copies.
  Config c = config();
  c.backend = BackendKind::kCuda;
  Engine engine(store_, arena.span(), c, nullptr, std::make_unique<RecordingTransfer>());
  Ticket ticket = engine.acquire(1);
  ticket.wait();
  expect_block_bytes(1, ticket.data());
  engine.release(1);
}

TEST_F(EngineTest, BadConfigAndBlockIndexAreConfigErrors) {
  write(equal_blocks(2, 37));
  Arena arena(total_slot_bytes());
  Config c = config();
  c.num_io_threads = 0;
  EXPECT_THROW(Engine(store_, arena.span(), c), ConfigError);
  Engine engine(store_, arena.span(), config());
  EXPECT_THROW((void)engine.acquire(2), ConfigError);
  Arena tiny(4096);
  EXPECT_THROW(Engine(store_, tiny.span(), config()), ConfigError);  // cannot hold a single block
}

}  // namespace
}  // namespace tensorstream
