#include "thread_pool.h"

#include <unistd.h>

#include <fstream>
#include <set>
#include <string>
#include <utility>

namespace kt {

int physical_core_count() {
  // Hyper-threads share the FMA units that bound these kernels, so the default is one thread per
  // physical core. /proc/cpuinfo pairs (physical id, core id); fall back to logical CPUs.
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::set<std::pair<int, int>> cores;
  std::string line;
  int physical_id = 0;
  while (std::getline(cpuinfo, line)) {
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    if (line.rfind("physical id", 0) == 0) physical_id = std::stoi(line.substr(colon + 1));
    if (line.rfind("core id", 0) == 0) cores.insert({physical_id, std::stoi(line.substr(colon + 1))});
  }
  long logical = sysconf(_SC_NPROCESSORS_ONLN);
  if (logical < 1) logical = 1;
  int physical = cores.empty() ? static_cast<int>(logical) : static_cast<int>(cores.size());
  return std::max(1, std::min(physical, static_cast<int>(logical)));
}

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::ThreadPool() {
  num_threads_ = physical_core_count();
  start_workers(num_threads_ - 1);
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::start_workers(int count) {
  stopping_ = false;
  for (int i = 0; i < count; ++i) workers_.emplace_back([this] { worker_loop(); });
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    stopping_ = true;
  }
  work_ready_.notify_all();
  for (auto& worker : workers_) worker.join();
  workers_.clear();
}

void ThreadPool::set_num_threads(int num_threads) {
  std::lock_guard<std::mutex> job(job_mutex_);
  if (num_threads == num_threads_) return;
  stop_workers();
  num_threads_ = num_threads;
  start_workers(num_threads - 1);
}

int ThreadPool::num_threads() {
  std::lock_guard<std::mutex> job(job_mutex_);
  return num_threads_;
}

void ThreadPool::run_tasks() {
  for (int64_t i = next_task_.fetch_add(1); i < num_tasks_; i = next_task_.fetch_add(1)) (*task_)(i);
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(state_mutex_);
      work_ready_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
    }
    run_tasks();
    {
      std::lock_guard<std::mutex> lock(state_mutex_);
      --busy_workers_;
    }
    work_done_.notify_one();
  }
}

void ThreadPool::parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  if (num_tasks <= 0) return;
  std::lock_guard<std::mutex> job(job_mutex_);
  if (workers_.empty() || num_tasks == 1) {
    for (int64_t i = 0; i < num_tasks; ++i) task(i);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    task_ = &task;
    num_tasks_ = num_tasks;
    next_task_ = 0;
    busy_workers_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  work_ready_.notify_all();
  run_tasks();
  std::unique_lock<std::mutex> lock(state_mutex_);
  work_done_.wait(lock, [&] { return busy_workers_ == 0; });
  task_ = nullptr;
}

}  // namespace kt
