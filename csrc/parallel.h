// A small persistent thread pool. Work is always split into the same tasks whatever the
// thread count, so every kernel gives bit-identical results for 1 or N threads: threads only
// decide who runs a task, never how a sum is grouped.
#pragma once
#include <cstdint>
#include <functional>

namespace ftte {

int default_num_threads();          // CPUs this process may run on (affinity-aware)
int get_num_threads();
void set_num_threads(int n);        // n <= 0 restores the default

// Whether parallel_for runs on the calling thread: n_tasks < 2, one thread configured, total_work
// (a rough flop count) too small to pay for waking threads, or already inside a parallel region.
bool parallel_inline(int64_t n_tasks, double total_work);
// parallel_for's threaded path: the pool runs the tasks (one region at a time).
void parallel_run(int64_t n_tasks, const std::function<void(int64_t)>& fn);

// Runs fn(t) for every t in [0, n_tasks). A template so that the inline path (every call at one
// thread, and small calls at any count) is a plain loop over the caller's lambda: building a
// std::function from a lambda with more than two captures allocated on the heap, ~80 times in a
// small training step. The tasks are the same either way (bit-identical for any thread count).
template <class F>
inline void parallel_for(int64_t n_tasks, const F& fn, double total_work = 1e30) {
  if (parallel_inline(n_tasks, total_work)) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  parallel_run(n_tasks, std::function<void(int64_t)>(std::cref(fn)));  // a reference: no copy, no allocation
}

}  // namespace ftte
