#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

namespace ftte {
namespace {

// Below this many flops a parallel region costs more in wake-ups than it saves.
constexpr double kMinParallelWork = 2.0e5;

class ThreadPool {
 public:
  ~ThreadPool() { resize(0); }

  void resize(int workers) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (static_cast<int>(threads_.size()) == workers) return;
    stop_ = true;
    ++generation_;
    lock.unlock();
    cv_start_.notify_all();
    for (auto& t : threads_) t.join();
    lock.lock();
    threads_.clear();
    stop_ = false;
    const uint64_t gen = generation_;  // read under the lock: a job posted before a worker starts is not missed
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, gen] { worker_loop(gen); });
  }

  int workers() const { return static_cast<int>(threads_.size()); }

  void run(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &fn;
    n_tasks_ = n_tasks;
    next_.store(0);
    pending_workers_ = static_cast<int>(threads_.size());
    error_ = nullptr;
    ++generation_;
    lock.unlock();
    cv_start_.notify_all();
    drain();
    lock.lock();
    cv_done_.wait(lock, [this] { return pending_workers_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void drain() {
    for (;;) {
      int64_t t = next_.fetch_add(1);
      if (t >= n_tasks_) return;
      try {
        (*job_)(t);
      } catch (...) {
        std::lock_guard<std::mutex> g(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void worker_loop(uint64_t seen) {
    for (;;) {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_start_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (stop_) return;
      lock.unlock();
      drain();
      lock.lock();
      if (--pending_workers_ == 0) cv_done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_start_, cv_done_;
  std::vector<std::thread> threads_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int pending_workers_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

ThreadPool& pool() {
  static ThreadPool p;
  return p;
}

std::mutex g_config_mutex;
std::atomic<int> g_num_threads{0};  // 0: not yet configured
std::atomic<bool> g_in_parallel{false};

}  // namespace

int default_num_threads() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

int get_num_threads() {
  int n = g_num_threads.load();
  return n > 0 ? n : default_num_threads();
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> g(g_config_mutex);
  g_num_threads.store(n > 0 ? n : 0);
}

bool parallel_inline(int64_t n_tasks, double total_work) {
  return n_tasks < 2 || total_work < kMinParallelWork || g_in_parallel.load() || get_num_threads() < 2;
}

void parallel_run(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  const int threads = get_num_threads();
  // One parallel region at a time: concurrent callers (several Python threads with the GIL
  // released) queue here instead of oversubscribing the cores.
  std::lock_guard<std::mutex> g(g_config_mutex);
  g_in_parallel.store(true);
  try {
    pool().resize(threads - 1);
    pool().run(n_tasks, fn);
  } catch (...) {
    g_in_parallel.store(false);
    throw;
  }
  g_in_parallel.store(false);
}

}  // namespace ftte
