#include "tensorstream/engine/engine.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <mutex>

#include "engine/chunk_stage.hpp"
#include "engine/device_timing.hpp"
#include "engine/io_queue.hpp"
#include "engine/load_plan.hpp"
#include "engine/load_state.hpp"
#include "engine/worker_pool.hpp"
#include "io/mmap_backend.hpp"
#include "tensorstream/cuda/cuda_transfer.hpp"
#include "tensorstream/cuda/cufile_reader.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/io/direct_io.hpp"
#include "tensorstream/io/mapping_guard.hpp"
#include "tensorstream/io/memory_headroom.hpp"
#include "tensorstream/memory/host_tier.hpp"
#include "tensorstream/memory/staging_pool.hpp"
#include "tensorstream/residency/prefetcher.hpp"
#include "tensorstream/residency/residency_manager.hpp"

// The engine's orchestration: acquire / release / prefetch against the residency manager and the prefetcher, and
// loads, started as the load planner shapes them and finished when their last chunk is. The pieces it drives live
// next to it: load_plan (what to read, where to), io_queue (bounded submission, staging leases, reaping),
// worker_pool (the threads), chunk_stage (verify, decode, into the slot), device_timing (device-time
// measurements), load_state (one load's progress).

namespace tensorstream {

namespace {
// A caller blocked this long without any load finishing or block being released is deadlocked (every slot is
// pinned by callers that wait themselves); failing loudly beats hanging forever.
constexpr auto kNoRoomTimeout = std::chrono::seconds(60);

// AUTO maps a block instead of reading it when at least this share of its pages is in the page cache (the same
// threshold as the O_DIRECT decision: below it, reading directly beats faulting pages in one by one).
constexpr double kWarmFraction = 0.5;

// A host arena is larger than the budget when blocks differ in size (python/tensorstream/torch/arena.py: the slack
// lets a large block find a contiguous slot without evicting its neighbours), so the pages of freed slots go back
// to the OS: what stays in memory is what the budget holds. Only whole 2 MiB pages inside the range: splitting a
// transparent huge page would turn later reads into it into many small DMA segments (arena.py), and a sliver left
// resident costs at most 4 MiB per free range. Advisory: a failure only leaves the pages where they are.
constexpr uint64_t kReleaseGranularity = uint64_t{2} << 20;
void release_host_pages(std::byte* begin, uint64_t bytes) {
  const auto first = reinterpret_cast<uintptr_t>(begin);
  const uintptr_t from = (first + kReleaseGranularity - 1) / kReleaseGranularity * kReleaseGranularity;
  const uintptr_t to = (first + bytes) / kReleaseGranularity * kReleaseGranularity;
  if (from >= to) return;
  (void)::madvise(reinterpret_cast<void*>(from), to - from, MADV_DONTNEED);
}
}  // namespace

using detail::ChunkStage;
using detail::DeviceTiming;
using detail::IoQueue;
using detail::LoadPlan;
using detail::LoadPlanInputs;
using detail::LoadState;
using detail::PlannedRead;
using detail::QueuedRead;
using detail::WorkerPool;

struct Engine::Impl {
  // One read of a load, as the I/O queue carries it.
  struct Piece : QueuedRead {
    std::shared_ptr<LoadState> load;
    size_t read_index = 0;  // into load->plan.reads
    [[nodiscard]] const PlannedRead& planned() const { return load->plan.reads[read_index]; }
  };

  std::shared_ptr<const StoreReader> store;
  const Manifest& manifest;
  std::span<std::byte> arena;
  bool arena_aligned;  // 4 KiB aligned: reads straight into slots may use O_DIRECT
  Config config;
  std::unique_ptr<IoBackend> backend;
  std::string fallback_reason;
  std::unique_ptr<Transfer> transfer;
  SlotAccess access;  // decided once: where slots live and who writes them; the load planner turns it into reads
  // The blocks this engine streams. The residency manager and the prefetcher number them 0..n-1 ("positions");
  // everything else, the API included, uses store block indices. Translated where the two meet.
  static constexpr size_t kNotStreamed = SIZE_MAX;
  std::vector<size_t> streamed;  // position -> store block index
  std::vector<size_t> position;  // store block index -> position, or kNotStreamed
  Stats stats;
  TraceRecorder trace;  // off until enable_tracing(); every recording site checks trace.enabled() first
  ResidencyManager residency;
  Prefetcher prefetcher;
  UniqueFd direct_fd;  // O_DIRECT descriptor of the data file, when usable
  // AUTO with a store that memory can hold: raw blocks are views of the file from the first pass (with a mapper),
  // so the page cache fills as they are faulted in and nothing is read from the disk twice; blocks that cannot be
  // views (compressed, or no mapper: copying backends, device slots) are read buffered from the second pass on.
  // Without it a machine with room to spare re-read the whole store with O_DIRECT every pass (1.37 tokens/s where
  // accelerate, reading through the cache, made 2.25). Why views from the first pass and not O_DIRECT into the
  // arena first: O_DIRECT is faster into memory the host has already backed (first forward of the 3.2 GB M1 model
  // 0.8-0.9 s against 1.3-1.7 s mapped), but fresh huge pages cost 0.55 GB/s on the development VM (2.8-3.9 s
  // against 1.8-2.8 s), and the O_DIRECT first pass left passes 2-4 to buffered reads at 0.5-0.9 GB/s (decode
  // steps 0.6-0.8 s against 0.2 s mapped). docs/architecture.md, "AUTO fills the page cache".
  bool fill_page_cache = false;
  bool zero_copy = false;  // the backend itself maps the file: every raw block is a view, never a copy
  // AUTO with host slots: a second, mapping backend for blocks already in the page cache. Reading those would only
  // copy memory to memory; a view of the page cache costs no copy at all (cold blocks are still read, directly).
  std::unique_ptr<IoBackend> mapper;
  std::vector<std::span<std::byte>> block_data;  // where each resident or loading block's bytes are (under `mutex`)
  std::vector<uint8_t> block_mapped;             // 1 when block_data is a view of the file mapping (under `mutex`)
  // The view each block's checksums were last verified in (under `mutex`). Mapping a block again gives the same
  // view while the mapping lives; its pages are the file's and the file is never rewritten in place, so they are
  // verified once per mapping, not once per use (docs/architecture.md). A new mapping (after a truncation, or a
  // file that grew) gives a new address, and the block is verified again.
  std::vector<const std::byte*> verified_view;
  std::vector<EventRef> block_ready;             // device slots: the ready event of each block's last load (`mutex`)
  // Device slots: fences handed over by releases that no copy has waited for yet, with the slot range they guard.
  // The copy stream is one FIFO stream, so a fence is waited for once, by the first load into any part of its
  // range; every later copy is ordered after that wait (under `mutex`).
  struct PendingFence {
    uint64_t begin = 0;
    uint64_t end = 0;
    EventRef fence;
  };
  std::vector<PendingFence> pending_fences;
  std::mutex mutex;  // loads, acquire times, order flag
  std::condition_variable room_cv;
  uint64_t progress = 0;  // bumped on every release / finished load, so NoRoom waiters see change
  std::vector<std::shared_ptr<LoadState>> loads;
  std::vector<uint64_t> acquired_at_ns;
  std::vector<uint8_t> prefetched_pending;  // loaded by a prefetch and not yet used by a demand access
  std::atomic<bool> order_given{false};
  // Shared so a caller can copy it under `mutex` without copying the callable (which, for a Python callable,
  // would need the GIL while holding an engine lock).
  std::shared_ptr<const std::function<void(size_t)>> eviction_callback;

