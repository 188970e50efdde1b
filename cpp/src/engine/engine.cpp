#include "tensorstream/engine/engine.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>

#include "io/mmap_backend.hpp"
#include "tensorstream/error.hpp"
#include "tensorstream/io/direct_io.hpp"
#include "tensorstream/residency/prefetcher.hpp"
#include "tensorstream/residency/residency_manager.hpp"

namespace tensorstream {

namespace {
uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

// A caller blocked this long without any load finishing or block being released is deadlocked (every slot is
// pinned by callers that wait themselves); failing loudly beats hanging forever.
constexpr auto kNoRoomTimeout = std::chrono::seconds(60);

// Maps the pages of `range` in one call (MADV_POPULATE_READ, Linux 5.14+) instead of one page fault per 4 KiB page
// when the checksum first touches them; on older kernels the call fails and the faults happen as before.
void prefault(std::span<const std::byte> range) {
#ifndef MADV_POPULATE_READ
  constexpr int MADV_POPULATE_READ = 22;
#endif
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(range.data()) / page * page;
  const auto end = reinterpret_cast<uintptr_t>(range.data()) + range.size();
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_READ);
}

// AUTO maps a block instead of reading it when at least this share of its pages is in the page cache (the same
// threshold as the O_DIRECT decision: below it, reading directly beats faulting pages in one by one).
constexpr double kWarmFraction = 0.5;
}  // namespace

namespace detail {

// One load of one block into its slot. Shared by the engine and every ticket waiting for it.
struct LoadState {
  size_t block = 0;
  std::span<std::byte> data;
  bool prefetched = false;
  uint64_t start_ns = 0;
  std::atomic<size_t> units_left{0};  // chunks not yet verified / decoded (or, for an empty block, 1)

  // All-raw blocks: chunks in file order, where each lies in the slot, and how many of the region reads that cover
  // each chunk are still outstanding: a chunk is verified as soon as its own bytes have arrived, while the rest of
  // the block is still being read.
  struct RegionChunk {
    size_t tensor = 0;
    size_t chunk = 0;
    uint64_t begin = 0;  // relative to the block's offset (== slot offset)
    uint64_t size = 0;
  };
  std::vector<RegionChunk> region_chunks;
  std::unique_ptr<std::atomic<uint32_t>[]> reads_left_per_chunk;
  std::vector<std::pair<size_t, size_t>> chunks_of_read;  // per region read: [first, last) into region_chunks
  bool mapped = false;  // data is a view of the file mapping, not a slot of the arena
  std::atomic<uint64_t> stored_bytes{0};
  std::atomic<uint64_t> decoded_bytes{0};

  std::mutex mutex;
  std::condition_variable done_cv;
  bool done = false;
  std::exception_ptr error;

  void set_error(std::exception_ptr e) {
    std::lock_guard lock(mutex);
    if (!error) error = std::move(e);  // the first error is the cause; later ones are consequences
  }
  bool failed() {
    std::lock_guard lock(mutex);
    return error != nullptr;
  }
};

}  // namespace detail

using detail::LoadState;

struct Engine::Impl {
  // One read submitted to the backend.
  struct Piece {
    enum class Kind : uint8_t { kRegion, kChunk };
    std::shared_ptr<LoadState> load;
    Kind kind = Kind::kRegion;
    ReadRequest request;
    std::vector<std::byte> staging;  // stored bytes of a compressed chunk (or any chunk of a non-host slot)
    size_t tensor = 0;
    size_t chunk = 0;
    size_t region_read = 0;  // kRegion: index into LoadState::chunks_of_read
    int32_t io_lane = -1;    // tracing: the I/O lane this read holds while in flight (-1: not traced)
    uint64_t submit_ns = 0;  // tracing: when it was handed to the backend
  };

  std::shared_ptr<const StoreReader> store;
  const Manifest& manifest;
  std::span<std::byte> arena;
  Config config;
  std::unique_ptr<IoBackend> backend;
  std::string fallback_reason;
  std::unique_ptr<Transfer> transfer;
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
  bool zero_copy = false;  // the backend itself maps the file: every raw block is a view, never a copy
  // AUTO with host slots: a second, mapping backend for blocks already in the page cache. Reading those would only
  // copy memory to memory; a view of the page cache costs no copy at all (cold blocks are still read, directly).
  std::unique_ptr<IoBackend> mapper;
  std::vector<std::span<std::byte>> block_data;  // where each resident or loading block's bytes are (under `mutex`)
  std::vector<uint8_t> block_mapped;             // 1 when block_data is a view of the file mapping (under `mutex`)

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

