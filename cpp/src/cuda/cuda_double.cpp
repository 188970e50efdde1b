#include "tensorstream/cuda/cuda_double.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>

#include <unistd.h>

namespace tensorstream {

namespace {
constexpr CuResult kCudaErrorNotInitialized = 3;

struct ErrorEntry {
  CuResult code;
  const char* name;
  const char* text;
};
constexpr ErrorEntry kErrors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
};
}  // namespace

struct CudaDouble::State {
  struct Event {
    uint64_t recorded = 0;   // generation of the latest cuEventRecord
    uint64_t completed = 0;  // generation its stream has reached
    bool timing = true;      // created without CU_EVENT_DISABLE_TIMING
    std::chrono::steady_clock::time_point completed_at;
  };
  struct Op {
    enum class Kind : uint8_t { kCopy, kComplete, kWait, kHostFunc, kKernel } kind = Kind::kCopy;
    CuDevicePtr destination = 0;
    const void* source = nullptr;
    size_t bytes = 0;
    std::chrono::microseconds latency{0};
    std::shared_ptr<Event> event;
    uint64_t generation = 0;
    CuHostFn function = nullptr;
    void* user_data = nullptr;
    std::function<void()> kernel;
  };
  struct Stream {
    std::deque<Op> ops;  // the front one runs; popped once it has
    bool stopping = false;
    std::thread thread;
  };

  CudaDoubleOptions options;
  std::mutex mutex;
  std::condition_variable changed;  // any op finished, any event completed, any op queued
  bool initialized = false;
  std::vector<int> devices;         // a primary context is the address of its entry
  std::vector<int> retained;
  std::unordered_map<std::thread::id, CuContext> current;
  std::map<Stream*, std::unique_ptr<Stream>> streams;
  Stream* default_stream = nullptr;
  std::map<Event*, std::shared_ptr<Event>> events;
  std::map<void*, size_t> pinned;
  std::map<void*, size_t> device;  // cuMemAlloc: host memory standing in for device memory
  std::map<std::string, CuResult> failures;
  std::vector<CudaDoubleOp> log;
  // cuFile emulation.
  bool cufile_open = false;
  std::map<CuFileHandle, int> file_handles;  // handle -> fd
  std::map<const std::byte*, size_t> registered;
  uint64_t cufile_reads = 0;
  uint64_t cufile_unregistered = 0;
  int next_handle = 1;
  uint64_t sequence = 0;
  std::mt19937_64 rng;

  explicit State(CudaDoubleOptions options_in)
      : options(options_in), devices(static_cast<size_t>(std::max(0, options_in.device_count)), 0),
        retained(devices.size(), 0), rng(options_in.seed) {}

  // Under mutex.
  CuResult take_failure(const std::string& call) {
    const auto it = failures.find(call);
    if (it == failures.end()) return kCudaSuccess;
    const CuResult result = it->second;
    failures.erase(it);
    return result;
  }
  CuResult need_context() {
    if (!initialized) return kCudaErrorNotInitialized;
    const auto it = current.find(std::this_thread::get_id());
    return it == current.end() || it->second == nullptr ? kCudaErrorInvalidContext : kCudaSuccess;
  }
  Stream* find_stream(CuStream handle) {
    if (handle == nullptr) {
      if (default_stream == nullptr) default_stream = start_stream();
      return default_stream;
    }
    const auto it = streams.find(static_cast<Stream*>(handle));
    return it == streams.end() ? nullptr : it->second.get();
  }
  std::shared_ptr<Event> find_event(CuEvent handle) {
    const auto it = events.find(static_cast<Event*>(handle));
    return it == events.end() ? nullptr : it->second;
  }
  Stream* start_stream() {
    auto stream = std::make_unique<Stream>();
    Stream* raw = stream.get();
    streams.emplace(raw, std::move(stream));
    raw->thread = std::thread([this, raw] { run(*raw); });
    return raw;
  }
  void push(Stream& stream, Op op) {
    stream.ops.push_back(std::move(op));
    changed.notify_all();
  }
  void record_log(const char* kind, const Stream& stream, const Op& op) {
    log.push_back({kind, reinterpret_cast<uintptr_t>(&stream), reinterpret_cast<uintptr_t>(op.event.get()), op.bytes,
                   sequence++});
  }