  // Host buffers for reads that cannot land in the slot (compressed chunks; every chunk of a device slot), and, for
  // device slots, for decoded chunks on their way to the device (a worker waits for one when all are in copies).
  std::shared_ptr<StagingPool> staging;
  std::shared_ptr<StagingPool> decoded;
  // Device slots with host_cache_bytes: decoded blocks kept in pinned RAM, copied to the device instead of read.
  std::unique_ptr<HostTier> tier;
  std::unique_ptr<DeviceTiming> timing;  // device slots: stalls, loads and kernels in device time
  std::unique_ptr<ChunkStage> stage;
  // Started last, stopped first (see ~Impl): they call back into everything above.
  std::unique_ptr<WorkerPool> workers;
  std::unique_ptr<IoQueue> io;

  Impl(std::shared_ptr<const StoreReader> store_in, std::span<std::byte> arena_in, Config config_in,
       std::unique_ptr<IoBackend> backend_in, std::unique_ptr<Transfer> transfer_in,
       std::optional<std::vector<size_t>> blocks_in)
      : store(std::move(store_in)),
        manifest(store->manifest()),
        arena(arena_in),
        arena_aligned(reinterpret_cast<uintptr_t>(arena_in.data()) % kDirectIoAlignment == 0),
        config(validated(config_in)),
        backend(std::move(backend_in)),
        transfer(transfer_in ? std::move(transfer_in) : make_transfer(config.backend)),
        access(transfer->slot_access()),
        streamed(streamed_blocks(manifest, std::move(blocks_in))),
        position(positions(manifest, streamed)),
        stats(manifest.blocks.size()),
        residency(block_sizes(manifest, streamed), arena.size(),
                  config.budget_bytes == 0 ? arena.size() : std::min<uint64_t>(config.budget_bytes, arena.size()),
                  plan_for(config.memory_pressure)),
        prefetcher(config.prefetch, streamed.size(), plan_for(config.memory_pressure).max_lookahead),
        loads(manifest.blocks.size()),
        acquired_at_ns(manifest.blocks.size(), 0),
        prefetched_pending(manifest.blocks.size(), 0) {
    const BackendTraits& traits = backend_traits(config.backend);
    if (traits.device_slots && host_addressable(access)) {
      throw ConfigError("backend", "'" + std::string(traits.name) +
                                       "' puts slots in device memory, which needs a device Transfer (the CUDA "
                                       "transfer stage); this engine has host slots");
    }
    if (!backend && traits.reader == BackendKind::kGpuDirect) {
      // cuFile reads into the arena's device memory, over the transfer's driver and context.
      auto* cuda = dynamic_cast<CudaTransfer*>(transfer.get());
      if (cuda == nullptr) throw ConfigError("backend", "'gpudirect' needs a CUDA transfer (device slots)");
      CudaAvailability found;
      (void)load_cuda(&found);
      backend = make_cufile_reader(cuda->api(), cuda->context(), arena, config.num_io_threads, found.gds,
                                   &fallback_reason);
      static std::atomic<bool> logged{false};  // once per process, like the io_uring fallback
      if (!found.gds && !logged.exchange(true)) {
        std::fprintf(stderr, "tensorstream.io: gpudirect: %s\n", fallback_reason.c_str());
      }
    }
    if (!backend) {
      BackendOptions options;
      options.kind = config.backend;
      options.num_threads = config.num_io_threads;
      options.queue_depth = config.queue_depth;
      backend = make_backend(options, &fallback_reason);
    }
    zero_copy = backend->caps().zero_copy_views && host_addressable(access);
    if (config.backend == BackendKind::kAuto && config.direct_io == DirectIoMode::kAuto && !zero_copy &&
        host_addressable(access)) {
      mapper = detail::make_mmap_backend();
    }
    if (host_addressable(access)) {
      std::byte* base = arena.data();
      residency.set_release_hook([base](uint64_t offset, uint64_t bytes) { release_host_pages(base + offset, bytes); });
    }
    block_data.resize(manifest.blocks.size());
    block_mapped.resize(manifest.blocks.size(), 0);
    verified_view.resize(manifest.blocks.size(), nullptr);
    open_direct_fd();
    if (direct_fd && config.direct_io == DirectIoMode::kAuto && traits.reader != BackendKind::kGpuDirect) {
      fill_page_cache = manifest.data_size > 0 && page_cache_can_hold(manifest.data_size + arena.size());
    }
    // Enough buffers for every read in flight plus one being verified or decoded per worker; allocated on first use.
    staging = StagingPool::create(detail::staging_bytes_for(manifest.chunk_size),
                                  uint64_t{config.queue_depth} + config.num_io_threads, transfer->staging_allocator());
    if (!host_addressable(access)) {
      // Two per worker: one being decoded while the previous one's copy runs.
      decoded = StagingPool::create(manifest.chunk_size, 2 * uint64_t{config.num_io_threads},
                                    transfer->staging_allocator());
      block_ready.resize(manifest.blocks.size());
      if (config.host_cache_bytes > 0) {
        tier = std::make_unique<HostTier>(manifest.blocks.size(), config.host_cache_bytes,
                                          transfer->staging_allocator());
      }
      timing = std::make_unique<DeviceTiming>(*transfer, stats, prefetcher, position);
    }
    stage = std::make_unique<ChunkStage>(ChunkStage::Context{*store, *transfer, trace, stats, config.verify_checksums,
                                                             decoded.get(), tier.get()});
    workers = std::make_unique<WorkerPool>(config.num_io_threads, [](uint32_t i) {
      set_current_thread_lane({TraceLaneKind::kWorker, i});  // what this thread records shows as "worker i"
    });
    io = std::make_unique<IoQueue>(*backend, config.queue_depth, staging.get(), stats, trace,
                                   [this](std::unique_ptr<QueuedRead> read, int64_t result) {
                                     on_read_complete(std::unique_ptr<Piece>(static_cast<Piece*>(read.release())),
                                                      result);
                                   });
    staging->set_on_available([this] { io->pump(); });  // a returned lease may unblock a queued staged read
    transfer->set_trace(&trace);  // copy-stream spans, while tracing is on
  }

