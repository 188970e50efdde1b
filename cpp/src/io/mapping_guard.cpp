#include "tensorstream/io/mapping_guard.hpp"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <mutex>

namespace tensorstream {
namespace {

constexpr uint32_t kSlots = 1024;
enum : uint32_t { kFree = 0, kClaimed = 1, kActive = 2 };

// One guarded range. The handler reads `state` first and uses begin/end only when it is kActive; registration
// writes them before publishing kActive (release), the handler reads with acquire.
struct Slot {
  std::atomic<uint32_t> state{kFree};
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<uintptr_t> fault_low{UINTPTR_MAX};  // lowest and highest page patched with zeros
  std::atomic<uintptr_t> fault_high{0};
};

Slot g_slots[kSlots];
// Pages patched so far, process-wide: while it is 0 (always, unless a file shrank) a damage check is one load
// instead of a scan of the table. The engine asks at every use of a mapped block.
std::atomic<uint64_t> g_patched{0};
struct sigaction g_previous {};
uintptr_t g_page = 4096;
std::once_flag g_installed;

void lower_to(std::atomic<uintptr_t>& value, uintptr_t candidate) {
  uintptr_t seen = value.load(std::memory_order_relaxed);
  while (candidate < seen && !value.compare_exchange_weak(seen, candidate, std::memory_order_relaxed)) {
  }
}

void raise_to(std::atomic<uintptr_t>& value, uintptr_t candidate) {
  uintptr_t seen = value.load(std::memory_order_relaxed);
  while (candidate > seen && !value.compare_exchange_weak(seen, candidate, std::memory_order_relaxed)) {
  }
}

void on_sigbus(int signal_number, siginfo_t* info, void* context) {
  const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
  if (info->si_code == BUS_ADRERR) {  // a page with nothing behind it: what a mapping past the end of file gives
    for (Slot& slot : g_slots) {
      if (slot.state.load(std::memory_order_acquire) != kActive) continue;
      if (address < slot.begin.load(std::memory_order_relaxed) || address >= slot.end.load(std::memory_order_relaxed)) {
        continue;
      }
      const uintptr_t page = address & ~(g_page - 1);
      void* zeros = ::mmap(reinterpret_cast<void*>(page), g_page, PROT_READ | PROT_WRITE,
                           MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (zeros == MAP_FAILED) break;  // cannot patch: fall through to the previous disposition
      lower_to(slot.fault_low, page);
      raise_to(slot.fault_high, page);
      g_patched.fetch_add(1, std::memory_order_release);
      return;  // the faulting access runs again and reads zeros
    }
  }
  // Not ours: whatever was installed before us, else the default action.
  if ((g_previous.sa_flags & SA_SIGINFO) != 0 && g_previous.sa_sigaction != nullptr) {
    g_previous.sa_sigaction(signal_number, info, context);
    return;
  }
  if ((g_previous.sa_flags & SA_SIGINFO) == 0 && g_previous.sa_handler != SIG_DFL &&
      g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(signal_number);
    return;
  }
  ::signal(signal_number, SIG_DFL);
  ::raise(signal_number);  // delivered when this handler returns (a fault would also repeat and end the process)
}

void install() {
  const long page = ::sysconf(_SC_PAGESIZE);
  if (page > 0) g_page = static_cast<uintptr_t>(page);
  struct sigaction action {};
  action.sa_sigaction = on_sigbus;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  ::sigemptyset(&action.sa_mask);
  (void)::sigaction(SIGBUS, &action, &g_previous);
}

bool overlaps_damage(const Slot& slot, uintptr_t begin, uintptr_t end) {
  const uintptr_t low = slot.fault_low.load(std::memory_order_relaxed);
  const uintptr_t high = slot.fault_high.load(std::memory_order_relaxed);
  if (low == UINTPTR_MAX) return false;
  return begin < high + g_page && low < end;
}

}  // namespace

uint32_t guard_mapping(const void* base, uint64_t length) noexcept {
  std::call_once(g_installed, install);
  const auto begin = reinterpret_cast<uintptr_t>(base);
  for (uint32_t i = 0; i < kSlots; ++i) {
    uint32_t expected = kFree;
    if (!g_slots[i].state.compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel)) continue;
    g_slots[i].begin.store(begin, std::memory_order_relaxed);
    g_slots[i].end.store(begin + length, std::memory_order_relaxed);
    g_slots[i].fault_low.store(UINTPTR_MAX, std::memory_order_relaxed);
    g_slots[i].fault_high.store(0, std::memory_order_relaxed);
    g_slots[i].state.store(kActive, std::memory_order_release);
    return i + 1;
  }
  return 0;
}

void unguard_mapping(uint32_t handle) noexcept {
  if (handle == 0 || handle > kSlots) return;
  g_slots[handle - 1].state.store(kFree, std::memory_order_release);
}

bool mapping_damaged(const void* address, uint64_t length) noexcept {
  if (g_patched.load(std::memory_order_acquire) == 0) return false;
  const auto begin = reinterpret_cast<uintptr_t>(address);
  const uintptr_t end = begin + length;
  for (const Slot& slot : g_slots) {
    if (slot.state.load(std::memory_order_acquire) != kActive) continue;
    if (end <= slot.begin.load(std::memory_order_relaxed) || begin >= slot.end.load(std::memory_order_relaxed)) {
      continue;
    }
    if (overlaps_damage(slot, begin, end)) return true;
  }
  return false;
}

bool mapping_damaged(uint32_t handle) noexcept {
  if (handle == 0 || handle > kSlots) return false;
  const Slot& slot = g_slots[handle - 1];
  return slot.fault_low.load(std::memory_order_relaxed) != UINTPTR_MAX;
}

}  // namespace tensorstream