  // A stream's worker: runs its ops in order.
  void run(Stream& stream) {
    std::unique_lock lock(mutex);
    for (;;) {
      changed.wait(lock, [&] { return !stream.ops.empty() || stream.stopping; });
      if (stream.ops.empty()) return;
      Op& op = stream.ops.front();
      switch (op.kind) {
        case Op::Kind::kCopy: {
          const auto latency = op.latency;
          lock.unlock();
          if (latency.count() > 0) std::this_thread::sleep_for(latency);
          std::memcpy(reinterpret_cast<void*>(static_cast<uintptr_t>(op.destination)), op.source, op.bytes);
          lock.lock();
          record_log("copy", stream, op);
          break;
        }
        case Op::Kind::kComplete:
          op.event->completed = std::max(op.event->completed, op.generation);
          op.event->completed_at = std::chrono::steady_clock::now();
          record_log("record", stream, op);
          break;
        case Op::Kind::kWait:
          changed.wait(lock, [&] { return op.event->completed >= op.generation; });
          record_log("wait", stream, op);
          break;
        case Op::Kind::kHostFunc: {
          const CuHostFn function = op.function;
          void* data = op.user_data;
          lock.unlock();
          function(data);
          lock.lock();
          record_log("host_func", stream, op);
          break;
        }
        case Op::Kind::kKernel: {
          std::function<void()> kernel = std::move(op.kernel);
          lock.unlock();
          kernel();
          lock.lock();
          record_log("kernel", stream, op);
          break;
        }
      }
      stream.ops.pop_front();
      changed.notify_all();
    }
  }

  // Waits for the stream's work, then stops its worker. Under `lock`.
  void stop(std::unique_lock<std::mutex>& lock, Stream& stream) {
    changed.wait(lock, [&] { return stream.ops.empty(); });
    stream.stopping = true;
    changed.notify_all();
    lock.unlock();
    stream.thread.join();
    lock.lock();
  }
};

CudaDouble::CudaDouble(CudaDoubleOptions options) : state_(std::make_unique<State>(options)) {}

CudaDouble::~CudaDouble() {
  std::unique_lock lock(state_->mutex);
  while (!state_->streams.empty()) {
    auto it = state_->streams.begin();
    state_->stop(lock, *it->second);
    state_->streams.erase(it);
  }
  for (const auto& [pointer, bytes] : state_->pinned) std::free(pointer);
  for (const auto& [pointer, bytes] : state_->device) std::free(pointer);
}

void CudaDouble::fail_next(const std::string& call, CuResult result) {
  const std::lock_guard lock(state_->mutex);
  state_->failures[call] = result;
}

std::vector<CudaDoubleOp> CudaDouble::log() const {
  const std::lock_guard lock(state_->mutex);
  return state_->log;
}

uint64_t CudaDouble::pinned_bytes() const {
  const std::lock_guard lock(state_->mutex);
  uint64_t total = 0;
  for (const auto& [pointer, bytes] : state_->pinned) total += bytes;
  return total;
}

uint64_t CudaDouble::device_bytes() const {
  const std::lock_guard lock(state_->mutex);
  uint64_t total = 0;
  for (const auto& [pointer, bytes] : state_->device) total += bytes;
  return total;
}

uint64_t CudaDouble::live_streams() const {
  const std::lock_guard lock(state_->mutex);
  return state_->streams.size() - (state_->default_stream != nullptr ? 1 : 0);
}

uint64_t CudaDouble::live_events() const {
  const std::lock_guard lock(state_->mutex);
  return state_->events.size();
}

void CudaDouble::enqueue(CuStream stream, std::function<void()> kernel) {
  const std::lock_guard lock(state_->mutex);
  State::Stream* target = state_->find_stream(stream);
  if (target == nullptr) return;
  State::Op op;
  op.kind = State::Op::Kind::kKernel;
  op.kernel = std::move(kernel);
  state_->push(*target, std::move(op));
}