  ~Impl() {
    // Reads not yet handed to the backend are cancelled, those in flight complete normally; then the workers run
    // every job that produced, and only then can nothing call back into the queue or the pool.
    io->shutdown();
    workers->shutdown();
    transfer->drain();  // copies still on the device hold staging leases until they complete
    transfer->set_trace(nullptr);
    staging->set_on_available({});
  }

  static Config validated(const Config& config) {
    config.validate();
    return config;
  }

  static std::vector<size_t> streamed_blocks(const Manifest& manifest, std::optional<std::vector<size_t>> blocks) {
    if (!blocks) {
      std::vector<size_t> all(manifest.blocks.size());
      for (size_t i = 0; i < all.size(); ++i) all[i] = i;
      return all;
    }
    std::vector<bool> seen(manifest.blocks.size(), false);
    for (size_t block : *blocks) {
      if (block >= manifest.blocks.size()) {
        throw ConfigError("blocks", "index " + std::to_string(block) + " out of range (" +
                                        std::to_string(manifest.blocks.size()) + " blocks)");
      }
      if (seen[block]) throw ConfigError("blocks", "block '" + manifest.blocks[block].name + "' listed twice");
      seen[block] = true;
    }
    return std::move(*blocks);
  }

  static std::vector<size_t> positions(const Manifest& manifest, const std::vector<size_t>& streamed) {
    std::vector<size_t> out(manifest.blocks.size(), kNotStreamed);
    for (size_t i = 0; i < streamed.size(); ++i) out[streamed[i]] = i;
    return out;
  }

  static std::vector<uint64_t> block_sizes(const Manifest& manifest, const std::vector<size_t>& streamed) {
    std::vector<uint64_t> sizes;
    sizes.reserve(streamed.size());
    for (size_t block : streamed) {
      sizes.push_back(std::max<uint64_t>(manifest.blocks[block].slot_size, kBlockAlignment));
    }
    return sizes;
  }

  // Positions (residency manager, prefetcher) -> store block indices, in place.
  std::vector<size_t> to_store(std::vector<size_t> at) const {
    for (size_t& block : at) block = streamed[block];
    return at;
  }

  // O_DIRECT wherever a read can be aligned: reads into slots need a 4 KiB-aligned arena (checked per plan through
  // LoadPlanInputs::slots_aligned), staged reads always are. Not with a mapping backend, which never reads.
  void open_direct_fd() {
    if (config.direct_io == DirectIoMode::kOff || zero_copy) return;
    if (!direct_io_supported(store->data_path().c_str())) return;
    const int fd = ::open(store->data_path().c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd >= 0) direct_fd = UniqueFd(fd);
  }

  // ---- acquiring ------------------------------------------------------------------------------------------------

