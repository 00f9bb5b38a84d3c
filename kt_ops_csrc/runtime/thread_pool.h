// The package's own worker pool. Work is split into tasks numbered 0..n-1 that the workers and the
// calling thread claim from one atomic counter (tasks of uneven size balance themselves).
// One parallel_for runs at a time; a second caller (another Python thread) waits for the first.
//
// Failures: an exception thrown by a task (std::bad_alloc on a worker, a TORCH_CHECK, ...) is caught
// on whichever thread ran it; the remaining tasks are skipped, parallel_for waits until every worker
// has left the job (their tasks may use the caller's stack) and then rethrows the first exception
// on the calling thread, so the op raises a Python exception and the pool stays usable.
//
// fork(): the child has none of the parent's workers, so the pool rebuilds itself there (fresh
// mutexes, workers started on the child's first parallel_for). fork() waits for a running job.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kt {

class ThreadPool {
 public:
  // Never destroyed: at interpreter exit another thread may still be inside a parallel_for, and
  // joining or destroying workers under it is what used to abort the process.
  static ThreadPool& instance();

  // Throws std::runtime_error when the threads cannot be created (e.g. EAGAIN); the pool then keeps
  // the threads it has, and num_threads() reports that count.
  void set_num_threads(int num_threads);
  int num_threads();
  void parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task);

  // Test hook: the next task run on a worker thread (on_caller false) or on the calling thread (on_caller
  // true) throws std::bad_alloc before doing its work. Used to check the failure path end to end.
  void inject_task_fault(bool on_caller);

 private:
  ThreadPool();
  ~ThreadPool() = delete;
  void start_workers(int count);
  void stop_workers();
  void worker_loop(uint64_t seen);
  void run_tasks(bool on_caller);
  void ensure_workers();
  static void before_fork();
  static void after_fork_parent();
  static void after_fork_child();

  std::mutex job_mutex_;  // serialises whole jobs (and resizing, and fork)
  std::mutex state_mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  uint64_t generation_ = 0;
  int busy_workers_ = 0;
  bool stopping_ = false;
  int wanted_workers_ = 0;  // workers the pool should have (started lazily after fork)
  std::exception_ptr error_;
  std::atomic<int> fault_{0};  // 0 none, 1 next worker task, 2 next caller task
};

int physical_core_count();

}  // namespace kt
