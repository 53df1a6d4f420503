"""Kernel scratch (csrc/workspace.cpp): the per-thread arena hands out disjoint, aligned blocks,
takes them back in any order, spills to the heap when full, and the byte counters are exact
either way. A C++ harness, as the kernels' own callers use it (compiled here; skipped without a
compiler)."""
import os
import shutil
import subprocess

import pytest

from slowdev import scaled

_HARNESS = r"""
#include "workspace.h"
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>
using namespace ftte;
static int fail(const char* what) { std::printf("FAIL %s\n", what); return 1; }
static int run() {
  const size_t base = workspace_current_bytes();
  struct Block { unsigned char* p; size_t n; };
  std::vector<Block> live;
  // sizes that fit the arena, one that does not (heap), then more: all live at once, disjoint
  const size_t sizes[] = {40, 4096, 64, 100000, 1, 300000, 65536, 7, 120000};
  size_t total = 0;
  for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); ++i) {
    auto* p = static_cast<unsigned char*>(workspace_alloc(sizes[i]));
    if (reinterpret_cast<std::uintptr_t>(p) % 64) return fail("alignment");
    std::memset(p, int(i + 1), sizes[i]);
    live.push_back({p, sizes[i]});
    total += sizes[i];
    if (workspace_current_bytes() != base + total) return fail("current after alloc");
  }
  for (size_t i = 0; i < live.size(); ++i)
    for (size_t k = 0; k < live[i].n; ++k)
      if (live[i].p[k] != (unsigned char)(i + 1)) return fail("blocks overlap");
  if (workspace_peak_bytes() < base + total) return fail("peak");
  // free out of order (middle first, then the rest), then the arena must serve again from empty
  const size_t order[] = {2, 0, 5, 8, 1, 3, 7, 4, 6};
  for (size_t i : order) {
    workspace_free(live[i].p, live[i].n);
    total -= live[i].n;
    if (workspace_current_bytes() != base + total) return fail("current after free");
  }
  void* a = workspace_alloc(1000);
  void* b = workspace_alloc(1000);
  if (static_cast<char*>(b) - static_cast<char*>(a) != 1024) return fail("bump after reset");
  workspace_free(b, 1000);
  void* c = workspace_alloc(1000);  // LIFO: b's place again
  if (c != b) return fail("pop of the last block");
  workspace_free(c, 1000);
  workspace_free(a, 1000);
  return workspace_current_bytes() == base ? 0 : fail("current at end");
}
int main() {
  if (run()) return 1;
  int rc = 0;
  std::thread t([&] { rc = run(); });  // another thread: its own arena, same counters
  t.join();
  if (rc) return 1;
  std::printf("ok\n");
  return 0;
}
"""


def test_workspace_arena(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler")
    csrc = os.path.join(os.path.dirname(__file__), "..", "csrc")
    src = tmp_path / "ws.cpp"
    src.write_text(_HARNESS)
    exe = tmp_path / "ws"
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", csrc, str(src), os.path.join(csrc, "workspace.cpp"), "-o",
                    str(exe), "-pthread"], check=True, timeout=scaled(120))
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=scaled(10))
    assert out.returncode == 0, out.stdout + out.stderr