  // I/O submission (bounded by queue_depth) and completion reaping.
  std::mutex io_mutex;
  std::condition_variable io_cv;
  size_t io_in_flight = 0;
  std::deque<Piece*> io_pending;
  std::vector<uint8_t> io_lane_busy;  // tracing: 1 while a traced read holds the lane (under `io_mutex`)
  bool stopping = false;
  std::thread reaper;

  // Verify / decode workers.
  std::mutex job_mutex;
  std::condition_variable job_cv;
  std::deque<std::function<void()>> jobs;
  bool jobs_stopping = false;
  std::vector<std::thread> workers;

  Impl(std::shared_ptr<const StoreReader> store_in, std::span<std::byte> arena_in, Config config_in,
       std::unique_ptr<IoBackend> backend_in, std::unique_ptr<Transfer> transfer_in,
       std::optional<std::vector<size_t>> blocks_in)
      : store(std::move(store_in)),
        manifest(store->manifest()),
        arena(arena_in),
        config(validated(config_in)),
        backend(std::move(backend_in)),
        transfer(transfer_in ? std::move(transfer_in) : make_host_transfer()),
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
    if (!backend) {
      BackendOptions options;
      options.kind = config.backend;
      options.num_threads = config.num_io_threads;
      options.queue_depth = config.queue_depth;
      backend = make_backend(options, &fallback_reason);
    }
    zero_copy = backend->caps().zero_copy_views && transfer->host_addressable_slots();
    if (config.backend == BackendKind::kAuto && config.direct_io == DirectIoMode::kAuto && !zero_copy &&
        transfer->host_addressable_slots()) {
      mapper = detail::make_mmap_backend();
    }
    block_data.resize(manifest.blocks.size());
    block_mapped.resize(manifest.blocks.size(), 0);
    open_direct_fd();
    reaper = std::thread([this] { reap_loop(); });
    for (uint32_t i = 0; i < config.num_io_threads; ++i) {
      workers.emplace_back([this, i] {
        set_current_thread_lane({TraceLaneKind::kWorker, i});  // what this thread records shows as "worker i"
        work_loop();
      });
    }
  }

  ~Impl() {
    std::deque<Piece*> cancelled;
    {
      std::lock_guard lock(io_mutex);
      stopping = true;
      cancelled.swap(io_pending);
    }
    // Reads not yet handed to the backend are cancelled; those in flight complete normally.
    for (Piece* piece : cancelled) {
      piece->load->set_error(std::make_exception_ptr(IoError(store->data_path(), ECANCELED, "read (engine shutting down)")));
      piece_finished(piece);
    }
    io_cv.notify_all();
    if (reaper.joinable()) reaper.join();
    {
      std::lock_guard lock(job_mutex);
      jobs_stopping = true;
    }
    job_cv.notify_all();
    for (auto& worker : workers) worker.join();
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

  void open_direct_fd() {
    if (config.direct_io == DirectIoMode::kOff || zero_copy || !transfer->host_addressable_slots()) return;
    // Direct reads land in slots, which are 4 KiB aligned relative to the arena: the arena itself must be too.
    if (reinterpret_cast<uintptr_t>(arena.data()) % kDirectIoAlignment != 0) return;
    if (!direct_io_supported(store->data_path().c_str())) return;
    const int fd = ::open(store->data_path().c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd >= 0) direct_fd = UniqueFd(fd);
  }

  // ---- acquiring ------------------------------------------------------------------------------------------------

  Ticket acquire(Engine* engine, size_t block) {
    check_block(block);
    std::vector<Piece*> to_submit;
    Ticket ticket;
    ticket.block_ = block;
    ticket.engine_ = engine;
    std::unique_lock lock(mutex);
    const auto deadline = std::chrono::steady_clock::now() + kNoRoomTimeout;
    for (;;) {
      ResidencyManager::Decision decision = residency.acquire(position[block]);
      const bool prefetched = prefetched_pending[block] != 0;
      if (decision.action == ResidencyManager::Action::kNoRoom) {
        const uint64_t seen = progress;
        if (!room_cv.wait_until(lock, deadline, [&] { return progress != seen; })) {
          throw ConfigError("budget", "no slot for block '" + manifest.blocks[block].name +
                                          "' within 60 s: every slot is pinned; release blocks or raise the budget");
        }
        continue;
      }
      acquired_at_ns[block] = now_ns();
      prefetched_pending[block] = 0;
      std::vector<size_t> evicted = to_store(std::move(decision.evicted));
      switch (decision.action) {
        case ResidencyManager::Action::kHit:
          ticket.data_ = block_data[block];
          stats.on_acquire(block, /*hit=*/true, prefetched);
          break;
        case ResidencyManager::Action::kInFlight:
          ticket.load_ = loads[block];
          ticket.data_ = ticket.load_->data;
          stats.on_acquire(block, /*hit=*/false, prefetched);
          break;
        case ResidencyManager::Action::kLoad:
          ticket.load_ = start_load(block, decision.slot_offset, /*prefetched=*/false, to_submit);
          ticket.data_ = ticket.load_->data;
          stats.on_acquire(block, /*hit=*/false, /*prefetched=*/false);
          break;
        case ResidencyManager::Action::kNoRoom:
          break;
      }
      lock.unlock();
      if (!to_submit.empty()) submit(to_submit);
      handle_evictions(evicted);
      run_prefetcher(block);
      return ticket;
    }
  }

  void release(size_t block) {
    check_block(block);
    uint64_t started = 0;
    std::vector<size_t> evicted;  // non-empty only when the budget shrank below what pinned blocks held
    {
      std::lock_guard lock(mutex);
      started = acquired_at_ns[block];
      evicted = to_store(residency.release(position[block]));
      ++progress;
    }
    room_cv.notify_all();
    handle_evictions(evicted);
    if (started != 0) prefetcher.on_compute_time(position[block], now_ns() - started);
  }

  void prefetch(size_t block) {
    check_block(block);
    std::vector<size_t> evicted;
    std::vector<Piece*> to_submit;
    {
      std::lock_guard lock(mutex);
      ResidencyManager::Decision decision = residency.prefetch(position[block]);
      if (decision.action == ResidencyManager::Action::kLoad) {
        prefetched_pending[block] = 1;
        (void)start_load(block, decision.slot_offset, /*prefetched=*/true, to_submit);
        stats.on_prefetch_issued();
      }
      evicted = to_store(std::move(decision.evicted));
    }
    if (!to_submit.empty()) submit(to_submit);
    handle_evictions(evicted);
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

  // Called with `mutex` held. Creates the load and returns it; its reads go to `to_submit`, which the caller
  // submits after unlocking (a submit may finish a load, which takes `mutex`).
  std::shared_ptr<LoadState> start_load(size_t block, uint64_t slot_offset, bool prefetched,
                                        std::vector<Piece*>& to_submit) {
    const BlockRecord& record = manifest.blocks[block];
    auto load = std::make_shared<LoadState>();
    load->block = block;
    load->prefetched = prefetched;
    load->start_ns = now_ns();
    loads[block] = load;

    IoBackend* view_source = nullptr;
    if (record.all_raw && zero_copy) {
      view_source = backend.get();
    } else if (record.all_raw && mapper &&
               page_cache_fraction(store->data_fd(), record.offset, record.slot_size) >= kWarmFraction) {
      view_source = mapper.get();
    }
    if (view_source != nullptr) {
      const auto view = view_source->view(store->data_fd(), record.offset, record.slot_size);
      load->data = {const_cast<std::byte*>(view.data()), view.size()};  // a copy-on-write private mapping
      load->mapped = true;
      block_data[block] = load->data;
      block_mapped[block] = 1;
      load->stored_bytes += record.end - record.offset;  // read by page faults while verifying
      view_source->will_need(store->data_fd(), record.offset, record.slot_size);
      // No read: the mapping is the slot. Verification touches (and so faults in) every page.
      build_region_chunks(load, 0);
      if (load->region_chunks.empty()) {
        load->units_left = 1;
        enqueue_job([this, load] { unit_finished(load); });
        return load;
      }
      load->units_left = load->region_chunks.size();
      for (size_t k = 0; k < load->region_chunks.size(); ++k) {
        enqueue_job([this, load, k] { verify_region_chunk(load, k); });
      }
      return load;
    }
    load->data = arena.subspan(slot_offset, record.slot_size);
    block_data[block] = load->data;

    std::vector<Piece*> pieces;
    if (record.all_raw && transfer->host_addressable_slots()) {
      // The file region is the slot layout: read it in chunk-sized, 4 KiB aligned pieces straight into the slot.
      const uint64_t length = align_up(record.end - record.offset, kBlockAlignment);
      const bool direct = direct_fd && should_read_direct(config.direct_io, store->data_fd(), record.offset, length);
      const int fd = direct ? direct_fd.get() : store->data_fd();
      for (uint64_t done = 0; done < length; done += manifest.chunk_size) {
        auto* piece = new Piece;
        piece->load = load;
        piece->kind = Piece::Kind::kRegion;
        piece->region_read = pieces.size();
        const uint64_t size = std::min<uint64_t>(manifest.chunk_size, length - done);
        piece->request = ReadRequest{fd, record.offset + done, load->data.subspan(done, size), 0};
        pieces.push_back(piece);
      }
      build_region_chunks(load, pieces.size());
      load->units_left = load->region_chunks.size();
    } else {
      for (size_t t = record.first_tensor; t < record.first_tensor + record.tensor_count; ++t) {
        const TensorRecord& tensor = manifest.tensors[t];
        for (size_t c = 0; c < tensor.chunk_count; ++c) {
          const ChunkRecord& chunk = manifest.chunks[tensor.first_chunk + c];
          auto* piece = new Piece;
          piece->load = load;
          piece->kind = Piece::Kind::kChunk;
          piece->tensor = t;
          piece->chunk = c;
          std::span<std::byte> target;
          if (chunk.codec == Codec::kRaw && transfer->host_addressable_slots()) {
            target = load->data.subspan(tensor.slot_offset + c * manifest.chunk_size, chunk.stored_size);
          } else {
            piece->staging.resize(chunk.stored_size);
            target = piece->staging;
          }
          piece->request = ReadRequest{store->data_fd(), chunk.offset, target, 0};
          pieces.push_back(piece);
        }
      }
      load->units_left = pieces.size();
    }
    if (pieces.empty() || load->units_left == 0) {
      for (Piece* piece : pieces) delete piece;
      load->units_left = 1;
      enqueue_job([this, load] { unit_finished(load); });  // a block of empty tensors is ready at once
      return load;
    }
    for (Piece* piece : pieces) piece->request.user_data = reinterpret_cast<uint64_t>(piece);
    to_submit.insert(to_submit.end(), pieces.begin(), pieces.end());
    return load;
  }

  void submit(const std::vector<Piece*>& pieces) {
    std::vector<ReadRequest> batch;
    std::vector<Piece*> cancelled;
    {
      std::lock_guard lock(io_mutex);
      const bool tracing = trace.enabled();
      const uint64_t submit_ns = tracing ? trace_now_ns() : 0;  // after the lock: see assign_io_lane
      for (Piece* piece : pieces) {
        if (stopping) {
          cancelled.push_back(piece);
          continue;
        }
        if (io_in_flight < config.queue_depth) {
          if (io_in_flight == 0) stats.on_io_started(now_ns());
          ++io_in_flight;
          if (tracing) assign_io_lane(*piece, submit_ns);
          batch.push_back(piece->request);
        } else {
          io_pending.push_back(piece);
        }
      }
      if (!batch.empty()) backend->submit(batch);
    }
    io_cv.notify_all();
    for (Piece* piece : cancelled) {
      piece->load->set_error(std::make_exception_ptr(IoError(store->data_path(), ECANCELED, "read (engine shutting down)")));
      piece_finished(piece);
    }
  }

  void reap_loop() {
    std::vector<Completion> completions(64);
    for (;;) {
      {
        std::unique_lock lock(io_mutex);
        io_cv.wait(lock, [&] { return io_in_flight > 0 || stopping; });
        if (io_in_flight == 0 && stopping) return;
      }
      const size_t count = backend->reap(completions, /*wait=*/true);
      for (size_t i = 0; i < count; ++i) {
        Piece* piece = reinterpret_cast<Piece*>(completions[i].user_data);
        std::vector<ReadRequest> next;
        TraceEvent read_event;
        bool traced = false;
        {
          std::lock_guard lock(io_mutex);
          if (piece->io_lane >= 0) {  // read under io_mutex, where the submitter wrote it
            read_event = read_trace_event(*piece, completions[i].result);
            io_lane_busy[static_cast<size_t>(piece->io_lane)] = 0;  // after the end time: lanes never overlap
            traced = true;
          }
          --io_in_flight;
          if (!io_pending.empty() && !stopping) {
            ++io_in_flight;
            Piece* queued = io_pending.front();
            io_pending.pop_front();
            if (trace.enabled()) assign_io_lane(*queued, trace_now_ns());
            next.push_back(queued->request);
            backend->submit(next);
          }
          if (io_in_flight == 0) stats.on_io_idle(now_ns());
        }
        if (traced) trace.record(read_event);
        on_read_complete(piece, completions[i].result);
      }
      if (count > 0) io_cv.notify_all();
    }
  }

  // Tracing, under io_mutex: gives a read about to be handed to the backend the lowest free I/O lane. A lane is
  // freed only after its read's end time was taken, and taken again only with a start time read after that (both
  // under io_mutex), so the reads of one lane never overlap. At most queue_depth reads are in flight, so a lane is
  // always free; were none, the read would simply go untraced.
  void assign_io_lane(Piece& piece, uint64_t submit_ns) {
    if (io_lane_busy.size() < config.queue_depth) io_lane_busy.resize(config.queue_depth, 0);
    for (size_t lane = 0; lane < io_lane_busy.size(); ++lane) {
      if (io_lane_busy[lane] == 0) {
        io_lane_busy[lane] = 1;
        piece.io_lane = static_cast<int32_t>(lane);
        piece.submit_ns = submit_ns;
        return;
      }
    }
  }

  // The read event of a traced piece that just completed (`result`: bytes read or -errno).
  TraceEvent read_trace_event(const Piece& piece, int64_t result) const {
    TraceEvent event;
    event.kind = TraceKind::kRead;
    event.start_ns = piece.submit_ns;
    event.end_ns = std::max(trace_now_ns(), piece.submit_ns);
    event.bytes = result > 0 ? static_cast<uint64_t>(result) : 0;
    event.block = static_cast<uint32_t>(piece.load->block);
    if (piece.kind == Piece::Kind::kChunk) {  // a region read covers parts of several chunks: no one tensor/chunk
      event.tensor = static_cast<int32_t>(piece.tensor);
      event.chunk = static_cast<int32_t>(piece.chunk);
    }
    event.lane = {TraceLaneKind::kIo, static_cast<uint32_t>(piece.io_lane)};
    return event;
  }

  void on_read_complete(Piece* piece, int64_t result) {
    const std::shared_ptr<LoadState> load = piece->load;
    const uint64_t expected = piece->request.buffer.size();
    if (result < 0 || static_cast<uint64_t>(result) != expected) {
      const int err = result < 0 ? static_cast<int>(-result) : EIO;
      std::string what = "read of block '" + manifest.blocks[load->block].name + "' at offset " +
                         std::to_string(piece->request.offset);
      if (piece->kind == Piece::Kind::kChunk) what += " (tensor '" + manifest.tensors[piece->tensor].name + "')";
      if (err == ENODATA) what += " (unexpected end of file)";
      load->set_error(std::make_exception_ptr(IoError(store->data_path(), err, what)));
      stats.on_io_error();
      piece_finished(piece);
      return;
    }
    load->stored_bytes += expected;
    if (piece->kind == Piece::Kind::kRegion) {
      region_read_done(piece);
      return;
    }
    enqueue_job([this, piece] { process_chunk(piece); });
  }

  // A read that ends without a verification job (error or cancellation).
  void piece_finished(Piece* piece) {
    if (piece->kind == Piece::Kind::kRegion) {
      region_read_done(piece);  // the chunks it covers still count down; their jobs see the error and skip work
      return;
    }
    const std::shared_ptr<LoadState> load = piece->load;
    delete piece;
    unit_finished(load);
  }

  // Lists the chunks of an all-raw block in file order and, for `reads` region reads of chunk_size bytes each,
  // which chunks each read covers and how many reads each chunk waits for.
  void build_region_chunks(const std::shared_ptr<LoadState>& load, size_t reads) {
    const BlockRecord& record = manifest.blocks[load->block];
    for (size_t t = record.first_tensor; t < record.first_tensor + record.tensor_count; ++t) {
      const TensorRecord& tensor = manifest.tensors[t];
      for (size_t c = 0; c < tensor.chunk_count; ++c) {
        const ChunkRecord& chunk = manifest.chunks[tensor.first_chunk + c];
        load->region_chunks.push_back({t, c, chunk.offset - record.offset, chunk.stored_size});
      }
    }
    const size_t count = load->region_chunks.size();
    load->reads_left_per_chunk = std::make_unique<std::atomic<uint32_t>[]>(count);
    load->chunks_of_read.assign(reads, {count, 0});
    const uint64_t read_size = manifest.chunk_size;
    for (size_t k = 0; k < count; ++k) {
      const auto& chunk = load->region_chunks[k];
      const size_t first = chunk.begin / read_size;
      const size_t last = (chunk.begin + chunk.size - 1) / read_size;
      load->reads_left_per_chunk[k] = static_cast<uint32_t>(last - first + 1);
      for (size_t r = first; r <= last && r < reads; ++r) {
        load->chunks_of_read[r].first = std::min(load->chunks_of_read[r].first, k);
        load->chunks_of_read[r].second = std::max(load->chunks_of_read[r].second, k + 1);
      }
    }
  }

  void region_read_done(Piece* piece) {
    const std::shared_ptr<LoadState> load = piece->load;
    const auto [first, last] = load->chunks_of_read[piece->region_read];
    delete piece;
    for (size_t k = first; k < last; ++k) {
      if (load->reads_left_per_chunk[k].fetch_sub(1) == 1) {
        if (config.verify_checksums) {
          enqueue_job([this, load, k] { verify_region_chunk(load, k); });
        } else {
          load->decoded_bytes += manifest.chunks[manifest.tensors[load->region_chunks[k].tensor].first_chunk +
                                                 load->region_chunks[k].chunk].raw_size;
          unit_finished(load);
        }
      }
    }
  }

  // Verifies one chunk of an all-raw block in place (in the slot, or in the mapping with mmap).
  void verify_region_chunk(const std::shared_ptr<LoadState>& load, size_t k) {
    const auto& entry = load->region_chunks[k];
    try {
      if (!load->failed()) {
        if (load->mapped) {
          // A mapped block is not read: its pages come in here, so this is its read in the trace.
          const TraceSpan span(trace, TraceKind::kRead, load->block, static_cast<int64_t>(entry.tensor),
                               static_cast<int64_t>(entry.chunk), entry.size);
          prefault(load->data.subspan(entry.begin, entry.size));
        }
        if (config.verify_checksums) {
          const TraceSpan span(trace, TraceKind::kVerify, load->block, static_cast<int64_t>(entry.tensor),
                               static_cast<int64_t>(entry.chunk), entry.size);
          store->check_chunk(entry.tensor, entry.chunk, load->data.subspan(entry.begin, entry.size));
        }
        load->decoded_bytes += entry.size;  // raw chunks: stored size == raw size
      }
    } catch (const CorruptionError&) {
      stats.on_checksum_failure();
      load->set_error(std::current_exception());
    } catch (...) {
      load->set_error(std::current_exception());
    }
    unit_finished(load);
  }

  void process_chunk(Piece* piece) {
    const std::shared_ptr<LoadState> load = piece->load;
    try {
      if (!load->failed()) {
        const TensorRecord& tensor = manifest.tensors[piece->tensor];
        const ChunkRecord& chunk = manifest.chunks[tensor.first_chunk + piece->chunk];
        const std::span<const std::byte> stored = piece->request.buffer;
        const auto tensor_index = static_cast<int64_t>(piece->tensor);
        const auto chunk_index = static_cast<int64_t>(piece->chunk);
        if (config.verify_checksums) {
          const TraceSpan span(trace, TraceKind::kVerify, load->block, tensor_index, chunk_index, stored.size());
          store->check_chunk(piece->tensor, piece->chunk, stored);
        }
        const uint64_t slot_offset = tensor.slot_offset + piece->chunk * manifest.chunk_size;
        if (transfer->host_addressable_slots()) {
          if (chunk.codec != Codec::kRaw) {
            thread_local std::vector<std::byte> scratch;
            const TraceSpan span(trace, TraceKind::kDecompress, load->block, tensor_index, chunk_index, chunk.raw_size);
            store->decode_chunk(piece->tensor, piece->chunk, stored, load->data.subspan(slot_offset, chunk.raw_size),
                                scratch);
          }
        } else {
          thread_local std::vector<std::byte> decoded;
          thread_local std::vector<std::byte> scratch;
          std::span<const std::byte> bytes = stored;
          if (chunk.codec != Codec::kRaw) {
            decoded.resize(chunk.raw_size);
            const TraceSpan span(trace, TraceKind::kDecompress, load->block, tensor_index, chunk_index, chunk.raw_size);
            store->decode_chunk(piece->tensor, piece->chunk, stored, decoded, scratch);
            bytes = decoded;
          }
          const TraceSpan span(trace, TraceKind::kTransfer, load->block, tensor_index, chunk_index, bytes.size());
          transfer->copy_to_slot(bytes, load->data, slot_offset);
        }
        load->decoded_bytes += chunk.raw_size;
      }
    } catch (const CorruptionError&) {
      stats.on_checksum_failure();
      load->set_error(std::current_exception());
    } catch (...) {
      load->set_error(std::current_exception());
    }
    delete piece;
    unit_finished(load);
  }

  void unit_finished(const std::shared_ptr<LoadState>& load) {
    if (load->units_left.fetch_sub(1) != 1) return;
    finish_load(load);
  }

  void finish_load(const std::shared_ptr<LoadState>& load) {
    bool ok = !load->failed();
    if (ok && !transfer->host_addressable_slots()) {
      try {
        const TraceSpan span(trace, TraceKind::kTransfer, load->block, -1, -1, 0);  // the block's copies complete
        transfer->finish_slot(load->data);
      } catch (...) {
        load->set_error(std::current_exception());
        ok = false;
      }
    }
    const uint64_t elapsed = now_ns() - load->start_ns;
    // Counted before the block leaves the loading state, so whoever sees nothing in flight sees these bytes.
    if (ok) stats.on_load_done(load->block, load->stored_bytes.load(), load->decoded_bytes.load(), elapsed);
    if (ok && load->mapped) stats.add_io_busy_ns(elapsed);  // its bytes came in by page faults during the load
    std::vector<size_t> evicted;
    {
      std::lock_guard lock(mutex);
      evicted = to_store(residency.load_finished(position[load->block], ok));
      if (loads[load->block] == load) loads[load->block] = nullptr;
      if (!ok) prefetched_pending[load->block] = 0;
      ++progress;
    }
    if (ok) prefetcher.on_load_time(position[load->block], elapsed);
    {
      std::lock_guard lock(load->mutex);
      load->done = true;
    }
    load->done_cv.notify_all();
    room_cv.notify_all();
    handle_evictions(evicted);
  }

  // ---- workers --------------------------------------------------------------------------------------------------

  void enqueue_job(std::function<void()> job) {
    {
      std::lock_guard lock(job_mutex);
      jobs.push_back(std::move(job));
    }
    job_cv.notify_one();
  }

  void work_loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock lock(job_mutex);
        job_cv.wait(lock, [&] { return !jobs.empty() || jobs_stopping; });
        if (jobs.empty()) return;  // stopping, and nothing left to finish
        job = std::move(jobs.front());
        jobs.pop_front();
      }
      job();  // never throws: jobs record errors in their load
    }
  }
};