  Ticket acquire(Engine* engine, size_t block) {
    check_block(block);
    if (timing) timing->resolve();  // device timings reach ADAPTIVE as they complete
    Submission to_submit;
    Ticket ticket;
    ticket.block_ = block;
    ticket.engine_ = engine;
    std::unique_lock lock(mutex);
    const auto deadline = std::chrono::steady_clock::now() + kNoRoomTimeout;
    std::vector<size_t> discarded;  // mapped blocks whose file shrank under them: evicted, then loaded afresh
    for (;;) {
      ResidencyManager::Decision decision = residency.acquire(position[block]);
      if (decision.action == ResidencyManager::Action::kHit && block_mapped[block] != 0 && !mapped_view_intact(block)) {
        // Loading it again reads the file as it is now: a typed error if it is still short, the bytes if repaired.
        for (size_t trimmed : to_store(residency.release(position[block]))) discarded.push_back(trimmed);
        forget_mapped_view(block, discarded);
        continue;
      }
      const bool prefetched = prefetched_pending[block] != 0;
      if (decision.action == ResidencyManager::Action::kNoRoom) {
        const uint64_t seen = progress;
        if (!room_cv.wait_until(lock, deadline, [&] { return progress != seen; })) {
          throw ConfigError("budget", "no slot for block '" + manifest.blocks[block].name +
                                          "' within 60 s: every slot is pinned; release blocks or raise the budget");
        }
        continue;
      }
      acquired_at_ns[block] = trace_now_ns();
      prefetched_pending[block] = 0;
      std::vector<size_t> evicted = to_store(std::move(decision.evicted));
      switch (decision.action) {
        case ResidencyManager::Action::kHit:
          ticket.data_ = block_data[block];
          if (!block_ready.empty()) ticket.ready_ = block_ready[block];
          stats.on_acquire(block, /*hit=*/true, prefetched);
          break;
        case ResidencyManager::Action::kInFlight:
          ticket.load_ = loads[block];
          ticket.data_ = ticket.load_->data;
          stats.on_acquire(block, /*hit=*/false, prefetched);
          break;
        case ResidencyManager::Action::kLoad:
          ticket.load_ = start_load(block, decision.slot_offset, to_submit);
          ticket.data_ = ticket.load_->data;
          stats.on_acquire(block, /*hit=*/false, /*prefetched=*/false);
          break;
        case ResidencyManager::Action::kNoRoom:
          break;
      }
      lock.unlock();
      // Evictions first: a mapped block's pages leave this process before the new load faults its own in, so RSS
      // never holds both (on the 3.2 GB Llama at a 1.6 GB budget the other order peaked one layer, 0.3 GB, high).
      evicted.insert(evicted.end(), discarded.begin(), discarded.end());
      handle_evictions(evicted);
      submit(std::move(to_submit));
      run_prefetcher(block);
      return ticket;
    }
  }

  void release(size_t block, std::optional<uintptr_t> consumer_stream) {
    check_block(block);
    // The fence first, while the block is still pinned: once unpinned its slot may be given to another load.
    EventRef fence;
    std::exception_ptr fence_error;
    if (!host_addressable(access) && consumer_stream) {
      try {
        fence = transfer->record_on_stream(*consumer_stream);
      } catch (...) {
        fence_error = std::current_exception();
      }
    }
    uint64_t started = 0;
    bool damaged = false;
    std::vector<size_t> evicted;  // non-empty only when the budget shrank below what pinned blocks held
    // The kernels between the consumer's wait and this fence: the block's compute time, in device time.
    const bool device_timed = timing && timing->released(block, fence);
    {
      std::lock_guard lock(mutex);
      if (fence) {
        const auto begin = static_cast<uint64_t>(block_data[block].data() - arena.data());
        pending_fences.push_back({begin, begin + block_data[block].size(), std::move(fence)});
      }
      started = acquired_at_ns[block];
      evicted = to_store(residency.release(position[block]));
      if (block_mapped[block] != 0 && mapping_damaged(block_data[block].data(), block_data[block].size())) {
        // The data file shrank while this block was in use: the pages that vanished were read as zeros
        // (io/mapping_guard.hpp), so whatever the caller computed with them is wrong. Say so, and never serve
        // this view again.
        damaged = true;
        forget_mapped_view(block, evicted);
      }
      ++progress;
    }
    room_cv.notify_all();
    handle_evictions(evicted);
    if (started != 0 && !device_timed) prefetcher.on_compute_time(position[block], trace_now_ns() - started);
    if (damaged) {
      stats.on_io_error();
      const BlockRecord& record = manifest.blocks[block];
      throw IoError(store->data_path(), ENODATA,
                    "use of mapped block '" + record.name + "' at offset " + std::to_string(record.offset) +
                        " (the data file was truncated while the block was in use: pages past its new end read as "
                        "zeros, so this forward pass's results are invalid; repair the store and run it again)");
    }
    if (fence_error) std::rethrow_exception(fence_error);
  }

  // A mapped block whose view went bad (its file shrank): evicted now if unpinned (appended to `evicted`), never
  // served or trusted as verified again. Caller holds `mutex`.
  void forget_mapped_view(size_t block, std::vector<size_t>& evicted) {
    if (residency.discard(position[block])) evicted.push_back(block);
    block_mapped[block] = 0;
    verified_view[block] = nullptr;
  }

  // A mapped block may be handed out again only while its pages are still the file's: the file still covers it
  // and no page of the view faulted past the end (io/mapping_guard.hpp). Caller holds `mutex`.
  bool mapped_view_intact(size_t block) const {
    const BlockRecord& record = manifest.blocks[block];
    struct stat st {};
    if (::fstat(store->data_fd(), &st) != 0) return false;
    const auto file_size = static_cast<uint64_t>(st.st_size);
    if (file_size < record.offset || file_size - record.offset < record.slot_size) return false;
    return !mapping_damaged(block_data[block].data(), block_data[block].size());
  }

  void prefetch(size_t block) {
    check_block(block);
    std::vector<size_t> evicted;
    Submission to_submit;
    {
      std::lock_guard lock(mutex);
      ResidencyManager::Decision decision = residency.prefetch(position[block]);
      if (decision.action == ResidencyManager::Action::kLoad) {
        prefetched_pending[block] = 1;
        (void)start_load(block, decision.slot_offset, to_submit);
        stats.on_prefetch_issued();
      }
      evicted = to_store(std::move(decision.evicted));
    }
    handle_evictions(evicted);  // before the load, as in acquire()
    submit(std::move(to_submit));
  }

  void run_prefetcher(size_t block) {
    const std::vector<size_t> ahead = prefetcher.on_access(position[block]);  // positions
    if (!order_given.load() && prefetcher.order_known() && !order_given.exchange(true)) {
      residency.set_order(prefetcher.learned_order());
    }
    for (size_t next : ahead) {
      if (residency.state(next) != BlockState::kOnDisk) continue;
      prefetch(streamed[next]);
      if (residency.state(next) == BlockState::kOnDisk) break;  // no room: further blocks would not fit either
    }
  }

