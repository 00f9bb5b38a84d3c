#include "thread_pool.h"

#include <pthread.h>
#include <unistd.h>

#include <new>
#include <stdexcept>
#include <system_error>

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

namespace {
ThreadPool* the_pool = nullptr;
}

ThreadPool& ThreadPool::instance() {
  static ThreadPool* pool = [] {
    the_pool = new ThreadPool();
    pthread_atfork(&ThreadPool::before_fork, &ThreadPool::after_fork_parent, &ThreadPool::after_fork_child);
    return the_pool;
  }();
  return *pool;
}

ThreadPool::ThreadPool() {
  wanted_workers_ = physical_core_count() - 1;
  try {
    start_workers(wanted_workers_);
  } catch (const std::exception&) {
    // Fewer threads than cores is still a working pool; set_num_threads reports the failure.
  }
}

void ThreadPool::start_workers(int count) {
  uint64_t seen;
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    stopping_ = false;
    seen = generation_;  // a new worker waits for the next job, not the last one
  }
  const size_t before = workers_.size();
  try {
    for (int i = 0; i < count; ++i) workers_.emplace_back([this, seen] { worker_loop(seen); });
  } catch (const std::system_error& error) {
    wanted_workers_ = static_cast<int>(workers_.size());
    throw std::runtime_error("kt_ops: could not start " + std::to_string(count) + " worker threads (" +
                             error.what() + "); started " + std::to_string(workers_.size() - before) +
                             ", so the pool now runs " + std::to_string(wanted_workers_ + 1) + " threads");
  }
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
  if (num_threads < 1) throw std::invalid_argument("num_threads must be at least 1, got " + std::to_string(num_threads));
  std::lock_guard<std::mutex> job(job_mutex_);
  if (num_threads - 1 == wanted_workers_ && static_cast<int>(workers_.size()) == wanted_workers_) return;
  stop_workers();
  wanted_workers_ = num_threads - 1;
  start_workers(wanted_workers_);
}

int ThreadPool::num_threads() {
  std::lock_guard<std::mutex> job(job_mutex_);
  return wanted_workers_ + 1;
}

void ThreadPool::inject_task_fault(bool on_caller) { fault_ = on_caller ? 2 : 1; }

void ThreadPool::run_tasks(bool on_caller) {
  for (int64_t i = next_task_.fetch_add(1); i < num_tasks_; i = next_task_.fetch_add(1)) {
    try {
      int armed = on_caller ? 2 : 1;
      if (fault_.load(std::memory_order_relaxed) == armed && fault_.compare_exchange_strong(armed, 0))
        throw std::bad_alloc();
      (*task_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(state_mutex_);
      if (!error_) error_ = std::current_exception();
      next_task_ = num_tasks_;  // the call fails anyway: skip the tasks nobody has claimed
      return;
    }
  }
}

void ThreadPool::worker_loop(uint64_t seen) {
  pthread_setname_np(pthread_self(), "kt_ops-worker");  // shown by gdb/top; tests pick the workers by it
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(state_mutex_);
      work_ready_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
    }
    run_tasks(false);
    {
      std::lock_guard<std::mutex> lock(state_mutex_);
      --busy_workers_;
    }
    work_done_.notify_one();
  }
}

void ThreadPool::ensure_workers() {
  const int missing = wanted_workers_ - static_cast<int>(workers_.size());
  if (missing > 0) start_workers(missing);
}

void ThreadPool::parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  if (num_tasks <= 0) return;
  std::lock_guard<std::mutex> job(job_mutex_);
  ensure_workers();
  if (workers_.empty() || num_tasks == 1) {
    for (int64_t i = 0; i < num_tasks; ++i) task(i);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    task_ = &task;
    num_tasks_ = num_tasks;
    next_task_ = 0;
    error_ = nullptr;
    busy_workers_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  work_ready_.notify_all();
  run_tasks(true);
  std::exception_ptr error;
  {
    // Even when this thread's share failed: workers may still be running tasks that read our stack.
    std::unique_lock<std::mutex> lock(state_mutex_);
    work_done_.wait(lock, [&] { return busy_workers_ == 0; });
    task_ = nullptr;
    error = std::exchange(error_, nullptr);
  }
  if (error) std::rethrow_exception(error);
}

// fork() copies only the calling thread. Holding both locks across it means no job is half done and
// no lock is held by a thread that does not exist in the child.
void ThreadPool::before_fork() {
  the_pool->job_mutex_.lock();
  the_pool->state_mutex_.lock();
}

void ThreadPool::after_fork_parent() {
  the_pool->state_mutex_.unlock();
  the_pool->job_mutex_.unlock();
}

void ThreadPool::after_fork_child() {
  ThreadPool* pool = the_pool;
  // The condition variables may record the parent's waiting workers, which do not exist here, and
  // the parent's std::thread handles cannot be joined: both are replaced, the handles leaked
  // (destroying a joinable std::thread would terminate). Workers start on the first parallel_for,
  // since creating threads inside an atfork handler is not allowed.
  new (&pool->job_mutex_) std::mutex();
  new (&pool->state_mutex_) std::mutex();
  new (&pool->work_ready_) std::condition_variable();
  new (&pool->work_done_) std::condition_variable();
  new std::vector<std::thread>(std::move(pool->workers_));
  pool->workers_ = std::vector<std::thread>();
  pool->task_ = nullptr;
  pool->busy_workers_ = 0;
  pool->stopping_ = false;
  pool->error_ = nullptr;
}

}  // namespace kt