// ---- Ticket -------------------------------------------------------------------------------------------------------

void Ticket::wait() const {
  if (!load_) return;
  std::unique_lock lock(load_->mutex);
  if (!load_->done) {
    const uint64_t start = now_ns();
    load_->done_cv.wait(lock, [&] { return load_->done; });
    const uint64_t end = now_ns();
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
}

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
void Engine::release(size_t block) { impl_->release(block); }
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
  StatsSnapshot snapshot = impl_->stats.snapshot();
  // Gauges come from the residency manager itself, never from a cached copy that a slower thread could overwrite.
  snapshot.resident_bytes = impl_->residency.resident_bytes();
  snapshot.in_flight_bytes = impl_->residency.in_flight_bytes();
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
std::vector<size_t> Engine::learned_order() const { return impl_->to_store(impl_->prefetcher.learned_order()); }
uint32_t Engine::lookahead() const { return impl_->prefetcher.lookahead(); }
uint64_t Engine::static_bytes() const { return impl_->residency.static_bytes(); }

void Engine::enable_tracing(size_t max_events) { impl_->trace.enable(max_events); }
void Engine::disable_tracing() noexcept { impl_->trace.disable(); }
bool Engine::tracing() const noexcept { return impl_->trace.enabled(); }
TraceBatch Engine::drain_trace() { return impl_->trace.drain(); }

}  // namespace tensorstream