  void handle_evictions(const std::vector<size_t>& evicted) {
    if (evicted.empty()) return;
    std::shared_ptr<const std::function<void(size_t)>> callback;
    {
      std::lock_guard lock(mutex);
      callback = eviction_callback;
    }
    for (size_t block : evicted) {
      stats.on_eviction(block);
      bool mapped = false;
      {
        std::lock_guard lock(mutex);
        mapped = block_mapped[block] != 0;
        block_mapped[block] = 0;
      }
      if (mapped) {
        // Drops this process's page-table entries for the block (the page cache keeps the data), so RSS stays
        // bounded by the budget whether blocks were read or mapped.
        const BlockRecord& record = manifest.blocks[block];
        (zero_copy ? backend : mapper)->dont_need(store->data_fd(), record.offset, record.slot_size);
      }
      if (callback && *callback) {
        // Runs on engine threads too, where nothing may throw: a failing callback is reported, not propagated.
        try {
          (*callback)(block);
        } catch (const std::exception& error) {
          std::fprintf(stderr, "tensorstream: eviction callback failed for block %zu: %s\n", block, error.what());
        } catch (...) {
          std::fprintf(stderr, "tensorstream: eviction callback failed for block %zu\n", block);
        }
      }
    }
  }

  void check_block(size_t block) const {
    if (block >= manifest.blocks.size()) {
      throw ConfigError("block", "index " + std::to_string(block) + " out of range (" +
                                     std::to_string(manifest.blocks.size()) + " blocks)");
    }
    if (position[block] == kNotStreamed) {
      throw ConfigError("block", "block '" + manifest.blocks[block].name + "' (index " + std::to_string(block) +
                                     ") is not one of the blocks this engine streams");
    }
  }

  // ---- loading --------------------------------------------------------------------------------------------------

  // What a load starts once the caller has dropped `mutex` (a submit may finish a load, which takes it) and applied
  // its evictions (so that a mapped block's pages are faulted in only after the evicted ones left).
  struct Submission {
    std::vector<std::unique_ptr<QueuedRead>> reads;
    std::vector<std::shared_ptr<LoadState>> mapped;  // verified, and so faulted in, on the workers
  };

  // Called with `mutex` held. Creates the load and returns it; its work goes to `to_submit`.
  std::shared_ptr<LoadState> start_load(size_t block, uint64_t slot_offset, Submission& to_submit) {
    const BlockRecord& record = manifest.blocks[block];
    auto load = std::make_shared<LoadState>();
    load->block = block;
    load->start_ns = trace_now_ns();
    loads[block] = load;

    // A view of the page cache instead of a read: always with a mapping backend; with AUTO for warm blocks, and for
    // every raw block when the page cache is to hold the store (a cold view is faulted in through the kernel's
    // readahead, which fills the cache on the first pass).
    IoBackend* view_source = nullptr;
    if (record.all_raw && zero_copy) {
      view_source = backend.get();
    } else if (record.all_raw && mapper &&
               (fill_page_cache ||
                page_cache_fraction(store->data_fd(), record.offset, record.slot_size) >= kWarmFraction)) {
      view_source = mapper.get();
    }
    LoadPlanInputs inputs;
    inputs.access = access;
    inputs.map = view_source != nullptr;
    inputs.verify = config.verify_checksums;
    inputs.slots_aligned = arena_aligned;
    // Blocks that are not views fill the page cache from the second pass: buffered reads of cold data ran at
    // 0.5-0.9 GB/s on the development VM against 4 GB/s with O_DIRECT (S1), so the first token reads them directly.
    const bool fill_now = fill_page_cache && order_given.load();
    inputs.direct = !inputs.map && direct_fd && !fill_now &&
                    should_read_direct(config.direct_io, store->data_fd(), record.offset,
                                       align_up(record.end - record.offset, kBlockAlignment));
    try {
      load->plan = detail::plan_load(manifest, block, inputs);
    } catch (...) {
      load->set_error(std::current_exception());
      load->units_left = 1;
      workers->post([this, load] { unit_finished(load); });
      return load;
    }
    const LoadPlan& plan = load->plan;

    if (plan.kind == LoadPlan::Kind::kMapped) {
      const auto view = view_source->view(store->data_fd(), record.offset, record.slot_size);
      if (view.size() != record.slot_size) {
        // The file no longer covers the block (truncated since the store was opened), or cannot be mapped: a
        // typed error for this load, never an empty view.
        stats.on_io_error();
        load->data = arena.subspan(slot_offset, record.slot_size);
        block_data[block] = load->data;
        load->set_error(std::make_exception_ptr(
            IoError(store->data_path(), ENODATA,
                    "map of block '" + record.name + "' at offset " + std::to_string(record.offset) +
                        " (unexpected end of file: the data file no longer covers the block)")));
        load->units_left = 1;
        workers->post([this, load] { unit_finished(load); });
        return load;
      }
      load->data = {const_cast<std::byte*>(view.data()), view.size()};  // a copy-on-write private mapping
      load->verified_before = config.verify_checksums && verified_view[block] == view.data();
      // The slot stays reserved (the budget counts the block) but holds nothing while the block is a view: its
      // pages go back, or RSS would carry both the slot's old contents and the mapped pages (measured: 2.99 GB peak
      // RSS for a 1.61 GB budget once the page cache held the store).
      release_host_pages(arena.data() + slot_offset, record.slot_size);
      block_mapped[block] = 1;
    } else {
      load->data = arena.subspan(slot_offset, record.slot_size);
      if (!host_addressable(access)) {
        wait_for_fences(load, slot_offset, slot_offset + record.slot_size);
        std::exception_ptr timing_error;  // a failed timing event costs the measurement only
        load->copy_start = transfer->record_copy_timed(&timing_error);
      }
    }
    block_data[block] = load->data;

    if (tier && plan.kind == LoadPlan::Kind::kChunks) {
      load->from_tier = tier->find(block);
      if (!load->from_tier.empty()) {  // held in RAM: one copy, no read
        load->units_left = 1;
        workers->post([this, load] { copy_from_tier(load); });
        return load;
      }
      // Keep its decoded bytes in the tier if there is room: any block may leave VRAM again (once the order is
      // learned the residency manager evicts static blocks too, furthest next use first); the tier evicts by next
      // use when it is full.
      load->tier_fill = tier->reserve(block, record.slot_size, next_use_after(block), [this] {
        // Evicted buffers go once every copy queued so far (those from them included) has completed.
        std::exception_ptr error;
        const EventRef queued = transfer->record_ready(&error);
        if (!queued) return HostTier::RetireCheck{};  // no event: the buffers stay until the engine goes
        return HostTier::RetireCheck([this, queued] { return transfer->elapsed_ns(*queued, *queued).has_value(); });
      });
    }

    switch (plan.kind) {
      case LoadPlan::Kind::kEmpty:
        load->units_left = 1;
        workers->post([this, load] { unit_finished(load); });  // a block of empty tensors is ready at once
        break;
      case LoadPlan::Kind::kMapped:
        // No read: the mapping is the slot. Verification touches (and so faults in) every page.
        load->stored_bytes += plan.stored_bytes;
        view_source->will_need(store->data_fd(), record.offset, record.slot_size);
        load->units_left = plan.in_place.size();
        to_submit.mapped.push_back(load);
        break;
      case LoadPlan::Kind::kRegion:
        load->units_left = plan.in_place.size();
        load->reads_left_per_chunk = std::make_unique<std::atomic<uint32_t>[]>(plan.in_place.size());
        for (size_t k = 0; k < plan.in_place.size(); ++k) load->reads_left_per_chunk[k] = plan.reads_per_chunk[k];
        add_pieces(load, to_submit.reads);
        break;
      case LoadPlan::Kind::kChunks:
        load->units_left = plan.reads.size();
        add_pieces(load, to_submit.reads);
        break;
    }
    return load;
  }

