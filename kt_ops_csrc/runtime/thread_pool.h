// The package's own worker pool. Work is split into tasks numbered 0..n-1 that the workers and the
// calling thread claim from one atomic counter (tasks of uneven size balance themselves).
// One parallel_for runs at a time; a second caller (another Python thread) waits for the first.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kt {

class ThreadPool {
 public:
  static ThreadPool& instance();
  ~ThreadPool();

  void set_num_threads(int num_threads);
  int num_threads();
  void parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task);

 private:
  ThreadPool();
  void start_workers(int count);
  void stop_workers();
  void worker_loop();
  void run_tasks();

  std::mutex job_mutex_;  // serialises whole jobs (and resizing)
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
  int num_threads_ = 1;
};

int physical_core_count();

}  // namespace kt
