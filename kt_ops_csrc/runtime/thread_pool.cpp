#include "thread_pool.h"

#include <ATen/Parallel.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
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

void pin_current_thread(const std::vector<int>& cpus) {
  if (cpus.empty()) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int cpu : cpus) {
    if (cpu < 0 || cpu >= CPU_SETSIZE)
      throw std::invalid_argument("kt_ops: CPU number " + std::to_string(cpu) + " out of range");
    CPU_SET(cpu, &set);
  }
  const int rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
  if (rc != 0)
    throw std::runtime_error(std::string("kt_ops: could not pin a sub-pool thread to its CPUs: ") + std::strerror(rc));
}

namespace {

// Every pool, for the fork handlers and for sub-pool lookup. Lock order: registry, then a pool's
// job mutex, then its state mutex.
struct Registry {
  std::mutex mutex;
  ThreadPool* main = nullptr;
  std::vector<ThreadPool*> subpools;  // all ever built; the first `active` are in use
  int active = 0;
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed, like the pools
  return *r;
}

thread_local ThreadPool* current_pool = nullptr;
thread_local int current_index = -1;

// Set in a child of fork(): OpenMP's thread team did not survive it.
std::atomic<bool> forked_child{false};

}  // namespace
}  // namespace kt

// The OpenMP runtime torch links (libgomp, or one with its ABI), called directly: GOMP_parallel is
// what a compiler makes of "#pragma omp parallel", and at::parallel_for's OpenMP body is a header
// template that this extension (built without -fopenmp) would compile to a serial loop. Weak, so
// that a torch without OpenMP still loads (they are then null).
extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) __attribute__((weak));
int omp_get_thread_num(void) __attribute__((weak));
int omp_in_parallel(void) __attribute__((weak));
void omp_set_num_threads(int) __attribute__((weak));
}

namespace kt {
namespace {

bool have_openmp() { return GOMP_parallel != nullptr && omp_get_thread_num != nullptr && omp_in_parallel != nullptr; }

struct Rendezvous {
  std::mutex mutex;
  std::condition_variable arrived_cv;
  int expected = 0;
  std::chrono::duration<double> timeout{0};
  std::set<int> arrived;
  std::vector<std::tuple<int, int64_t, bool>> log;
};
std::atomic<bool> rendezvous_armed{false};

Rendezvous& rendezvous_state() {
  static Rendezvous* r = new Rendezvous;
  return *r;
}

void rendezvous(int pool) {
  Rendezvous& r = rendezvous_state();
  std::unique_lock<std::mutex> lock(r.mutex);
  if (r.expected == 0 || r.arrived.count(pool)) return;
  r.arrived.insert(pool);
  const size_t slot = r.log.size();
  r.log.emplace_back(pool, static_cast<int64_t>(syscall(SYS_gettid)), false);
  r.arrived_cv.notify_all();
  const bool met =
      r.arrived_cv.wait_for(lock, r.timeout, [&] { return static_cast<int>(r.arrived.size()) >= r.expected; });
  std::get<2>(r.log[slot]) = met;
}

}  // namespace

ThreadPool& ThreadPool::main_pool() {
  static ThreadPool* pool = [] {
    Registry& r = registry();
    r.main = new ThreadPool(-1, physical_core_count() - 1);
    pthread_atfork(&ThreadPool::before_fork, &ThreadPool::after_fork_parent, &ThreadPool::after_fork_child);
    return r.main;
  }();
  return *pool;
}

ThreadPool& ThreadPool::instance() { return current_pool != nullptr ? *current_pool : main_pool(); }

namespace {
// The fork handlers are registered when the extension loads, not on the first job: a process that
// forks before calling any op still gets a working child.
const bool fork_handlers_registered = (ThreadPool::main_pool(), true);
}  // namespace

// Workers start on the first job that needs them (the main pool's usually run on torch's threads).
ThreadPool::ThreadPool(int index, int workers) : index_(index) { wanted_workers_ = workers; }

void ThreadPool::configure_subpools(int count, int threads, const std::vector<std::vector<int>>& cpu_sets) {
  if (count < 0) throw std::invalid_argument("subpool count must be >= 0, got " + std::to_string(count));
  if (threads < 1) throw std::invalid_argument("threads per sub-pool must be >= 1, got " + std::to_string(threads));
  if (static_cast<int>(cpu_sets.size()) != count)
    throw std::invalid_argument("need one CPU set per sub-pool: " + std::to_string(count) + " sub-pools, " +
                                std::to_string(cpu_sets.size()) + " sets");
  main_pool();  // registers the fork handlers
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  while (static_cast<int>(r.subpools.size()) < count)
    r.subpools.push_back(new ThreadPool(static_cast<int>(r.subpools.size()), 0));
  r.active = 0;  // a failure below leaves no half-built pool in use
  for (size_t i = count; i < r.subpools.size(); ++i) r.subpools[i]->reconfigure(1, {});
  for (int i = 0; i < count; ++i) r.subpools[i]->reconfigure(threads, cpu_sets[i]);
  r.active = count;
}

int ThreadPool::subpool_count() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.active;
}