  // For the host tier's next-use eviction: how many accesses after this one (of block `current`) each block is used
  // next, from the learned order; empty before the order is known (the tier then evicts nothing).
  HostTier::NextUse next_use_after(size_t current) {
    if (!prefetcher.order_known()) return {};
    auto [learned, where] = prefetcher.learned_order_and_position();  // positions; where: this access, if placed
    auto order = std::make_shared<const std::vector<size_t>>(std::move(learned));
    size_t from = where;
    if (from >= order->size() || (*order)[from] != position[current]) {  // not placed: its first occurrence
      const auto at = std::find(order->begin(), order->end(), position[current]);
      if (at == order->end()) return {};
      from = static_cast<size_t>(at - order->begin());
    }
    return [this, order, from](size_t block) -> std::optional<uint64_t> {
      const size_t n = order->size();
      for (size_t step = 1; step <= n; ++step) {
        if ((*order)[(from + step) % n] == position[block]) return step;
      }
      return std::nullopt;
    };
  }

  // Device slots, under `mutex`: orders this load's copies after the fences of earlier users of [begin, end).
  void wait_for_fences(const std::shared_ptr<LoadState>& load, uint64_t begin, uint64_t end) {
    auto overlapping = [&](const PendingFence& pending) { return pending.begin < end && begin < pending.end; };
    for (const PendingFence& pending : pending_fences) {
      if (!overlapping(pending)) continue;
      std::exception_ptr error;
      if (transfer->copy_stream_wait(*pending.fence, &error) < 0) load->set_error(error);
    }
    std::erase_if(pending_fences, overlapping);
  }

  // One piece per planned read: into the slot, or into a staging buffer leased when the read is dispatched.
  void add_pieces(const std::shared_ptr<LoadState>& load, std::vector<std::unique_ptr<QueuedRead>>& to_submit) {
    const bool region = load->plan.kind == LoadPlan::Kind::kRegion;
    for (size_t r = 0; r < load->plan.reads.size(); ++r) {
      const PlannedRead& read = load->plan.reads[r];
      auto piece = std::make_unique<Piece>();
      piece->load = load;
      piece->read_index = r;
      piece->request.fd = read.direct ? direct_fd.get() : store->data_fd();
      piece->request.offset = read.file_offset;
      if (read.staged) {
        piece->staged_length = read.length;
      } else {
        piece->request.buffer = load->data.subspan(read.slot_offset, read.length);
      }
      piece->block = static_cast<uint32_t>(load->block);
      if (!region) {  // a region read covers parts of several chunks: no one tensor/chunk
        piece->tensor = static_cast<int32_t>(read.tensor);
        piece->chunk = static_cast<int32_t>(read.chunk);
      }
      to_submit.push_back(std::move(piece));
    }
  }

  void submit(Submission work) {
    for (const std::shared_ptr<LoadState>& load : work.mapped) {
      for (size_t k = 0; k < load->plan.in_place.size(); ++k) {
        workers->post([this, load, k] { verify_in_place(load, k); });
      }
    }
    if (!work.reads.empty()) io->submit(std::move(work.reads));
  }

