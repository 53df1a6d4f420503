#include "workspace.h"

#include <atomic>
#include <cstdlib>
#include <new>

namespace ftte {
namespace {
std::atomic<size_t> g_current{0};
std::atomic<size_t> g_peak{0};
constexpr size_t kAlign = 64;

// Kernel scratch comes and goes in strict LIFO order on each thread (RAII Scratch objects), and a
// small training step takes ~35 of them (GEMM packing panels, gradient tiles): through malloc,
// aligned_alloc + free was ~1/5 of a small kernel call's fixed cost. So each thread bump-allocates
// from its own arena of kArenaBytes (reserved on first use; a page becomes resident only when
// touched, so the resident part never exceeds the most scratch the thread held at once) and falls
// back to the heap for what does not fit. The byte counters are the same either way.
constexpr size_t kArenaBytes = 256 * 1024;

struct Arena {
  char* base = nullptr;
  bool failed = false;  // the reservation failed once: use the heap only
  size_t top = 0;       // bytes bumped so far
  size_t live = 0;      // arena blocks not yet freed; at 0 the arena is empty again
  ~Arena() { std::free(base); }
  bool owns(const void* p) const {
    return base && static_cast<const char*>(p) >= base && static_cast<const char*>(p) < base + kArenaBytes;
  }
};
thread_local Arena t_arena;

void count_alloc(size_t bytes) {
  size_t now = g_current.fetch_add(bytes) + bytes;
  size_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}
}  // namespace

size_t workspace_current_bytes() { return g_current.load(); }
size_t workspace_peak_bytes() { return g_peak.load(); }
void workspace_reset_peak() { g_peak.store(g_current.load()); }

void* workspace_alloc(size_t bytes) {
  const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  Arena& a = t_arena;
  if (rounded != 0 && rounded <= kArenaBytes - a.top && !a.failed) {  // (a 0-byte block could sit at the end)
    if (!a.base) {
      a.base = static_cast<char*>(std::aligned_alloc(kAlign, kArenaBytes));
      a.failed = a.base == nullptr;
    }
    if (a.base) {
      void* p = a.base + a.top;
      a.top += rounded;
      ++a.live;
      count_alloc(bytes);
      return p;
    }
  }
  void* p = std::aligned_alloc(kAlign, rounded);
  if (!p) throw std::bad_alloc();
  count_alloc(bytes);
  return p;
}

void workspace_free(void* p, size_t bytes) {
  Arena& a = t_arena;
  if (a.owns(p)) {
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    if (static_cast<char*>(p) + rounded == a.base + a.top) a.top -= rounded;  // the last block: pop it
    if (--a.live == 0) a.top = 0;  // a block freed out of order stays reserved until the arena empties
  } else {
    std::free(p);
  }
  g_current.fetch_sub(bytes);
}

}  // namespace ftte