ThreadPool& ThreadPool::subpool(int index) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (index < 0 || index >= r.active)
    throw std::out_of_range("sub-pool " + std::to_string(index) + " does not exist (" + std::to_string(r.active) +
                            " configured)");
  return *r.subpools[index];
}

void ThreadPool::enter_subpool(int index) {
  ThreadPool& pool = subpool(index);
  std::vector<int> cpus;
  {
    std::lock_guard<std::mutex> job(pool.job_mutex_);
    cpus = pool.cpus_;
  }
  pin_current_thread(cpus);
  const std::string name = "kt_ops-sub" + std::to_string(index);
  pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
  current_pool = &pool;
  current_index = index;
}

int ThreadPool::current_subpool() { return current_index; }

void ThreadPool::reconfigure(int num_threads, std::vector<int> cpus) {
  std::lock_guard<std::mutex> job(job_mutex_);
  if (cpus == cpus_ && num_threads - 1 == wanted_workers_ && static_cast<int>(workers_.size()) == wanted_workers_)
    return;
  stop_workers();
  cpus_ = std::move(cpus);
  wanted_workers_ = num_threads - 1;
  start_workers(wanted_workers_);
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
    for (int i = 0; i < count; ++i) workers_.emplace_back([this, seen, cpus = cpus_] { worker_loop(seen, cpus); });
  } catch (const std::system_error& error) {
    wanted_workers_ = static_cast<int>(workers_.size());
    throw std::runtime_error("kt_ops: could not start " + std::to_string(count) + " worker threads (" + error.what() +
                             "); started " + std::to_string(workers_.size() - before) + ", so the pool now runs " +
                             std::to_string(wanted_workers_ + 1) + " threads");
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
  if (num_threads < 1)
    throw std::invalid_argument("num_threads must be at least 1, got " + std::to_string(num_threads));
  std::lock_guard<std::mutex> job(job_mutex_);
  explicit_threads_ = true;
  if (num_threads - 1 == wanted_workers_ && static_cast<int>(workers_.size()) == wanted_workers_) return;
  stop_workers();
  wanted_workers_ = num_threads - 1;
  start_workers(wanted_workers_);
}

int ThreadPool::num_threads() {
  std::lock_guard<std::mutex> job(job_mutex_);
  if (index_ < 0 && !explicit_threads_ && have_openmp() && !forked_child.load()) return at::get_num_threads();
  return wanted_workers_ + 1;
}

void ThreadPool::inject_task_fault(bool on_caller) { fault_ = on_caller ? 2 : 1; }

bool ThreadPool::take_fault(bool on_caller) {
  int armed = on_caller ? 2 : 1;
  return fault_.load(std::memory_order_relaxed) == armed && fault_.compare_exchange_strong(armed, 0);
}

void ThreadPool::arm_rendezvous(int pools, double timeout_s) {
  Rendezvous& r = rendezvous_state();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.expected = pools;
  r.timeout = std::chrono::duration<double>(timeout_s);
  r.arrived.clear();
  r.log.clear();
  rendezvous_armed = pools > 0;
}

std::vector<std::tuple<int, int64_t, bool>> ThreadPool::take_rendezvous_log() {
  Rendezvous& r = rendezvous_state();
  std::lock_guard<std::mutex> lock(r.mutex);
  rendezvous_armed = false;
  r.expected = 0;
  r.arrived.clear();
  return std::exchange(r.log, {});
}

void ThreadPool::run_tasks(bool on_caller) {
  for (int64_t i = next_task_.fetch_add(1); i < num_tasks_; i = next_task_.fetch_add(1)) {
    try {
      if (take_fault(on_caller)) throw std::bad_alloc();
      (*task_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(state_mutex_);
      if (!error_) error_ = std::current_exception();
      next_task_ = num_tasks_;  // the call fails anyway: skip the tasks nobody has claimed
      return;
    }
  }
}

void ThreadPool::worker_loop(uint64_t seen, std::vector<int> cpus) {
  // The name is shown by gdb/top; tests pick the workers by it.
  const std::string name = index_ < 0 ? "kt_ops-worker" : "kt_ops-sub" + std::to_string(index_);
  pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
  try {
    pin_current_thread(cpus);
  } catch (const std::exception&) {
    // The CPU sets come from the process's own affinity; a worker that cannot be pinned still works.
  }
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
  if (missing <= 0) return;
  try {
    start_workers(missing);
  } catch (const std::exception&) {
    // Fewer threads than wanted is still a working pool (set_num_threads reports such a failure).
  }
}

// The job on torch's intra-op threads; false when they cannot take it (see thread_pool.h).
bool ThreadPool::run_on_torch_threads(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  if (index_ >= 0 || !have_openmp() || forked_child.load() || omp_in_parallel() || at::in_parallel_region())
    return false;
  const int team = at::get_num_threads();
  // A team of another size than torch's own would make libgomp release threads at every switch
  // between torch's regions and ours and start them again (and end the process where it cannot).
  if (explicit_threads_ && wanted_workers_ + 1 != team) return false;
  if (team <= 1 || num_tasks == 1) {
    for (int64_t i = 0; i < num_tasks; ++i) {
      if (take_fault(true)) throw std::bad_alloc();
      task(i);
    }
    return true;
  }
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    task_ = &task;
    num_tasks_ = num_tasks;
    next_task_ = 0;
    error_ = nullptr;
  }
  // Thread 0 of the team is the calling thread. run_tasks keeps every exception inside the region.
  GOMP_parallel([](void* pool) { static_cast<ThreadPool*>(pool)->run_tasks(omp_get_thread_num() == 0); }, this,
                static_cast<unsigned>(team), 0);
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    task_ = nullptr;
    error = std::exchange(error_, nullptr);
  }
  if (error) std::rethrow_exception(error);
  return true;
}