  // On the I/O queue's reaper thread (or, cancelled, on the thread shutting it down).
  void on_read_complete(std::unique_ptr<Piece> piece, int64_t result) {
    const std::shared_ptr<LoadState> load = piece->load;
    const PlannedRead& read = piece->planned();
    if (result < 0 || static_cast<uint64_t>(result) != read.length) {
      const int err = result < 0 ? static_cast<int>(-result) : EIO;
      std::string what = "read of block '" + manifest.blocks[load->block].name + "' at offset " +
                         std::to_string(read.file_offset);
      if (load->plan.kind == LoadPlan::Kind::kChunks) what += " (tensor '" + manifest.tensors[read.tensor].name + "')";
      if (err == ENODATA) what += " (unexpected end of file)";
      if (err == ENOMEM) what += " (no staging buffer could be allocated)";
      if (err == ECANCELED) {
        what += " (engine shutting down)";
      } else {
        stats.on_io_error();
      }
      load->set_error(std::make_exception_ptr(IoError(store->data_path(), err, what)));
      if (load->plan.kind == LoadPlan::Kind::kRegion) {
        region_read_done(load, read);  // the chunks it covers still count down; their jobs see the error and skip work
      } else {
        piece.reset();
        unit_finished(load);
      }
      return;
    }
    if (load->plan.kind == LoadPlan::Kind::kRegion) {
      load->stored_bytes += read.length;
      if (access == SlotAccess::kDeviceDirect) stats.on_direct_read(read.length);  // storage -> device, unverified
      piece.reset();
      region_read_done(load, read);
      return;
    }
    const ChunkRecord& chunk = manifest.chunks[manifest.tensors[read.tensor].first_chunk + read.chunk];
    load->stored_bytes += chunk.stored_size;  // the chunk's bytes, not the 4 KiB rounding of a direct read
    Piece* owned = piece.release();  // std::function needs a copyable callable: the job deletes it
    workers->post([this, owned] { process_chunk(std::unique_ptr<Piece>(owned)); });
  }

  // A region read is done (or failed): each chunk it completes is verified now, while the rest is still read.
  void region_read_done(const std::shared_ptr<LoadState>& load, const PlannedRead& read) {
    for (size_t k = read.first_chunk; k < read.last_chunk; ++k) {
      if (load->reads_left_per_chunk[k].fetch_sub(1) != 1) continue;
      if (config.verify_checksums) {
        workers->post([this, load, k] { verify_in_place(load, k); });
      } else {
        load->decoded_bytes += load->plan.in_place[k].size;  // raw chunks: stored size == raw size
        unit_finished(load);
      }
    }
  }

  // Workers: the chunk stage (chunk_stage.hpp), then the unit is done.
  void verify_in_place(const std::shared_ptr<LoadState>& load, size_t k) {
    stage->verify_in_place(*load, k);
    unit_finished(load);
  }

  void copy_from_tier(const std::shared_ptr<LoadState>& load) {
    stage->copy_from_tier(*load);
    unit_finished(load);
  }

  void process_chunk(std::unique_ptr<Piece> piece) {
    const std::shared_ptr<LoadState> load = piece->load;
    const PlannedRead& read = piece->planned();
    std::span<const std::byte> stored = piece->request.buffer;
    if (read.staged) {
      const ChunkRecord& chunk = manifest.chunks[manifest.tensors[read.tensor].first_chunk + read.chunk];
      stored = piece->staging.bytes().subspan(read.skip, chunk.stored_size);
    }
    stage->process(*load, read, stored, std::move(piece->staging));
    piece.reset();  // its staging lease (if the stage did not keep it for a copy) returns and may let a read go
    unit_finished(load);
  }

  void unit_finished(const std::shared_ptr<LoadState>& load) {
    if (load->units_left.fetch_sub(1) != 1) return;
    finish_load(load);
  }