CuResult CudaDouble::cuInit(unsigned /*flags*/) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuInit")) return failure;
  state_->initialized = true;
  return kCudaSuccess;
}

CuResult CudaDouble::cuDriverGetVersion(int* version) {
  if (version == nullptr) return kCudaErrorInvalidValue;
  *version = 12080;
  return kCudaSuccess;
}

CuResult CudaDouble::cuDeviceGetCount(int* count) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuDeviceGetCount")) return failure;
  if (!state_->initialized) return kCudaErrorNotInitialized;
  if (count == nullptr) return kCudaErrorInvalidValue;
  *count = static_cast<int>(state_->devices.size());
  return kCudaSuccess;
}

CuResult CudaDouble::cuDeviceGet(CuDevice* device, int ordinal) {
  const std::lock_guard lock(state_->mutex);
  if (!state_->initialized) return kCudaErrorNotInitialized;
  if (device == nullptr || ordinal < 0 || static_cast<size_t>(ordinal) >= state_->devices.size()) {
    return kCudaErrorInvalidValue;
  }
  *device = ordinal;
  return kCudaSuccess;
}

CuResult CudaDouble::cuDevicePrimaryCtxRetain(CuContext* context, CuDevice device) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuDevicePrimaryCtxRetain")) return failure;
  if (!state_->initialized) return kCudaErrorNotInitialized;
  if (context == nullptr || device < 0 || static_cast<size_t>(device) >= state_->devices.size()) {
    return kCudaErrorInvalidValue;
  }
  ++state_->retained[static_cast<size_t>(device)];
  *context = &state_->devices[static_cast<size_t>(device)];
  return kCudaSuccess;
}

CuResult CudaDouble::cuDevicePrimaryCtxRelease(CuDevice device) {
  const std::lock_guard lock(state_->mutex);
  if (device < 0 || static_cast<size_t>(device) >= state_->devices.size() ||
      state_->retained[static_cast<size_t>(device)] == 0) {
    return kCudaErrorInvalidValue;
  }
  --state_->retained[static_cast<size_t>(device)];
  return kCudaSuccess;
}

CuResult CudaDouble::cuCtxSetCurrent(CuContext context) {
  const std::lock_guard lock(state_->mutex);
  if (!state_->initialized) return kCudaErrorNotInitialized;
  state_->current[std::this_thread::get_id()] = context;
  return kCudaSuccess;
}

CuResult CudaDouble::cuCtxGetCurrent(CuContext* context) {
  const std::lock_guard lock(state_->mutex);
  if (context == nullptr) return kCudaErrorInvalidValue;
  const auto it = state_->current.find(std::this_thread::get_id());
  *context = it == state_->current.end() ? nullptr : it->second;
  return kCudaSuccess;
}

CuResult CudaDouble::cuStreamCreate(CuStream* stream, unsigned /*flags*/) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuStreamCreate")) return failure;
  if (const CuResult no_context = state_->need_context()) return no_context;
  if (stream == nullptr) return kCudaErrorInvalidValue;
  *stream = state_->start_stream();
  return kCudaSuccess;
}

CuResult CudaDouble::cuStreamDestroy(CuStream stream) {
  std::unique_lock lock(state_->mutex);
  const auto it = state_->streams.find(static_cast<State::Stream*>(stream));
  if (stream == nullptr || it == state_->streams.end()) return kCudaErrorInvalidHandle;
  std::unique_ptr<State::Stream> owned = std::move(it->second);
  state_->streams.erase(it);
  state_->stop(lock, *owned);
  return kCudaSuccess;
}

CuResult CudaDouble::cuStreamSynchronize(CuStream stream) {
  std::unique_lock lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuStreamSynchronize")) return failure;
  State::Stream* target = state_->find_stream(stream);
  if (target == nullptr) return kCudaErrorInvalidHandle;
  state_->changed.wait(lock, [&] { return target->ops.empty(); });
  return kCudaSuccess;
}

