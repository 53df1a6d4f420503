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

// Runs fn(t) for every t in [0, n_tasks). Runs inline when n_tasks < 2, when one thread is
// configured, or when total_work (a rough flop count) is too small to pay for waking threads.
void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn, double total_work = 1e30);

}  // namespace ftte