  void finish_load(const std::shared_ptr<LoadState>& load) {
    bool ok = !load->failed();
    if (ok && !host_addressable(access)) {
      // Every copy of the block is queued: the event recorded now completes when they have. Nobody blocks here;
      // a consumer waits for the event on its stream (Ticket::wait_on_stream) or on the host (Ticket::wait).
      std::exception_ptr error;
      const TraceSpan span(trace, TraceKind::kTransfer, load->block, -1, -1, 0);  // the block's ready event
      load->ready = transfer->record_ready(&error);
      if (!load->ready) {
        load->set_error(error);
        ok = false;
      }
    }
    if (load->tier_fill) tier->commit(load->block, ok);
    const uint64_t elapsed = trace_now_ns() - load->start_ns;
    // Counted before the block leaves the loading state, so whoever sees nothing in flight sees these bytes.
    if (ok) stats.on_load_done(load->block, load->stored_bytes.load(), load->decoded_bytes.load(), elapsed);
    if (ok && load->mapped()) stats.add_io_busy_ns(elapsed);  // its bytes came in by page faults during the load
    std::vector<size_t> evicted;
    {
      std::lock_guard lock(mutex);
      evicted = to_store(residency.load_finished(position[load->block], ok));
      if (loads[load->block] == load) loads[load->block] = nullptr;
      if (load->mapped()) verified_view[load->block] = ok && config.verify_checksums ? load->data.data() : nullptr;
      if (ok && !block_ready.empty()) block_ready[load->block] = load->ready;
      if (!ok) prefetched_pending[load->block] = 0;
      ++progress;
    }
    if (ok && timing && load->copy_start && load->ready) {
      timing->loaded(load->block, load->copy_start, load->ready);  // device time, once the ready event completes
    } else if (ok) {
      prefetcher.on_load_time(position[load->block], elapsed);
    }
    {
      std::lock_guard lock(load->mutex);
      load->done = true;
    }
    load->done_cv.notify_all();
    room_cv.notify_all();
    handle_evictions(evicted);
  }
};

// ---- Ticket -------------------------------------------------------------------------------------------------------

EventRef Ticket::wait_for_load() const {
  if (!load_) return ready_;
  std::unique_lock lock(load_->mutex);
  if (!load_->done) {
    const uint64_t start = trace_now_ns();
    load_->done_cv.wait(lock, [&] { return load_->done; });
    const uint64_t end = trace_now_ns();
    if (engine_ != nullptr) {
      engine_->impl_->stats.on_wait(block_, end - start);
      TraceRecorder& trace = engine_->impl_->trace;
      if (trace.enabled()) {
        // The same start and end as the statistics: a trace's stalls add up to stall_time exactly.
        TraceEvent event;
        event.kind = TraceKind::kStall;
        event.start_ns = start;
        event.end_ns = end;
        event.block = static_cast<uint32_t>(block_);
        event.lane = current_thread_lane();
        trace.record(event);
      }
    }
  }
  if (load_->error) std::rethrow_exception(load_->error);
  ready_ = load_->ready;
  return ready_;
}

void Ticket::wait() const {
  const EventRef ready = wait_for_load();
  if (ready && engine_ != nullptr) engine_->impl_->transfer->synchronize(*ready);
}

void Ticket::wait_on_stream(uintptr_t stream) const {
  const EventRef ready = wait_for_load();
  if (!ready || engine_ == nullptr) return;
  Engine::Impl& impl = *engine_->impl_;
  // Timed events around the wait measure the stall where it happens, on the stream (the host does not wait).
  std::exception_ptr timing_error;  // a failed timing event costs the measurement, never the wait
  EventRef start = impl.transfer->record_timed(stream, &timing_error);
  std::exception_ptr error;
  if (impl.transfer->stream_wait(*ready, stream, &error) < 0) std::rethrow_exception(error);
  EventRef end = impl.transfer->record_timed(stream, &timing_error);  // the block's kernels start here
  if (impl.timing) impl.timing->waited(block_, std::move(start), std::move(end));
}

uintptr_t Ticket::ready_event() const noexcept { return ready_ ? ready_->native() : 0; }

bool Ticket::ready() const {
  if (!load_) return true;
  std::lock_guard lock(load_->mutex);
  return load_->done;
}

// ---- Engine -------------------------------------------------------------------------------------------------------

Engine::Engine(std::shared_ptr<const StoreReader> store, std::span<std::byte> arena, Config config,
               std::unique_ptr<IoBackend> backend, std::unique_ptr<Transfer> transfer,
               std::optional<std::vector<size_t>> blocks)
    : impl_(std::make_unique<Impl>(std::move(store), arena, config, std::move(backend), std::move(transfer),
                                   std::move(blocks))) {}

Engine::~Engine() = default;

Ticket Engine::acquire(size_t block) { return impl_->acquire(this, block); }
void Engine::release(size_t block, std::optional<uintptr_t> consumer_stream) {
  impl_->release(block, consumer_stream);
}
void Engine::prefetch(size_t block) { impl_->prefetch(block); }

void Engine::set_budget(uint64_t budget_bytes) {
  std::vector<size_t> evicted;
  {
    std::lock_guard lock(impl_->mutex);
    evicted = impl_->to_store(impl_->residency.set_budget(std::min<uint64_t>(budget_bytes, impl_->arena.size())));
    ++impl_->progress;
  }
  impl_->room_cv.notify_all();
  impl_->handle_evictions(evicted);
}

uint64_t Engine::budget_bytes() const { return impl_->residency.budget_bytes(); }
StatsSnapshot Engine::stats() const {
  if (impl_->timing) impl_->timing->resolve();
  StatsSnapshot snapshot = impl_->stats.snapshot();
  // Gauges come from the residency manager itself, never from a cached copy that a slower thread could overwrite.
  snapshot.resident_bytes = impl_->residency.resident_bytes();
  snapshot.in_flight_bytes = impl_->residency.in_flight_bytes();
  const StagingStats staging = impl_->staging->stats();
  snapshot.staging_bytes = staging.allocated_bytes;
  snapshot.staging_peak_in_use_bytes = staging.peak_in_use_bytes;
  const TransferStats copies = impl_->transfer->stats();
  snapshot.h2d_bytes = copies.bytes;
  snapshot.h2d_busy_ns = copies.busy_ns;
  if (impl_->tier) {
    snapshot.host_tier_held_bytes = impl_->tier->held_bytes();
    snapshot.host_tier_evictions = impl_->tier->evictions();
  }
  return snapshot;
}
void Engine::reset_stats() { impl_->stats.reset(); }

void Engine::set_eviction_callback(std::function<void(size_t)> callback) {
  auto shared = std::make_shared<const std::function<void(size_t)>>(std::move(callback));
  std::lock_guard lock(impl_->mutex);
  impl_->eviction_callback.swap(shared);
}

const StoreReader& Engine::store() const noexcept { return *impl_->store; }
const Config& Engine::config() const noexcept { return impl_->config; }
std::string Engine::backend_name() const { return impl_->backend->caps().name; }
const std::string& Engine::backend_fallback_reason() const noexcept { return impl_->fallback_reason; }
std::string_view Engine::page_cache_policy() const noexcept {
  if (impl_->zero_copy) return "mapped";
  if (!impl_->direct_fd) return "buffered";
  return impl_->fill_page_cache ? "fill" : "bypass";
}
SlotAccess Engine::slot_access() const noexcept { return impl_->access; }
std::string Engine::transfer_name() const { return impl_->transfer->name(); }
std::vector<size_t> Engine::learned_order() const { return impl_->to_store(impl_->prefetcher.learned_order()); }
uint32_t Engine::lookahead() const { return impl_->prefetcher.lookahead(); }
bool Engine::prefetch_off() const { return impl_->prefetcher.prefetch_off(); }
uint64_t Engine::prefetch_checks() const { return impl_->prefetcher.prefetch_checks(); }
uint64_t Engine::static_bytes() const { return impl_->residency.static_bytes(); }

void Engine::enable_tracing(size_t max_events) { impl_->trace.enable(max_events); }
void Engine::disable_tracing() noexcept { impl_->trace.disable(); }
bool Engine::tracing() const noexcept { return impl_->trace.enabled(); }
TraceBatch Engine::drain_trace() { return impl_->trace.drain(); }

}  // namespace tensorstream
