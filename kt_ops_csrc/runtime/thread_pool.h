// The package's worker pools. Work is split into tasks numbered 0..n-1 that the workers and the
// calling thread claim from one atomic counter (tasks of uneven size balance themselves).
// One parallel_for runs at a time per pool; a second caller (another Python thread) waits for the first.
//
// The main pool runs its jobs on torch's intra-op threads (at::parallel_for: OpenMP in torch's CPU
// builds), so that the two never compete for the cores: after every parallel torch op, OpenMP's
// workers spin for milliseconds before they sleep, and a second set of threads started meanwhile
// (ours) ran on cores they were spinning on. Its thread count is torch's (torch.set_num_threads)
// unless set_num_threads chose one. Where OpenMP cannot serve a job, the pool's own threads run it:
// in a process forked after OpenMP started its threads (libgomp's team does not survive fork(); the
// child would hang), inside another parallel region, in builds of torch without OpenMP, and when
// set_num_threads chose another count than torch's (libgomp would end and restart threads each time
// the team size changes between torch's regions and ours).
//
// Pools: the main pool (set_num_threads; what every op uses by default) and, for threadpool_count > 1,
// sub-pools built by configure_subpools, each with threads of its own, optionally pinned to a CPU set
// (its NUMA node's CPUs). A thread that calls enter_subpool(i) (the wrappers' per-part dispatcher
// threads) is pinned to that set too, and from then on the kernels it calls run their parallel_for on
// sub-pool i, with it taking part as the caller. Which pool runs an op is thus a property of the
// calling thread, so the op schemas carry no pool argument and the default path is unchanged.
//
// Failures: an exception thrown by a task (std::bad_alloc on a worker, a TORCH_CHECK, ...) is caught
// on whichever thread ran it; the remaining tasks are skipped, parallel_for waits until every worker
// has left the job (their tasks may use the caller's stack) and then rethrows the first exception
// on the calling thread, so the op raises a Python exception and the pool stays usable.
//
// fork(): the child has none of the parent's workers, so every pool rebuilds itself there (fresh
// mutexes, workers started on the child's first parallel_for). fork() waits for running jobs.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

namespace kt {

class ThreadPool {
 public:
  // The pool the calling thread's kernels run on: its sub-pool after enter_subpool, else the main
  // pool. Pools are never destroyed: at interpreter exit another thread may still be inside a
  // parallel_for, and joining or destroying workers under it is what used to abort the process.
  static ThreadPool& instance();
  static ThreadPool& main_pool();

  // `count` sub-pools of `threads` threads each (the entering thread counts as one); pool i's threads
  // are pinned to cpu_sets[i] (empty: not pinned). Sub-pools beyond `count` from an earlier call are
  // shrunk to their entering thread. Waits for running jobs of the pools it changes.
  static void configure_subpools(int count, int threads, const std::vector<std::vector<int>>& cpu_sets);
  static int subpool_count();
  // From now on the calling thread's ops run on sub-pool `index`; the thread is pinned to its CPUs.
  static void enter_subpool(int index);
  // The sub-pool the calling thread entered, -1 for none.
  static int current_subpool();
  static ThreadPool& subpool(int index);

  // Throws std::runtime_error when the threads cannot be created (e.g. EAGAIN); the pool then keeps
  // the threads it has, and num_threads() reports that count. For the main pool this also fixes its
  // thread count (from then on it no longer follows torch's).
  void set_num_threads(int num_threads);
  int num_threads();
  void parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task);

  // Test hook: the next task run on a worker thread (on_caller false) or on the calling thread (on_caller
  // true) throws std::bad_alloc before doing its work. Used to check the failure path end to end.
  void inject_task_fault(bool on_caller);

  // Test hook proving sub-pools run at once: while armed, the first job of each sub-pool waits (up to
  // `timeout_s`) until `pools` distinct sub-pools are inside a job. Jobs run one after another can
  // only meet by timing out, which the log records. take_rendezvous_log disarms and returns
  // (sub-pool, OS thread id of the job's caller, met) per arrival.
  static void arm_rendezvous(int pools, double timeout_s);
  static std::vector<std::tuple<int, int64_t, bool>> take_rendezvous_log();

 private:
  ThreadPool(int index, int workers);
  ~ThreadPool() = delete;
  void reconfigure(int num_threads, std::vector<int> cpus);
  void start_workers(int count);
  void stop_workers();
  void worker_loop(uint64_t seen, std::vector<int> cpus);
  void run_tasks(bool on_caller);
  bool run_on_torch_threads(int64_t num_tasks, const std::function<void(int64_t)>& task);
  bool take_fault(bool on_caller);
  void ensure_workers();
  void lock_for_fork();
  void unlock_after_fork();
  void reset_after_fork();
  static void before_fork();
  static void after_fork_parent();
  static void after_fork_child();

  const int index_;        // -1 for the main pool, else the sub-pool's number
  std::vector<int> cpus_;  // CPUs its threads are pinned to; empty: not pinned
  std::mutex job_mutex_;   // serialises whole jobs (and resizing, and fork)
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
  int wanted_workers_ = 0;         // workers the pool should have (started lazily after fork)
  bool explicit_threads_ = false;  // main pool: set_num_threads was called
  std::exception_ptr error_;
  std::atomic<int> fault_{0};  // 0 none, 1 next worker task, 2 next caller task
};

int physical_core_count();

// Pins the calling thread to `cpus` (nothing when empty); throws std::runtime_error on failure.
void pin_current_thread(const std::vector<int>& cpus);

// Fresh anonymous pages for a large, long-lived buffer (the expert weights): the mapping starts on a
// 2 MiB boundary and is advised for transparent huge pages. A kernel streaming the weights then takes
// one TLB entry per 2 MiB rather than per 4 KiB, and the hardware prefetchers, which stop at page
// boundaries, run on. Where THP is in "madvise" mode (the default of many distributions) nothing else
// gets huge pages; where THP is off the advice is ignored. Release with release_pages(result, bytes).
constexpr size_t kHugePageBytes = size_t{2} << 20;
void* map_pages(size_t bytes);
void release_pages(void* pages, size_t bytes);

// A copy of the `bytes` at `src` in fresh pages (map_pages) written by the calling thread's pool:
// pages never touched before, so Linux's first-touch policy puts each on the NUMA node of the pool
// thread that writes it. Release with release_pages(result, bytes).
void* first_touch_copy(const void* src, size_t bytes);

}  // namespace kt