CuResult CudaDouble::cuStreamWaitEvent(CuStream stream, CuEvent event, unsigned /*flags*/) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuStreamWaitEvent")) return failure;
  if (const CuResult no_context = state_->need_context()) return no_context;
  State::Stream* target = state_->find_stream(stream);
  const std::shared_ptr<State::Event> found = state_->find_event(event);
  if (target == nullptr || found == nullptr) return kCudaErrorInvalidHandle;
  State::Op op;
  op.kind = State::Op::Kind::kWait;
  op.event = found;
  op.generation = found->recorded;  // the work captured by its latest record (none recorded: no wait)
  state_->push(*target, std::move(op));
  return kCudaSuccess;
}

CuResult CudaDouble::cuEventCreate(CuEvent* event, unsigned flags) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuEventCreate")) return failure;
  if (const CuResult no_context = state_->need_context()) return no_context;
  if (event == nullptr) return kCudaErrorInvalidValue;
  auto created = std::make_shared<State::Event>();
  created->timing = (flags & kCuEventDisableTiming) == 0;
  *event = created.get();
  state_->events.emplace(created.get(), std::move(created));
  return kCudaSuccess;
}

CuResult CudaDouble::cuEventDestroy(CuEvent event) {
  const std::lock_guard lock(state_->mutex);
  // As in CUDA, work already queued that uses the event still completes (the ops hold it).
  return state_->events.erase(static_cast<State::Event*>(event)) == 1 ? kCudaSuccess : kCudaErrorInvalidHandle;
}

CuResult CudaDouble::cuEventRecord(CuEvent event, CuStream stream) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuEventRecord")) return failure;
  if (const CuResult no_context = state_->need_context()) return no_context;
  State::Stream* target = state_->find_stream(stream);
  const std::shared_ptr<State::Event> found = state_->find_event(event);
  if (target == nullptr || found == nullptr) return kCudaErrorInvalidHandle;
  State::Op op;
  op.kind = State::Op::Kind::kComplete;
  op.event = found;
  op.generation = ++found->recorded;
  state_->push(*target, std::move(op));
  return kCudaSuccess;
}

CuResult CudaDouble::cuEventQuery(CuEvent event) {
  const std::lock_guard lock(state_->mutex);
  const std::shared_ptr<State::Event> found = state_->find_event(event);
  if (found == nullptr) return kCudaErrorInvalidHandle;
  return found->completed >= found->recorded ? kCudaSuccess : kCudaErrorNotReady;
}

CuResult CudaDouble::cuEventSynchronize(CuEvent event) {
  std::unique_lock lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuEventSynchronize")) return failure;
  const std::shared_ptr<State::Event> found = state_->find_event(event);
  if (found == nullptr) return kCudaErrorInvalidHandle;
  const uint64_t target = found->recorded;
  state_->changed.wait(lock, [&] { return found->completed >= target; });
  return kCudaSuccess;
}

CuResult CudaDouble::cuEventElapsedTime(float* milliseconds, CuEvent start, CuEvent end) {
  const std::lock_guard lock(state_->mutex);
  const std::shared_ptr<State::Event> first = state_->find_event(start);
  const std::shared_ptr<State::Event> second = state_->find_event(end);
  if (first == nullptr || second == nullptr || milliseconds == nullptr) return kCudaErrorInvalidHandle;
  if (!first->timing || !second->timing || first->recorded == 0 || second->recorded == 0) return kCudaErrorInvalidHandle;
  if (first->completed < first->recorded || second->completed < second->recorded) return kCudaErrorNotReady;
  *milliseconds = std::chrono::duration<float, std::milli>(second->completed_at - first->completed_at).count();
  return kCudaSuccess;
}

