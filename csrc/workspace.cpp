#include "workspace.h"

#include <atomic>
#include <cstdlib>
#include <new>

namespace ftte {
namespace {
std::atomic<size_t> g_current{0};
std::atomic<size_t> g_peak{0};
constexpr size_t kAlign = 64;
}  // namespace

size_t workspace_current_bytes() { return g_current.load(); }
size_t workspace_peak_bytes() { return g_peak.load(); }
void workspace_reset_peak() { g_peak.store(g_current.load()); }

void* workspace_alloc(size_t bytes) {
  size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, rounded);
  if (!p) throw std::bad_alloc();
  size_t now = g_current.fetch_add(bytes) + bytes;
  size_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
  return p;
}

void workspace_free(void* p, size_t bytes) {
  std::free(p);
  g_current.fetch_sub(bytes);
}

}  // namespace ftte