void ThreadPool::parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  if (num_tasks <= 0) return;
  std::lock_guard<std::mutex> job(job_mutex_);
  if (run_on_torch_threads(num_tasks, task)) return;
  if (index_ >= 0 && rendezvous_armed.load(std::memory_order_relaxed)) rendezvous(index_);
  ensure_workers();
  if (workers_.empty() || num_tasks == 1) {
    for (int64_t i = 0; i < num_tasks; ++i) {
      if (take_fault(true)) throw std::bad_alloc();
      task(i);
    }
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

void* map_pages(size_t bytes) {
  if (bytes == 0) throw std::invalid_argument("map_pages: no bytes");
  // Over-map by a huge page and trim both ends: what stays starts on a 2 MiB boundary.
  const size_t span = bytes + kHugePageBytes;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t end = aligned + (bytes + page - 1) / page * page;
  if (aligned > start) munmap(raw, aligned - start);
  if (start + span > end) munmap(reinterpret_cast<void*>(end), start + span - end);
  void* pages = reinterpret_cast<void*>(aligned);
  madvise(pages, bytes, MADV_HUGEPAGE);  // EINVAL where THP is not built in: 4 KiB pages then
  return pages;
}

void release_pages(void* pages, size_t bytes) { munmap(pages, bytes); }

void* first_touch_copy(const void* src, size_t bytes) {
  if (bytes == 0) throw std::invalid_argument("first_touch_copy: nothing to copy");
  void* dst = map_pages(bytes);
  constexpr size_t kChunk = kHugePageBytes;  // a huge page per task
  const int64_t tasks = static_cast<int64_t>((bytes + kChunk - 1) / kChunk);
  try {
    ThreadPool::instance().parallel_for(tasks, [&](int64_t t) {
      const size_t offset = static_cast<size_t>(t) * kChunk;
      std::memcpy(static_cast<char*>(dst) + offset, static_cast<const char*>(src) + offset,
                  std::min(kChunk, bytes - offset));
    });
  } catch (...) {
    release_pages(dst, bytes);
    throw;
  }
  return dst;
}

// fork() copies only the calling thread. Holding every pool's locks across it means no job is half
// done and no lock is held by a thread that does not exist in the child.
void ThreadPool::lock_for_fork() {
  job_mutex_.lock();
  state_mutex_.lock();
}

void ThreadPool::unlock_after_fork() {
  state_mutex_.unlock();
  job_mutex_.unlock();
}

void ThreadPool::before_fork() {
  Registry& r = registry();
  r.mutex.lock();
  r.main->lock_for_fork();
  for (ThreadPool* pool : r.subpools) pool->lock_for_fork();
}

void ThreadPool::after_fork_parent() {
  Registry& r = registry();
  for (auto it = r.subpools.rbegin(); it != r.subpools.rend(); ++it) (*it)->unlock_after_fork();
  r.main->unlock_after_fork();
  r.mutex.unlock();
}

void ThreadPool::reset_after_fork() {
  // The condition variables may record the parent's waiting workers, which do not exist here, and
  // the parent's std::thread handles cannot be joined: both are replaced, the handles leaked
  // (destroying a joinable std::thread would terminate). Workers start on the first parallel_for,
  // since creating threads inside an atfork handler is not allowed.
  new (&job_mutex_) std::mutex();
  new (&state_mutex_) std::mutex();
  new (&work_ready_) std::condition_variable();
  new (&work_done_) std::condition_variable();
  new std::vector<std::thread>(std::move(workers_));
  workers_ = std::vector<std::thread>();
  task_ = nullptr;
  busy_workers_ = 0;
  stopping_ = false;
  error_ = nullptr;
}

void ThreadPool::after_fork_child() {
  forked_child = true;
  // torch's own parallel ops in the child would wait for OpenMP threads that were not copied by
  // fork() and hang: its thread count becomes 1 (what torch's DataLoader workers set too).
  if (omp_set_num_threads != nullptr) omp_set_num_threads(1);
  Registry& r = registry();
  new (&r.mutex) std::mutex();
  r.main->reset_after_fork();
  for (ThreadPool* pool : r.subpools) pool->reset_after_fork();
}

}  // namespace kt
