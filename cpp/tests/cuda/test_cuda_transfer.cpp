// CudaTransfer over the CPU double, alone and driving the engine end to end. Device memory is host memory here, so
// a "kernel" (CudaDouble::enqueue) can check what it sees. Each ordering rule is tested twice: kept (the kernels
// see exactly the stored bytes) and broken on purpose by the test itself (they do not), which proves the first
// test can fail.
#include "tensorstream/cuda/cuda_transfer.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "support/fault_backend.hpp"
#include "support/sanitizers.hpp"
#include "support/store_fixture.hpp"
#include "support/temp_dir.hpp"
#include "support/test_arena.hpp"
#include "tensorstream/cuda/cuda_double.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/store/storage_directory.hpp"

namespace tensorstream {
namespace {

using testing::TestBlock;
using testing::Watchdog;

// The "rule broken on purpose" halves race by design (a kernel reads a slot while a copy writes it): that is what
// they show the double detects. Under ThreadSanitizer only the halves that keep the rules run, and there TSan checks
// the engine's ordering too (a missed wait would be a reported race).
using testing::kUnderTsan;
using Arena = testing::TestArena;

std::shared_ptr<CudaDouble> make_double(int latency_us) {
  CudaDoubleOptions options;
  options.copy_latency = std::chrono::microseconds(latency_us);
  options.jitter = true;
  return std::make_shared<CudaDouble>(options);
}

// Makes the device's primary context current on the calling (test) thread, as torch would have.
CuContext use_primary_context(CudaApi& api) {
  EXPECT_EQ(api.cuInit(0), kCudaSuccess);
  CuContext context = nullptr;
  EXPECT_EQ(api.cuDevicePrimaryCtxRetain(&context, 0), kCudaSuccess);
  EXPECT_EQ(api.cuCtxSetCurrent(context), kCudaSuccess);
  return context;
}

TEST(CudaTransfer, CopiesKeepTheirLeaseUntilTheDeviceHasReadIt) {
  const Watchdog dog("CudaTransfer.CopiesKeepTheirLeaseUntilTheDeviceHasReadIt");
  CudaDoubleOptions options;
  options.copy_latency = std::chrono::milliseconds(50);  // no jitter: the copy surely has not run at the check
  const auto api = std::make_shared<CudaDouble>(options);
  CudaTransfer transfer(api, 0);
  EXPECT_EQ(transfer.slot_access(), SlotAccess::kDeviceByCopy);
  const auto pool = StagingPool::create(4096, 1, transfer.staging_allocator());
  EXPECT_TRUE(pool->stats().pinned);
  std::vector<std::byte> slot(8192, std::byte{0});
  StagingLease lease = *pool->try_acquire();
  std::memset(lease.bytes().data(), 7, 4096);
  const std::span<const std::byte> bytes = lease.bytes().subspan(0, 4096);
  std::exception_ptr error;
  ASSERT_EQ(transfer.copy_async(std::move(lease), bytes, slot, 4096, &error), 4096);
  EXPECT_FALSE(pool->try_acquire().has_value()) << "the lease came back before the copy ran";
  transfer.drain();
  EXPECT_EQ(slot[4096], std::byte{7});
  EXPECT_EQ(slot[0], std::byte{0});
  EXPECT_TRUE(pool->try_acquire().has_value());
  EXPECT_EQ(transfer.copies_in_flight(), 0u);
  const TransferStats stats = transfer.stats();
  EXPECT_EQ(stats.copies, 1u);
  EXPECT_EQ(stats.bytes, 4096u);
  EXPECT_GT(stats.busy_ns, 0u) << "a copy was queued for a while";
}

TEST(CudaTransfer, FailuresAreCudaErrorsNamingTheCallAndReturnTheLease) {
  const auto api = make_double(0);
  CudaTransfer transfer(api, 0);
  const auto pool = StagingPool::create(4096, 1);
  std::vector<std::byte> slot(4096);
  api->fail_next("cuMemcpyHtoDAsync", kCudaErrorLaunchFailed);
  std::exception_ptr error;
  StagingLease lease = *pool->try_acquire();
  const auto bytes = lease.bytes();
  EXPECT_LT(transfer.copy_async(std::move(lease), bytes, slot, 0, &error), 0);
  ASSERT_TRUE(error);
  try {
    std::rethrow_exception(error);
  } catch (const CudaError& e) {
    EXPECT_EQ(e.code(), kCudaErrorLaunchFailed);
    EXPECT_NE(std::string(e.what()).find("cuMemcpyHtoDAsync"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(pool->try_acquire().has_value()) << "a copy that was never queued returns its lease at once";
  // A copy past the slot's end is refused before it reaches the driver.
  error = nullptr;
  StagingLease second = *pool->try_acquire();
  const auto too_many = second.bytes();
  EXPECT_LT(transfer.copy_async(std::move(second), too_many, slot, 1, &error), 0);
  EXPECT_TRUE(error);
  api->fail_next("cuEventRecord", kCudaErrorInvalidHandle);
  error = nullptr;
  EXPECT_EQ(transfer.record_ready(&error), nullptr);
  EXPECT_TRUE(error);
  EXPECT_NE(transfer.record_on_stream(0), nullptr) << "0 is the legacy default stream, a stream like any other";
  api->fail_next("cuDevicePrimaryCtxRetain", kCudaErrorOutOfMemory);
  EXPECT_THROW(CudaTransfer(api, 0), CudaError);
  EXPECT_THROW(CudaTransfer(api, 5), CudaError);  // no such device
}

// ---- the engine on the double --------------------------------------------------------------------------------


class EngineOnCuda : public ::testing::Test {
 protected:
  void write(const std::vector<TestBlock>& blocks, int compression_level) {
    blocks_ = blocks;
    storage_ = std::make_unique<StorageDirectory>(StorageDirectory::open_or_create(dir_.path()));
    StoreWriteOptions options;
    options.chunk_size = 16384;
    options.compression_level = compression_level;
    options.mode = PublishMode::kReplace;
    (void)testing::write_test_model(*storage_, "m", blocks, options);
    store_ = std::make_shared<const StoreReader>(StoreReader::open(*storage_, "m"));
  }
  uint64_t slot_bytes(size_t blocks) const {
    uint64_t largest = 0;
    for (const auto& block : store_->manifest().blocks) largest = std::max(largest, block.slot_size);
    return largest * blocks;
  }
  Config config(size_t budget_blocks) const {
    Config c;
    c.backend = BackendKind::kCuda;
    c.direct_io = DirectIoMode::kOff;
    c.num_io_threads = 2;
    c.queue_depth = 4;
    c.prefetch = PrefetchStrategy::kNone;
    c.budget_bytes = slot_bytes(budget_blocks);
    return c;
  }
  // True when `data` (a slot, read by the caller: a kernel or the host) holds exactly the stored bytes of `block`.
  bool holds(size_t block, std::span<const std::byte> data) const {
    const Manifest& manifest = store_->manifest();
    size_t t = 0;
    for (const TensorRecord& tensor : manifest.tensors_of(manifest.blocks[block])) {
      const auto& expected = blocks_[block].tensors[t++].bytes;
      if (data.size() < tensor.slot_offset + expected.size()) return false;
      if (!std::equal(expected.begin(), expected.end(), data.begin() + tensor.slot_offset)) return false;
    }
    return true;
  }
  static std::vector<TestBlock> equal_blocks(size_t count, uint64_t seed) {
    std::vector<TestBlock> blocks;
    for (size_t i = 0; i < count; ++i) {
      const std::string name = "layers." + std::to_string(i);
      blocks.push_back({name, {{name + ".w", Dtype::kBfloat16, {50000}, testing::normal_bf16_bytes(50000, seed + i)}}});
    }
    return blocks;
  }

  testing::TempDir dir_;
  std::unique_ptr<StorageDirectory> storage_;
  std::shared_ptr<const StoreReader> store_;
  std::vector<TestBlock> blocks_;
};

TEST_F(EngineOnCuda, EveryBlockArrivesBitExactRawAndCompressedAndCleanupReturnsEverything) {
  const Watchdog dog("EngineOnCuda.EveryBlockArrivesBitExactRawAndCompressedAndCleanupReturnsEverything",
                     std::chrono::seconds(60));
  const auto api = make_double(200);
  for (const int level : {0, 5}) {
    write(testing::sample_model(static_cast<uint64_t>(level) + 3), level);
    Arena arena(slot_bytes(store_->manifest().blocks.size()));
    testing::FaultPlan faults;
    faults.short_read_probability = 0.2;
    faults.max_delay_us = 100;
    faults.reorder = true;
    {
      Engine engine(store_, arena.span(), config(store_->manifest().blocks.size()), testing::make_fault_backend(faults, 2),
                    std::make_unique<CudaTransfer>(api, 0));
      for (int pass = 0; pass < 2; ++pass) {
        for (size_t b = 0; b < store_->manifest().blocks.size(); ++b) {
          Ticket ticket = engine.acquire(b);
          ticket.wait();  // host synchronisation on the ready event
          EXPECT_TRUE(holds(b, ticket.data())) << "level " << level << " block " << b;
          EXPECT_NE(ticket.ready_event(), 0u);
          engine.release(b);
        }
      }
      EXPECT_GT(api->pinned_bytes(), 0u) << "staging comes from cuMemHostAlloc";
      EXPECT_GT(engine.stats().staging_bytes, 0u);
    }
    EXPECT_EQ(api->pinned_bytes(), 0u) << "pinned staging freed with the engine";
    EXPECT_EQ(api->live_events(), 0u) << "ready events destroyed with the engine";
    EXPECT_EQ(api->live_streams(), 0u) << "copy stream destroyed with the transfer";
  }
}

// A consumer that chains on the ready event sees every byte; one that skips it does not.
TEST_F(EngineOnCuda, KernelsWaitingOnTheReadyEventNeverSeeAPartialBlock) {
  const Watchdog dog("EngineOnCuda.KernelsWaitingOnTheReadyEventNeverSeeAPartialBlock", std::chrono::seconds(60));
  const auto api = make_double(3000);
  write(equal_blocks(4, 11), 0);
  use_primary_context(*api);
  CuStream compute = nullptr;
  ASSERT_EQ(api->cuStreamCreate(&compute, 0), kCudaSuccess);
  for (const bool chain_on_event : {true, false}) {
    if (!chain_on_event && kUnderTsan) continue;
    Arena arena(slot_bytes(4));
    std::atomic<int> partial{0};
    {
      Engine engine(store_, arena.span(), config(4), nullptr, std::make_unique<CudaTransfer>(api, 0));
      for (size_t b = 0; b < 4; ++b) {
        Ticket ticket = engine.acquire(b);
        if (chain_on_event) {
          ticket.wait_on_stream(reinterpret_cast<uintptr_t>(compute));
        } else {
          while (!ticket.ready()) std::this_thread::yield();  // copies queued, not done: the rule broken on purpose
        }
        const std::span<const std::byte> slot = ticket.data();
        api->enqueue(compute, [&, b, slot] {
          if (!holds(b, slot)) ++partial;
        });
        engine.release(b, reinterpret_cast<uintptr_t>(compute));
      }
      ASSERT_EQ(api->cuStreamSynchronize(compute), kCudaSuccess);
      if (chain_on_event) {
        // The compute stream waited for copies of 3 ms each: measured there, with timed events, not on the host.
        const StatsSnapshot stats = engine.stats();
        EXPECT_GT(stats.device_stall_ns, 1'000'000u);
        EXPECT_GE(stats.wait_ns, stats.device_stall_ns);
      }
    }
    if (chain_on_event) {
      EXPECT_EQ(partial.load(), 0) << "a kernel ran before its block's copies completed";
    } else {
      EXPECT_GT(partial.load(), 0) << "with the ready event skipped the double should expose partial blocks";
    }
  }
  EXPECT_EQ(api->cuStreamDestroy(compute), kCudaSuccess);
}

// Blocks stream through two slots; each kernel is slow. With fences, the next block's copies wait for the kernel
// still reading the slot; without them, the slot is overwritten under the kernel.
TEST_F(EngineOnCuda, ASlotIsRefilledOnlyAfterTheFenceOfItsLastReader) {
  const Watchdog dog("EngineOnCuda.ASlotIsRefilledOnlyAfterTheFenceOfItsLastReader", std::chrono::seconds(60));
  const auto api = make_double(100);
  write(equal_blocks(6, 21), 0);
  use_primary_context(*api);
  CuStream compute = nullptr;
  ASSERT_EQ(api->cuStreamCreate(&compute, 0), kCudaSuccess);
  for (const bool fence : {true, false}) {
    if (!fence && kUnderTsan) continue;
    Arena arena(slot_bytes(2));
    std::atomic<int> overwritten{0};
    std::atomic<int> kernels{0};
    {
      Engine engine(store_, arena.span(), config(2), nullptr, std::make_unique<CudaTransfer>(api, 0));
      for (int pass = 0; pass < 2; ++pass) {
        for (size_t b = 0; b < 6; ++b) {
          Ticket ticket = engine.acquire(b);
          ticket.wait_on_stream(reinterpret_cast<uintptr_t>(compute));
          const std::span<const std::byte> slot = ticket.data();
          api->enqueue(compute, [&, b, slot] {
            std::this_thread::sleep_for(std::chrono::milliseconds(15));  // a long kernel still reading its weights
            if (!holds(b, slot)) ++overwritten;
            ++kernels;
          });
          engine.release(b, fence ? std::optional<uintptr_t>(reinterpret_cast<uintptr_t>(compute)) : std::nullopt);
        }
      }
      ASSERT_EQ(api->cuStreamSynchronize(compute), kCudaSuccess);
      EXPECT_GT(engine.stats().evictions, 0u);
    }
    EXPECT_EQ(kernels.load(), 12);
    if (fence) {
      EXPECT_EQ(overwritten.load(), 0) << "a slot was refilled while a kernel still read it";
    } else {
      EXPECT_GT(overwritten.load(), 0) << "without fences the double should expose the overwrite";
    }
  }
  EXPECT_EQ(api->cuStreamDestroy(compute), kCudaSuccess);
}

TEST_F(EngineOnCuda, TheTraceShowsTheCopyStream) {
  const Watchdog dog("EngineOnCuda.TheTraceShowsTheCopyStream");
  const auto api = make_double(300);
  write(equal_blocks(3, 61), 5);
  Arena arena(slot_bytes(3));
  Engine engine(store_, arena.span(), config(3), nullptr, std::make_unique<CudaTransfer>(api, 0));
  engine.enable_tracing();
  for (size_t b = 0; b < 3; ++b) {
    engine.acquire(b).wait();
    engine.release(b);
  }
  const TraceBatch batch = engine.drain_trace();
  uint64_t copied = 0;
  uint64_t previous_end = 0;
  size_t copies = 0;
  for (const TraceEvent& event : batch.events) {
    if (event.kind != TraceKind::kCopy) continue;
    ++copies;
    copied += event.bytes;
    EXPECT_EQ(event.lane.kind, TraceLaneKind::kCopy);
    EXPECT_LE(event.start_ns, event.end_ns);
    EXPECT_GE(event.start_ns, previous_end) << "one stream: its copies never overlap";
    EXPECT_GE(event.tensor, 0);
    previous_end = event.end_ns;
  }
  EXPECT_EQ(copies, store_->manifest().chunks.size());
  EXPECT_EQ(copied, engine.stats().h2d_bytes);
}

// PyTorch's default stream is CUDA's legacy default stream, whose handle is 0: a consumer on it must get the same
// ordering (ready events waited for on it, fences recorded on it), not be taken for "no stream".
TEST_F(EngineOnCuda, TheLegacyDefaultStreamIsAConsumerStreamLikeAnyOther) {
  const Watchdog dog("EngineOnCuda.TheLegacyDefaultStreamIsAConsumerStreamLikeAnyOther", std::chrono::seconds(60));
  const auto api = make_double(2000);
  write(equal_blocks(4, 71), 0);
  use_primary_context(*api);
  Arena arena(slot_bytes(2));
  std::atomic<int> wrong{0};
  {
    Engine engine(store_, arena.span(), config(2), nullptr, std::make_unique<CudaTransfer>(api, 0));
    for (int pass = 0; pass < 2; ++pass) {
      for (size_t b = 0; b < 4; ++b) {
        Ticket ticket = engine.acquire(b);
        ticket.wait_on_stream(0);
        const std::span<const std::byte> slot = ticket.data();
        api->enqueue(nullptr, [&, b, slot] {
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
          if (!holds(b, slot)) ++wrong;
        });
        engine.release(b, 0);
      }
    }
    ASSERT_EQ(api->cuStreamSynchronize(nullptr), kCudaSuccess);
  }
  EXPECT_EQ(wrong.load(), 0) << "a kernel on the legacy default stream saw a partial or overwritten block";
}

// ADAPTIVE sizes its lookahead from device time: how long a block's copies took on the copy stream and how long its
// kernels ran on the compute stream. Host timings would see neither (kernels are only launched; copies only
// queued): slow kernels would look instant and the lookahead would go to its maximum.
TEST_F(EngineOnCuda, AdaptiveLearnsFromDeviceTimeNotHostTime) {
  const Watchdog dog("EngineOnCuda.AdaptiveLearnsFromDeviceTimeNotHostTime", std::chrono::seconds(60));
  write(equal_blocks(4, 81), 0);
  struct Case {
    int copy_latency_us;
    int kernel_ms;
  };
  for (const Case c : {Case{0, 8}, Case{4000, 0}}) {
    SCOPED_TRACE("copy " + std::to_string(c.copy_latency_us) + " us, kernel " + std::to_string(c.kernel_ms) + " ms");
    CudaDoubleOptions options;
    options.copy_latency = std::chrono::microseconds(c.copy_latency_us);
    const auto api = std::make_shared<CudaDouble>(options);
    use_primary_context(*api);
    CuStream compute = nullptr;
    ASSERT_EQ(api->cuStreamCreate(&compute, 0), kCudaSuccess);
    Arena arena(slot_bytes(4));
    {
      Config config_c = config(4);
      config_c.prefetch = PrefetchStrategy::kAdaptive;
      config_c.memory_pressure = MemoryPressureMode::kAggressive;  // lookahead up to 4
      config_c.budget_bytes = slot_bytes(3);  // one block always streams: loads go on every pass
      Engine engine(store_, arena.span(), config_c, nullptr, std::make_unique<CudaTransfer>(api, 0));
      for (int pass = 0; pass < 4; ++pass) {
        for (size_t b = 0; b < 4; ++b) {
          Ticket ticket = engine.acquire(b);
          ticket.wait_on_stream(reinterpret_cast<uintptr_t>(compute));
          const int kernel_ms = c.kernel_ms;
          api->enqueue(compute, [kernel_ms] { std::this_thread::sleep_for(std::chrono::milliseconds(kernel_ms)); });
          engine.release(b, reinterpret_cast<uintptr_t>(compute));
        }
        ASSERT_EQ(api->cuStreamSynchronize(compute), kCudaSuccess);
      }
      (void)engine.stats();  // resolves what completed
      if (c.kernel_ms > 0) {
        EXPECT_EQ(engine.lookahead(), 1u) << "kernels hide the copies: one block ahead is enough";
      } else {
        EXPECT_GT(engine.lookahead(), 1u) << "copies take longer than kernels: look further ahead";
      }
    }
    EXPECT_EQ(api->cuStreamDestroy(compute), kCudaSuccess);
  }
}

TEST_F(EngineOnCuda, AnInjectedCopyErrorFailsThatLoadWithTheTypedErrorAndTheEngineStaysUsable) {
  const Watchdog dog("EngineOnCuda.AnInjectedCopyErrorFailsThatLoadWithTheTypedErrorAndTheEngineStaysUsable");
  const auto api = make_double(100);
  write(equal_blocks(3, 31), 5);
  Arena arena(slot_bytes(3));
  Engine engine(store_, arena.span(), config(3), nullptr, std::make_unique<CudaTransfer>(api, 0));
  api->fail_next("cuMemcpyHtoDAsync", kCudaErrorLaunchFailed);
  try {
    engine.acquire(1).wait();
    ADD_FAILURE() << "the failed copy was not reported";
  } catch (const CudaError& error) {
    EXPECT_EQ(error.code(), kCudaErrorLaunchFailed);
    EXPECT_NE(std::string(error.what()).find("cuMemcpyHtoDAsync"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("CUDA_ERROR_LAUNCH_FAILED"), std::string::npos) << error.what();
  }
  engine.release(1);
  for (size_t b = 0; b < 3; ++b) {
    Ticket ticket = engine.acquire(b);
    ticket.wait();
    EXPECT_TRUE(holds(b, ticket.data())) << b;
    engine.release(b);
  }
  api->fail_next("cuEventRecord", kCudaErrorInvalidHandle);  // the fence of a release
  Ticket ticket = engine.acquire(0);
  ticket.wait();
  use_primary_context(*api);
  CuStream compute = nullptr;
  ASSERT_EQ(api->cuStreamCreate(&compute, 0), kCudaSuccess);
  EXPECT_THROW(engine.release(0, reinterpret_cast<uintptr_t>(compute)), CudaError);
  engine.acquire(0).wait();  // the block was released all the same: its pin is not leaked
  engine.release(0);
  EXPECT_EQ(api->cuStreamDestroy(compute), kCudaSuccess);
}

// The host tier: blocks that leave VRAM are kept in pinned RAM and copied back instead of read again. Every load
// (a block not in VRAM at its acquire) is served by the tier or by storage: bytes read from storage per pass are the
// loads the tier could not serve, and the tier serves every block it holds (up to its capacity, the blocks that
// streamed through VRAM first).
TEST_F(EngineOnCuda, TheHostTierServesWhatVramCannotKeepAndStorageTheRest) {
  const Watchdog dog("EngineOnCuda.TheHostTierServesWhatVramCannotKeepAndStorageTheRest", std::chrono::seconds(60));
  const auto api = make_double(50);
  write(equal_blocks(6, 51), 0);
  const uint64_t block_stored = store_->manifest().blocks[0].end - store_->manifest().blocks[0].offset;
  struct Case {
    size_t vram_blocks;  // budget; balanced keeps a ring of 2
    size_t tier_blocks;
  };
  for (const Case& c : {Case{2, 6}, Case{2, 3}, Case{3, 2}, Case{2, 0}}) {
    SCOPED_TRACE("vram " + std::to_string(c.vram_blocks) + " tier " + std::to_string(c.tier_blocks));
    Arena arena(slot_bytes(c.vram_blocks));
    Config config_c = config(c.vram_blocks);
    config_c.host_cache_bytes = slot_bytes(c.tier_blocks);
    Engine engine(store_, arena.span(), config_c, nullptr, std::make_unique<CudaTransfer>(api, 0));
    for (int pass = 0; pass < 3; ++pass) {
      engine.reset_stats();
      for (size_t b = 0; b < 6; ++b) {
        Ticket ticket = engine.acquire(b);
        ticket.wait();
        EXPECT_TRUE(holds(b, ticket.data())) << "pass " << pass << " block " << b;
        engine.release(b);
      }
      const StatsSnapshot stats = engine.stats();
      const uint64_t loads = stats.misses;
      // Every block loaded is offered to the tier (once the order is learned any block may leave VRAM), which
      // fills to its capacity.
      EXPECT_EQ(stats.host_tier_held_bytes, std::min<size_t>(c.tier_blocks, 6) * slot_bytes(1));
      if (pass == 0) {
        EXPECT_EQ(stats.host_tier_hits, 0u);
        EXPECT_EQ(stats.bytes_read, 6 * block_stored);
        continue;
      }
      EXPECT_LE(stats.host_tier_hits, loads) << pass;
      EXPECT_EQ(stats.bytes_read, (loads - stats.host_tier_hits) * block_stored) << "pass " << pass;
      if (c.tier_blocks == 0) EXPECT_EQ(stats.host_tier_hits, 0u);
      if (c.tier_blocks > 0 && loads > 0) EXPECT_GT(stats.host_tier_hits, 0u) << "pass " << pass;
      if (c.tier_blocks >= 6) EXPECT_EQ(stats.bytes_read, 0u) << "everything is in RAM";
    }
  }
}

// An order that does not simply repeat each block once (block 1 runs twice a pass, as a shared layer would): the tier
// evicts by next use, and every load is still served by the tier or by storage, bytes exact.
TEST_F(EngineOnCuda, TheHostTierEvictsByNextUseWhenTheOrderIsNotACycle) {
  const Watchdog dog("EngineOnCuda.TheHostTierEvictsByNextUseWhenTheOrderIsNotACycle", std::chrono::seconds(60));
  const auto api = make_double(50);
  write(equal_blocks(5, 91), 0);
  const uint64_t block_stored = store_->manifest().blocks[0].end - store_->manifest().blocks[0].offset;
  Arena arena(slot_bytes(2));
  Config c = config(2);
  c.host_cache_bytes = slot_bytes(1);
  Engine engine(store_, arena.span(), c, nullptr, std::make_unique<CudaTransfer>(api, 0));
  const size_t pass_order[] = {0, 1, 2, 1, 3, 4};
  uint64_t evictions = 0;
  for (int pass = 0; pass < 6; ++pass) {
    engine.reset_stats();
    for (const size_t b : pass_order) {
      Ticket ticket = engine.acquire(b);
      ticket.wait();
      EXPECT_TRUE(holds(b, ticket.data())) << "pass " << pass << " block " << b;
      engine.release(b);
    }
    const StatsSnapshot stats = engine.stats();
    EXPECT_EQ(stats.bytes_read, (stats.misses - stats.host_tier_hits) * block_stored) << "pass " << pass;
    EXPECT_LE(stats.host_tier_held_bytes, slot_bytes(1));
    evictions = stats.host_tier_evictions;
  }
  EXPECT_GT(evictions, 0u) << "with block 1 used twice a pass, the tier trades blocks by next use";
}

// GPUDIRECT: raw blocks go storage -> device through cuFile (the double preads into the "device" range), unless
// checksums are on: then every chunk comes through staging and is verified on the CPU (the bounce path).
TEST_F(EngineOnCuda, GpuDirectReadsRawBlocksIntoTheSlotsOrBouncesWhenVerifying) {
  const Watchdog dog("EngineOnCuda.GpuDirectReadsRawBlocksIntoTheSlotsOrBouncesWhenVerifying");
  const auto api = make_double(100);
  write(equal_blocks(4, 41), 0);
  for (const bool verify : {false, true}) {
    Arena arena(slot_bytes(4));
    const uint64_t reads_before = api->cufile_reads();
    {
      Config c = config(4);
      c.backend = BackendKind::kGpuDirect;
      c.verify_checksums = verify;
      Engine engine(store_, arena.span(), c, nullptr,
                    std::make_unique<CudaTransfer>(api, 0, SlotAccess::kDeviceDirect));
      EXPECT_EQ(engine.backend_name(), "cufile");
      EXPECT_EQ(engine.transfer_name(), "gpudirect");
      for (size_t b = 0; b < 4; ++b) {
        Ticket ticket = engine.acquire(b);
        ticket.wait();
        EXPECT_TRUE(holds(b, ticket.data())) << b;
        engine.release(b);
      }
      const StatsSnapshot stats = engine.stats();
      if (verify) {
        EXPECT_EQ(stats.direct_bytes, 0u) << "verified bytes come through staging";
        EXPECT_GT(stats.h2d_bytes, 0u);
        EXPECT_EQ(api->cufile_reads(), reads_before) << "staged reads are plain reads";
      } else {
        EXPECT_GT(stats.direct_bytes, 0u);
        EXPECT_EQ(stats.h2d_bytes, 0u) << "raw blocks need no copy";
        EXPECT_GT(api->cufile_reads(), reads_before);
        EXPECT_EQ(api->cufile_unregistered_reads(), 0u) << "the arena is registered once";
      }
    }
    EXPECT_EQ(api->live_cufile_handles(), 0u) << "file handles deregistered with the engine";
  }
}

TEST_F(EngineOnCuda, AFailedCuFileReadIsAnIoErrorAndTheEngineStaysUsable) {
  const Watchdog dog("EngineOnCuda.AFailedCuFileReadIsAnIoErrorAndTheEngineStaysUsable");
  const auto api = make_double(0);
  write(equal_blocks(2, 43), 0);
  Arena arena(slot_bytes(2));
  Config c = config(2);
  c.backend = BackendKind::kGpuDirect;
  c.verify_checksums = false;
  Engine engine(store_, arena.span(), c, nullptr, std::make_unique<CudaTransfer>(api, 0, SlotAccess::kDeviceDirect));
  api->fail_next("cuFileRead", 5);  // EIO
  EXPECT_THROW(engine.acquire(0).wait(), IoError);
  engine.release(0);
  Ticket ticket = engine.acquire(0);
  ticket.wait();
  EXPECT_TRUE(holds(0, ticket.data()));
  engine.release(0);
}

}  // namespace
}  // namespace tensorstream