CuResult CudaDouble::cuMemcpyHtoDAsync(CuDevicePtr destination, const void* source, size_t bytes, CuStream stream) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuMemcpyHtoDAsync")) return failure;
  if (const CuResult no_context = state_->need_context()) return no_context;
  State::Stream* target = state_->find_stream(stream);
  if (target == nullptr) return kCudaErrorInvalidHandle;
  if (destination == 0 || (source == nullptr && bytes > 0)) return kCudaErrorInvalidValue;
  State::Op op;
  op.kind = State::Op::Kind::kCopy;
  op.destination = destination;
  op.source = source;
  op.bytes = bytes;
  op.latency = state_->options.copy_latency;
  if (state_->options.jitter && op.latency.count() > 0) {
    op.latency = std::chrono::microseconds(static_cast<int64_t>(state_->rng() % static_cast<uint64_t>(op.latency.count() + 1)));
  }
  state_->push(*target, std::move(op));
  return kCudaSuccess;
}

CuResult CudaDouble::cuMemAlloc(CuDevicePtr* pointer, size_t bytes) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuMemAlloc")) return failure;
  if (const CuResult no_context = state_->need_context()) return no_context;
  if (pointer == nullptr || bytes == 0) return kCudaErrorInvalidValue;
  void* memory = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);  // cudaMalloc aligns to 256 at least
  if (memory == nullptr) return kCudaErrorOutOfMemory;
  state_->device.emplace(memory, bytes);
  *pointer = static_cast<CuDevicePtr>(reinterpret_cast<uintptr_t>(memory));
  return kCudaSuccess;
}

CuResult CudaDouble::cuMemFree(CuDevicePtr pointer) {
  const std::lock_guard lock(state_->mutex);
  const auto it = state_->device.find(reinterpret_cast<void*>(static_cast<uintptr_t>(pointer)));
  if (it == state_->device.end()) return kCudaErrorInvalidValue;
  std::free(it->first);
  state_->device.erase(it);
  return kCudaSuccess;
}

CuResult CudaDouble::cuMemcpyDtoH(void* destination, CuDevicePtr source, size_t bytes) {
  std::unique_lock lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuMemcpyDtoH")) return failure;
  if (const CuResult no_context = state_->need_context()) return no_context;
  // Synchronous with respect to the legacy default stream, as in CUDA: wait for it, then copy.
  State::Stream* stream = state_->find_stream(nullptr);
  state_->changed.wait(lock, [&] { return stream->ops.empty(); });
  lock.unlock();
  std::memcpy(destination, reinterpret_cast<const void*>(static_cast<uintptr_t>(source)), bytes);
  return kCudaSuccess;
}

CuResult CudaDouble::cuMemHostAlloc(void** pointer, size_t bytes, unsigned /*flags*/) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuMemHostAlloc")) return failure;
  if (const CuResult no_context = state_->need_context()) return no_context;
  if (pointer == nullptr || bytes == 0) return kCudaErrorInvalidValue;
  void* memory = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
  if (memory == nullptr) return kCudaErrorOutOfMemory;
  state_->pinned.emplace(memory, bytes);
  *pointer = memory;
  return kCudaSuccess;
}

CuResult CudaDouble::cuMemFreeHost(void* pointer) {
  const std::lock_guard lock(state_->mutex);
  const auto it = state_->pinned.find(pointer);
  if (it == state_->pinned.end()) return kCudaErrorInvalidValue;
  std::free(pointer);
  state_->pinned.erase(it);
  return kCudaSuccess;
}

CuResult CudaDouble::cuLaunchHostFunc(CuStream stream, CuHostFn function, void* user_data) {
  const std::lock_guard lock(state_->mutex);
  if (const CuResult failure = state_->take_failure("cuLaunchHostFunc")) return failure;
  if (const CuResult no_context = state_->need_context()) return no_context;
  State::Stream* target = state_->find_stream(stream);
  if (target == nullptr) return kCudaErrorInvalidHandle;
  if (function == nullptr) return kCudaErrorInvalidValue;
  State::Op op;
  op.kind = State::Op::Kind::kHostFunc;
  op.function = function;
  op.user_data = user_data;
  state_->push(*target, std::move(op));
  return kCudaSuccess;
}

bool CudaDouble::cufile_loaded() const { return state_->options.cufile; }

CuFileError CudaDouble::cuFileDriverOpen() {
  const std::lock_guard lock(state_->mutex);
  if (!state_->options.cufile) return {5030, 0};
  if (const CuResult failure = state_->take_failure("cuFileDriverOpen")) return {5001, failure};
  state_->cufile_open = true;
  return {};
}

CuFileError CudaDouble::cuFileDriverClose() {
  const std::lock_guard lock(state_->mutex);
  if (!state_->cufile_open) return {5030, 0};
  state_->cufile_open = false;
  return {};
}

CuFileError CudaDouble::cuFileHandleRegister(CuFileHandle* handle, CuFileDescr* descr) {
  const std::lock_guard lock(state_->mutex);
  if (!state_->cufile_open) return {5030, 0};
  if (handle == nullptr || descr == nullptr || descr->type != 1 || descr->handle.fd < 0) return {5022, 0};
  auto* made = reinterpret_cast<CuFileHandle>(static_cast<uintptr_t>(state_->next_handle++));
  state_->file_handles[made] = descr->handle.fd;
  *handle = made;
  return {};
}

void CudaDouble::cuFileHandleDeregister(CuFileHandle handle) {
  const std::lock_guard lock(state_->mutex);
  state_->file_handles.erase(handle);
}

CuFileError CudaDouble::cuFileBufRegister(const void* device_pointer, size_t bytes, int /*flags*/) {
  const std::lock_guard lock(state_->mutex);
  if (!state_->cufile_open) return {5030, 0};
  state_->registered[static_cast<const std::byte*>(device_pointer)] = bytes;
  return {};
}

CuFileError CudaDouble::cuFileBufDeregister(const void* device_pointer) {
  const std::lock_guard lock(state_->mutex);
  return state_->registered.erase(static_cast<const std::byte*>(device_pointer)) == 1 ? CuFileError{}
                                                                                       : CuFileError{5022, 0};
}

ssize_t CudaDouble::cuFileRead(CuFileHandle handle, void* device_pointer, size_t bytes, off_t file_offset,
                               off_t device_offset) {
  int fd = -1;
  {
    const std::lock_guard lock(state_->mutex);
    if (const CuResult failure = state_->take_failure("cuFileRead")) return -static_cast<ssize_t>(failure);
    const auto it = state_->file_handles.find(handle);
    if (!state_->cufile_open || it == state_->file_handles.end()) return -EBADF;
    fd = it->second;
    ++state_->cufile_reads;
    const auto* base = static_cast<const std::byte*>(device_pointer);
    bool covered = false;
    for (const auto& [start, length] : state_->registered) {
      if (start <= base && base + device_offset + static_cast<off_t>(bytes) <= start + length) covered = true;
    }
    if (!covered) ++state_->cufile_unregistered;
  }
  // As cuFile: bytes read, or a negative errno. (The device pointer is host memory here.)
  const ssize_t n = ::pread(fd, static_cast<std::byte*>(device_pointer) + device_offset, bytes, file_offset);
  return n < 0 ? -static_cast<ssize_t>(errno) : n;
}

uint64_t CudaDouble::cufile_reads() const {
  const std::lock_guard lock(state_->mutex);
  return state_->cufile_reads;
}

uint64_t CudaDouble::cufile_unregistered_reads() const {
  const std::lock_guard lock(state_->mutex);
  return state_->cufile_unregistered;
}

uint64_t CudaDouble::live_cufile_handles() const {
  const std::lock_guard lock(state_->mutex);
  return state_->file_handles.size();
}

CuResult CudaDouble::cuGetErrorName(CuResult error, const char** text) {
  for (const ErrorEntry& entry : kErrors) {
    if (entry.code == error) {
      *text = entry.name;
      return kCudaSuccess;
    }
  }
  *text = nullptr;
  return kCudaErrorInvalidValue;
}

CuResult CudaDouble::cuGetErrorString(CuResult error, const char** text) {
  for (const ErrorEntry& entry : kErrors) {
    if (entry.code == error) {
      *text = entry.text;
      return kCudaSuccess;
    }
  }
  *text = nullptr;
  return kCudaErrorInvalidValue;
}

}  // namespace tensorstream
