// MoE expert computation with LoRA on gate/up/down: forward and backward (see kt_ops/reference.py for
// the math). The ISA-specific part is the kernel table of kernels/gemm.h (one GEMM shape on panels,
// the activation, conversions); this file does the routing (counting sort of (token, slot) pairs by
// expert), the gathering of activations into per-expert rows, the task structure and the reductions,
// with fp32 accumulation (fp64 for verification runs).
//
// Every per-pair tensor the op returns is in pair order p = t * k + j, so backward can be fed the
// tensors forward returned without any hidden state, and their sizes follow from input shapes.
#include "moe_sft.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "formats.h"
#include "kernels/gemm.h"
#include "runtime/cpu.h"
#include "runtime/thread_pool.h"

namespace kt {
namespace {

// ---------------------------------------------------------------------------------------------
// Input validation: every check names the argument and the expectation.

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "kt_ops: ", name, " must be a CPU tensor, got device ", t.device());
}

void check_dim(const Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, "kt_ops: ", name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

void check_float_dtype(const Tensor& t, const char* name) {
  auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, "kt_ops: ", name,
                   " must be bfloat16, float32 or float64, got ", dt);
}

void check_shape(const Tensor& t, const char* name, std::vector<int64_t> expected, const char* layout) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), "kt_ops: ", name, " must have shape ", layout, " = ",
                    at::IntArrayRef(expected), ", got ", t.sizes());
}

struct Shapes {
  int64_t T, k, E, H, I, r;
  WeightFormat format;
  int64_t gate_groups, down_groups;
  int64_t pairs() const { return T * k; }
};

struct LoraArgs {
  const Tensor& gate_a;
  const Tensor& gate_b;
  const Tensor& up_a;
  const Tensor& up_b;
  const Tensor& down_a;
  const Tensor& down_b;
};

// The expert MLP's variant: the gate activation and optional per-expert biases (frozen, like the
// base weights). SiLU: h = silu(g) * u. Clamped SwiGLU (gpt-oss): g' = min(g, limit),
// u' = clamp(u, -limit, limit), h = (u' + 1) * g' * sigmoid(alpha * g'). Clamped SiLU (DeepSeek-V4):
// the same clamps, h = u' * silu(g'), i.e. clamped SwiGLU with alpha = 1 and no +1 on up (alpha is
// ignored). Gate/up biases are added to the pre-activations, the down bias to each expert's output
// before the routing weight.
enum class Activation { Silu, ClampedSwiglu, ClampedSilu };

struct VariantArgs {
  const std::optional<Tensor>& gate_bias;
  const std::optional<Tensor>& up_bias;
  const std::optional<Tensor>& down_bias;
  c10::string_view activation;
  double alpha, limit;
};

Activation check_variant(const VariantArgs& v, int64_t E, int64_t H, int64_t I) {
  const std::tuple<const std::optional<Tensor>*, const char*, std::vector<int64_t>, const char*> biases[] = {
      {&v.gate_bias, "gate_bias", {E, I}, "[num_experts, intermediate_size]"},
      {&v.up_bias, "up_bias", {E, I}, "[num_experts, intermediate_size]"},
      {&v.down_bias, "down_bias", {E, H}, "[num_experts, hidden_size]"}};
  for (auto& [t, name, shape, layout] : biases) {
    if (!t->has_value()) continue;
    check_cpu(**t, name);
    check_float_dtype(**t, name);
    check_shape(**t, name, shape, layout);
  }
  if (v.activation == "silu") return Activation::Silu;
  TORCH_CHECK_VALUE(v.activation == "clamped_swiglu" || v.activation == "clamped_silu",
                    "kt_ops: activation must be 'silu', 'clamped_swiglu' or 'clamped_silu', got '",
                    std::string(v.activation), "'");
  TORCH_CHECK_VALUE(std::isfinite(v.alpha), "kt_ops: swiglu_alpha must be finite, got ", v.alpha);
  TORCH_CHECK_VALUE(v.limit > 0, "kt_ops: swiglu_limit must be > 0, got ", v.limit);
  return v.activation == "clamped_swiglu" ? Activation::ClampedSwiglu : Activation::ClampedSilu;
}

Shapes check_inputs(const Tensor& hidden, const Tensor& ids, const Tensor& weights, const Tensor& gate_w,
                    const Tensor& up_w, const Tensor& down_w, const std::optional<Tensor>& gate_scale,
                    const std::optional<Tensor>& up_scale, const std::optional<Tensor>& down_scale,
                    c10::string_view format, int64_t I, const LoraArgs& lora) {
  const std::pair<const Tensor*, const char*> all[] = {{&hidden, "hidden_states"},    {&ids, "topk_ids"},
                                                       {&weights, "topk_weights"},    {&gate_w, "gate_weight"},
                                                       {&up_w, "up_weight"},          {&down_w, "down_weight"},
                                                       {&lora.gate_a, "gate_lora_a"}, {&lora.gate_b, "gate_lora_b"},
                                                       {&lora.up_a, "up_lora_a"},     {&lora.up_b, "up_lora_b"},
                                                       {&lora.down_a, "down_lora_a"}, {&lora.down_b, "down_lora_b"}};
  for (auto& [t, name] : all) check_cpu(*t, name);

  check_dim(hidden, "hidden_states", 2, "[num_tokens, hidden_size]");
  check_float_dtype(hidden, "hidden_states");
  const int64_t T = hidden.size(0), H = hidden.size(1);
  TORCH_CHECK_VALUE(H >= 1, "kt_ops: hidden_states must have hidden_size >= 1, got shape ", hidden.sizes());

  check_dim(ids, "topk_ids", 2, "[num_tokens, num_experts_per_tok]");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "kt_ops: topk_ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.size(0) == T, "kt_ops: topk_ids must have one row per token of hidden_states (", T,
                    "), got shape ", ids.sizes());
  const int64_t k = ids.size(1);

  check_dim(weights, "topk_weights", 2, "[num_tokens, num_experts_per_tok]");
  check_float_dtype(weights, "topk_weights");
  TORCH_CHECK_VALUE(weights.sizes() == ids.sizes(), "kt_ops: topk_weights must have the shape of topk_ids ",
                    ids.sizes(), ", got ", weights.sizes());

  TORCH_CHECK_VALUE(I >= 1, "kt_ops: intermediate_size must be >= 1, got ", I);
  const WeightFormat fmt = parse_weight_format(format);
  const std::pair<const Tensor*, const char*> packed[] = {
      {&gate_w, "gate_weight"}, {&up_w, "up_weight"}, {&down_w, "down_weight"}};
  for (auto& [t, name] : packed) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kByte, "kt_ops: ", name,
                     " must be a packed uint8 weight (kt_ops.pack_experts), got dtype ", t->scalar_type());
    check_dim(*t, name, 2, "[num_experts, packed_bytes]");
    TORCH_CHECK_VALUE(t->is_contiguous(), "kt_ops: ", name, " must be contiguous (as kt_ops.pack_experts returns it)");
  }
  const int64_t E = gate_w.size(0);
  TORCH_CHECK_VALUE(E >= 1, "kt_ops: gate_weight must hold at least one expert, got shape ", gate_w.sizes());
  const int64_t gate_bytes = packed_bytes(fmt, I, H), down_bytes = packed_bytes(fmt, H, I);
  TORCH_CHECK_VALUE(gate_w.size(1) == gate_bytes && down_w.size(1) == down_bytes,
                    "kt_ops: the packed experts do not match hidden_states' hidden_size ", H, " and intermediate_size ",
                    I, ": gate_weight must be [", E, ", ", gate_bytes, "] and down_weight [", E, ", ", down_bytes,
                    "], got ", gate_w.sizes(), " and ", down_w.sizes());
  TORCH_CHECK_VALUE(up_w.size(0) == E && down_w.size(0) == E,
                    "kt_ops: gate_weight, up_weight and down_weight must "
                    "hold the same number of experts, got ",
                    gate_w.size(0), ", ", up_w.size(0), ", ", down_w.size(0));
  const int64_t gate_groups = check_packed_matrix(fmt, gate_w, gate_scale, E, I, H, "gate_weight", "gate_scale");
  const int64_t up_groups = check_packed_matrix(fmt, up_w, up_scale, E, I, H, "up_weight", "up_scale");
  const int64_t down_groups = check_packed_matrix(fmt, down_w, down_scale, E, H, I, "down_weight", "down_scale");
  TORCH_CHECK_VALUE(up_groups == gate_groups, "kt_ops: up_scale must have the groups of gate_scale (", gate_groups,
                    "), got ", up_groups);

  check_dim(lora.gate_a, "gate_lora_a", 3, "[num_experts, lora_rank, hidden_size]");
  const int64_t r = lora.gate_a.size(1);
  const std::tuple<const Tensor*, const char*, std::vector<int64_t>, const char*> lora_shapes[] = {
      {&lora.gate_a, "gate_lora_a", {E, r, H}, "[num_experts, lora_rank, hidden_size]"},
      {&lora.gate_b, "gate_lora_b", {E, I, r}, "[num_experts, intermediate_size, lora_rank]"},
      {&lora.up_a, "up_lora_a", {E, r, H}, "[num_experts, lora_rank, hidden_size]"},
      {&lora.up_b, "up_lora_b", {E, I, r}, "[num_experts, intermediate_size, lora_rank]"},
      {&lora.down_a, "down_lora_a", {E, r, I}, "[num_experts, lora_rank, intermediate_size]"},
      {&lora.down_b, "down_lora_b", {E, H, r}, "[num_experts, hidden_size, lora_rank]"}};
  for (auto& [t, name, shape, layout] : lora_shapes) {
    check_float_dtype(*t, name);
    check_shape(*t, name, shape, layout);
  }

  // Ids are data: checked before any work so that a bad id never reads outside the weights.
  if (ids.numel() > 0) {
    Tensor ids64 = ids.to(at::kLong);
    const int64_t lo = ids64.min().item<int64_t>(), hi = ids64.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= -1 && hi < E, "kt_ops: topk_ids must be in [0, ", E,
                      ") (or -1 for a slot computed elsewhere), got values in [", lo, ", ", hi, "]");
  }
  return {T, k, E, H, I, r, fmt, gate_groups, down_groups};
}

// ---------------------------------------------------------------------------------------------
// Routing: (token, slot) pairs grouped by expert with a counting sort; -1 slots are left out.

struct Routing {
  std::vector<int64_t> expert_of_pair;  // -1 for skipped slots
  std::vector<int64_t> order;           // pair indices grouped by expert
  std::vector<int64_t> offsets;         // expert e owns order[offsets[e] : offsets[e+1]]
  std::vector<int64_t> hit_experts;
};

Routing route(const Tensor& ids, int64_t E) {
  Routing routing;
  Tensor ids64 = ids.to(at::kLong).contiguous();
  const int64_t* id = ids64.data_ptr<int64_t>();
  const int64_t pairs = ids64.numel();
  routing.expert_of_pair.assign(id, id + pairs);
  routing.offsets.assign(E + 1, 0);
  for (int64_t p = 0; p < pairs; ++p)
    if (id[p] >= 0) ++routing.offsets[id[p] + 1];
  for (int64_t e = 0; e < E; ++e) {
    if (routing.offsets[e + 1] > 0) routing.hit_experts.push_back(e);
    routing.offsets[e + 1] += routing.offsets[e];
  }
  routing.order.resize(routing.offsets[E]);
  std::vector<int64_t> cursor(routing.offsets.begin(), routing.offsets.end() - 1);
  for (int64_t p = 0; p < pairs; ++p)
    if (id[p] >= 0) routing.order[cursor[id[p]]++] = p;
  return routing;
}

// A large per-call buffer whose pages survive the call: a fresh multi-megabyte allocation costs
// page faults and zero-filling every time, which at decode is as much as the LoRA math itself.
// Released buffers wait in a small process-wide free list (concurrent calls each get their own); a
// request takes the smallest free buffer that fits. When the list is full, a released buffer
// replaces the smallest one kept if it is larger, so the list settles on the sizes a step needs.
template <typename T>
class ReusedBuffer {
 public:
  explicit ReusedBuffer(size_t size) {
    FreeList& list = free_list();
    std::lock_guard<std::mutex> lock(list.mutex);
    auto& blocks = list.blocks;
    size_t best = blocks.size();
    for (size_t i = 0; i < blocks.size(); ++i)
      if (blocks[i].capacity >= size && (best == blocks.size() || blocks[i].capacity < blocks[best].capacity)) best = i;
    if (best < blocks.size()) {
      block_ = std::move(blocks[best]);
      blocks.erase(blocks.begin() + best);
    } else if (size * sizeof(T) >= kHugePageBytes) {
      // The large ones (activation rows, pre-activations, gradients the kernels stream) on huge pages.
      block_ = {Storage(static_cast<T*>(map_pages(size * sizeof(T))), Release{size * sizeof(T)}), size};
    } else {
      // Uninitialized (no zero fill) and cache-line aligned: the kernels' 32- and 64-byte row loads
      // would otherwise straddle two lines every other load (operator new aligns to 16 bytes only).
      block_ = {Storage(static_cast<T*>(::operator new[](size * sizeof(T), std::align_val_t{kAlignment}))), size};
    }
  }
  ~ReusedBuffer() {
    FreeList& list = free_list();
    std::lock_guard<std::mutex> lock(list.mutex);
    auto& blocks = list.blocks;
    if (blocks.size() < kKept) {
      blocks.push_back(std::move(block_));
      return;
    }
    size_t smallest = 0;
    for (size_t i = 1; i < blocks.size(); ++i)
      if (blocks[i].capacity < blocks[smallest].capacity) smallest = i;
    if (blocks[smallest].capacity < block_.capacity) blocks[smallest] = std::move(block_);
  }
  ReusedBuffer(const ReusedBuffer&) = delete;
  ReusedBuffer& operator=(const ReusedBuffer&) = delete;
  T* data() const { return block_.data.get(); }

 private:
  static constexpr size_t kAlignment = 64;
  struct Release {
    size_t mapped_bytes = 0;  // map_pages' bytes; 0: operator new
    void operator()(T* p) const {
      if (mapped_bytes > 0)
        release_pages(p, mapped_bytes);
      else
        ::operator delete[](p, std::align_val_t{kAlignment});
    }
  };
  using Storage = std::unique_ptr<T[], Release>;
  struct Block {
    Storage data;
    size_t capacity = 0;
  };
  struct FreeList {
    std::mutex mutex;
    std::vector<Block> blocks;
  };
  // Never destroyed: a tensor on a buffer (reused_tensor) may die after static destructors ran.
  static FreeList& free_list() {
    static FreeList* list = new FreeList;
    return *list;
  }
  // >= the buffers one training step holds at once (forward ~9, backward ~16 with the LoRA gradients).
  static constexpr size_t kKept = 32;
  Block block_;
};

// A tensor on a ReusedBuffer that goes back to the free list when the tensor's storage dies: for the
// large tensors a step hands out and drops again (the saved pre-activations, freed after backward;
// the LoRA gradients, freed by zero_grad), so the next step reuses their pages instead of faulting in
// fresh ones. Contents are uninitialized.
Tensor reused_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  auto* buffer = new ReusedBuffer<double>(std::max<size_t>((bytes + sizeof(double) - 1) / sizeof(double), 1));
  return at::from_blob(buffer->data(), sizes, [buffer](void*) { delete buffer; }, options);
}

// `t` as a contiguous tensor of `dtype`: `t` itself when it already is one, else a copy on a reused
// buffer (a fresh conversion of a multi-megabyte activation faults in new pages on every call).
Tensor as_reused(const Tensor& t, c10::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return reused_tensor(t.sizes(), t.options().dtype(dtype)).copy_(t);
}

// memset for memory that nobody reads soon (the idle experts' LoRA gradients, read next by the
// optimizer): non-temporal stores skip the read of every line that a cached store makes first, which
// halves the DRAM traffic (9.6 MB of bf16 gradients: 1.8-2.0 ms with memset, 0.95 ms streamed, one
// thread of an Ice Lake Xeon). It ends with a fence: the stores are visible to any thread after it.
void zero_uncached(char* p, size_t bytes) {
#if defined(__SSE2__)
  const size_t head = std::min<size_t>(bytes, (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64);
  std::memset(p, 0, head);
  size_t i = head;
  const __m128i zero = _mm_setzero_si128();
  for (; i + 64 <= bytes; i += 64)
    for (int j = 0; j < 4; ++j) _mm_stream_si128(reinterpret_cast<__m128i*>(p + i + 16 * j), zero);
  std::memset(p + i, 0, bytes - i);
  _mm_sfence();
#else
  std::memset(p, 0, bytes);
#endif
}

// Zeroes the rows of skipped (-1) slots of a [rows_of(pair) x width] per-pair tensor that only routed
// pairs write.
template <typename T>
void zero_skipped_pairs(const Routing& routing, T* data, int64_t planes, int64_t pairs, int64_t width) {
  for (int64_t p = 0; p < pairs; ++p)
    if (routing.expert_of_pair[p] < 0)
      for (int64_t plane = 0; plane < planes; ++plane)
        std::fill(data + (plane * pairs + p) * width, data + (plane * pairs + p + 1) * width, T(0));
}

// ---------------------------------------------------------------------------------------------
// Work layout. Row i of an expert's work is the i-th routed pair of route()'s order, so each expert
// owns a contiguous range of rows. The GEMM inputs are gathered once per call into row buffers in
// that order, in the activation type of the ISA (kernels/gemm.h: bf16 bits on rounding ISAs, exact
// T elsewhere), padded as gemm.h requires; every product then runs on them in place. The rank-r
// LoRA products are GEMMs too: each task packs the LoRA slices it uses into activation panels
// (LoraMatrices), and the LoRA gradients are outer sums over each chunk's rows.
//
// Tasks: one per (expert, block of kColsPerTask output columns), all of the expert's rows inside, in
// chunks of kChunkRows, so the block's weight panels are read from RAM once per call and stay in L2
// across the chunks. Every output element is written by one task in a fixed order: results do not
// depend on the thread count.

constexpr int64_t kColsPerTask = 64;
constexpr int64_t kPanelsPerTask = kColsPerTask / kPanelRows;
// Columns of a transposed (dY Wᵀ) block in the backward: the hidden-gradient block a task keeps in L1
// next to its h/dg/du rows.
constexpr int64_t kNnCols = 64;
constexpr int64_t kChunkRows = 256;
// An expert with at most this many rows takes a task's whole run of blocks in one gemm_nn (then each
// block's LoRA products and epilogue): the few-row forms (up to 8 rows with AVX2, 10 with AVX-512;
// AMX reads W into its tiles directly up to 80), bound by DRAM, read W's rows in longer contiguous
// runs than one block's 64 columns (one thread of a Zen 3, time per run over the old per-block
// calls: 0.78-0.88x at 1-4 rows, 0.78-0.89x at 5-8).
constexpr int64_t kRunWideRows = 8;
// Tasks ahead whose LoRA slices a forward task prefetches: the next ones claimed, by this thread or
// another, which would otherwise start by reading them cold from RAM.
constexpr int64_t kLoraPrefetchTasks = 2;
constexpr int64_t kRowsPerTask = 32;  // gathers and other per-row passes
constexpr int64_t kTokensPerTask = 16;
constexpr int64_t kMaxStackRank = 256;  // rank-r rows up to this rank live on the stack

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The row stride of an activation row buffer of n values: act_stride(n), plus one cache line when that
// is an even number of lines. With an odd number of lines, the 16 rows of an A tile (or the few rows of
// a decode GEMM) fall into 16 different L1 sets; at a power-of-two stride (hidden size 2048 or 4096)
// they would all share one set and evict each other and the weights' lines (a 4-KiB-stride A costs the
// backward's 48-row product over W's rows a quarter of its speed).
template <typename Act>
int64_t row_stride(int64_t n) {
  constexpr int64_t line = 64 / sizeof(Act);
  const int64_t stride = act_stride(n);
  return (stride / line) % 2 == 0 ? stride + line : stride;
}

// Rows of a row buffer holding R rows: a GEMM on rows [c0, c0 + m) may read up to row
// c0 + row_capacity(m) (gemm.h), whatever c0.
int64_t row_buffer(int64_t R) { return R + kRowAlign; }

// Per-thread grow-only buffers, 64-byte aligned (pool threads live as long as the process). A task
// uses each slot for one purpose at a time.
enum Slot { kStageA, kStageB, kWeightsA, kWeightsB, kPanels, kConvert, kLoraA, kLoraB, kLoraC, kSlots };

template <typename U>
U* task_buffer(Slot slot, size_t count) {
  struct Buffer {
    void* data = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[kSlots];
  Buffer& b = buffers[slot];
  const size_t bytes = std::max<size_t>((count * sizeof(U) + 63) / 64 * 64, 64);
  if (b.bytes < bytes) {
    std::free(b.data);
    b.data = nullptr;
    b.bytes = 0;
    b.data = std::aligned_alloc(64, bytes);
    if (b.data == nullptr) throw std::bad_alloc();
    b.bytes = bytes;
  }
  return static_cast<U*>(b.data);
}

void parallel_for(int64_t count, const std::function<void(int64_t)>& task) {
  ThreadPool::instance().parallel_for(count, task);
}

// Wall time per named phase of the op, accumulated while enabled (benchmarks/ read it through
// kt_ops._C._phase_times); off by default, when a phase costs one relaxed load.
std::atomic<bool> g_time_phases{false};

struct PhaseTimes {
  std::mutex mutex;
  std::vector<std::pair<std::string, double>> seconds;  // in first-seen order
};
PhaseTimes& phase_times() {
  static PhaseTimes* times = new PhaseTimes;
  return *times;
}

class Phase {
 public:
  explicit Phase(const char* name) : name_(g_time_phases.load(std::memory_order_relaxed) ? name : nullptr) {
    if (name_) start_ = std::chrono::steady_clock::now();
  }
  ~Phase() {
    if (!name_) return;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    PhaseTimes& t = phase_times();
    std::lock_guard<std::mutex> lock(t.mutex);
    for (auto& [name, total] : t.seconds)
      if (name == name_) {
        total += s;
        return;
      }
    t.seconds.emplace_back(name_, s);
  }
  Phase(const Phase&) = delete;
  Phase& operator=(const Phase&) = delete;

 private:
  const char* name_;
  std::chrono::steady_clock::time_point start_;
};

// (expert, column block) tasks over `cols` output columns.
struct BlockTask {
  int64_t expert, block;
};

// f(task) for the kLoraPrefetchTasks tasks after task ti.
template <typename F>
void for_tasks_ahead(const std::vector<BlockTask>& tasks, int64_t ti, F f) {
  const int64_t last = std::min<int64_t>(ti + kLoraPrefetchTasks, static_cast<int64_t>(tasks.size()) - 1);
  for (int64_t next = ti + 1; next <= last; ++next) f(tasks[next]);
}

std::vector<BlockTask> block_tasks(const Routing& routing, int64_t cols, int64_t cols_per_task = kColsPerTask) {
  std::vector<BlockTask> tasks;
  for (int64_t e : routing.hit_experts)
    for (int64_t b = 0; b * cols_per_task < cols; ++b) tasks.push_back({e, b});
  return tasks;
}

// The backward's tasks: runs of consecutive column blocks of one expert, so that a task knows the
// weight columns it reads next and prefetches them while it multiplies (see prefetch_columns).
// Enough runs per expert for every thread to have work.
struct BlockRun {
  int64_t expert, first, count;
};

std::vector<BlockRun> block_runs(const Routing& routing, int64_t cols, int64_t cols_per_block) {
  const int64_t blocks = ceil_div(cols, cols_per_block), hits = routing.hit_experts.size();
  const int64_t wanted = 4 * ThreadPool::instance().num_threads();
  const int64_t parts = std::min(blocks, std::max<int64_t>(2, ceil_div(wanted, std::max<int64_t>(hits, 1))));
  std::vector<BlockRun> runs;
  for (int64_t e : routing.hit_experts)
    for (int64_t part = 0; part < parts; ++part) {
      const int64_t first = part * blocks / parts, last = (part + 1) * blocks / parts;
      if (last > first) runs.push_back({e, first, last - first});
    }
  return runs;
}

// The prefetch (gemm.h's extras) of W's columns [k0, k0 + kc) for the next repack: one run of lines
// per panel. Only packed bf16 weights are read in place; quantized ones are dequantized anyway.
template <typename Act>
void prefetch_columns(const ExpertWeights& w, int64_t e, int64_t k0, int64_t kc, ExtraProducts<Act>& extra) {
  if (!w.is_bf16() || kc <= 0) return;
  const NnWeights panels = w.nn_weights(e);
  extra.prefetch = reinterpret_cast<const char*>(panels.panels + (k0 / 2) * 2 * kPanelRows);
  extra.prefetch_stride = panels.kp * 2 * kPanelRows * static_cast<int64_t>(sizeof(uint16_t));
  extra.prefetch_rows = static_cast<int>(padded_rows(w.rows()) / kPanelRows);
  extra.prefetch_lines = static_cast<int>(ceil_div(kc, 2));
}

// Rows of a [rows, n] tensor of T, bf16 or another float type (converted to T once), as activations
// or as exact T values.
template <typename T, typename Act>
class RowSource {
  static constexpr bool kSplitAct = sizeof(Act) == 2;

 public:
  RowSource(const Tensor& t, int64_t n) : n_(n) {
    const auto dtype = c10::CppTypeToScalarType<T>::value;
    tensor_ = t.scalar_type() == at::kBFloat16 || t.scalar_type() == dtype ? t.contiguous() : as_reused(t, dtype);
    if (tensor_.scalar_type() == dtype)
      values_ = tensor_.data_ptr<T>();
    else
      bf16_ = static_cast<const uint16_t*>(tensor_.data_ptr());
  }
  void to_act(const Kernels<T, Act>& k, int64_t row, Act* dst, int64_t n_padded) const {
    if (bf16_)
      k.bf16_to_act(bf16_ + row * n_, n_, dst, n_padded);
    else
      k.to_act(values_ + row * n_, n_, dst, n_padded);
  }
  // Whether to_act is exact (bf16 rows into bf16 activations, or exact activation types).
  bool exact_in(const Kernels<T, Act>&) const { return bf16_ != nullptr || !kSplitAct; }
  // What to_act left out of row `row` (see to_act_residual); only needed where exact_in is false.
  void residual(const Kernels<T, Act>& k, int64_t row, Act* dst, int64_t n_padded) const {
    k.to_act_residual(values_ + row * n_, n_, dst, n_padded);
  }
  // Columns [c0, c0 + count) of row `row` in T: in place, or widened from bf16 into `scratch`.
  // Without scratch, only the in-place case answers (nullptr otherwise).
  const T* segment(int64_t row, int64_t c0, int64_t count, T* scratch) const {
    if (values_) return values_ + row * n_ + c0;
    if (scratch == nullptr) return nullptr;
    const uint16_t* src = bf16_ + row * n_ + c0;
    for (int64_t c = 0; c < count; ++c) scratch[c] = static_cast<T>(bf16_value(src[c]));
    return scratch;
  }
  const T* row_values(int64_t row, T* scratch) const { return segment(row, 0, n_, scratch); }
  // Fetches columns [c0, c0 + count) of row `row` into L2 (a hint; no conversion): L2, where the
  // stream of weights that a task reads meanwhile does not evict them.
  void prefetch(int64_t row, int64_t c0, int64_t count) const {
    const char* first = values_ ? reinterpret_cast<const char*>(values_ + row * n_ + c0)
                                : reinterpret_cast<const char*>(bf16_ + row * n_ + c0);
    const char* end = first + count * (values_ ? sizeof(T) : sizeof(uint16_t));
    for (uintptr_t line = reinterpret_cast<uintptr_t>(first) & ~uintptr_t{63}; line < reinterpret_cast<uintptr_t>(end);
         line += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(line), 0, 2);
  }
  // Row `row` as its bf16 bits when the source is bf16, else nullptr.
  const uint16_t* bf16_row(int64_t row) const { return bf16_ ? bf16_ + row * n_ : nullptr; }
  T value(int64_t row, int64_t col) const {
    return values_ ? values_[row * n_ + col] : static_cast<T>(bf16_value(bf16_[row * n_ + col]));
  }
  // dst[c * rows + q] = value(row0 + q, c0 + c) for q < rows, c < count: a block of columns transposed.
  // From bf16 into float, 8 x 8 blocks go through an SSE2 transpose of the 16-bit values, widened as
  // they are stored: element by element (a strided store each) it took 1.5% of a qlen-128 forward with
  // LoRA, a fifth of LoRA's cost there.
  void transpose_columns(int64_t row0, int64_t rows, int64_t c0, int64_t count, T* dst) const {
    int64_t q = 0;
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, float>) {
      const __m128i zero = _mm_setzero_si128();
      for (; bf16_ != nullptr && q + 8 <= rows; q += 8) {
        int64_t c = 0;
        for (; c + 8 <= count; c += 8) {
          __m128i v[8];
          for (int i = 0; i < 8; ++i)
            v[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bf16_ + (row0 + q + i) * n_ + c0 + c));
          // rows i and i + 1 interleaved, then row pairs, then quads: the 8 rows of each column
          __m128i a[8], b[8];
          for (int i = 0; i < 4; ++i) {
            a[2 * i] = _mm_unpacklo_epi16(v[2 * i], v[2 * i + 1]);
            a[2 * i + 1] = _mm_unpackhi_epi16(v[2 * i], v[2 * i + 1]);
          }
          for (int i = 0; i < 2; ++i)
            for (int h = 0; h < 2; ++h) {
              b[4 * i + 2 * h] = _mm_unpacklo_epi32(a[4 * i + h], a[4 * i + 2 + h]);
              b[4 * i + 2 * h + 1] = _mm_unpackhi_epi32(a[4 * i + h], a[4 * i + 2 + h]);
            }
          for (int j = 0; j < 4; ++j) {
            const __m128i columns[2] = {_mm_unpacklo_epi64(b[j], b[4 + j]), _mm_unpackhi_epi64(b[j], b[4 + j])};
            for (int h = 0; h < 2; ++h) {
              float* out = dst + (c + 2 * j + h) * rows + q;
              _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi16(zero, columns[h]));
              _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 4), _mm_unpackhi_epi16(zero, columns[h]));
            }
          }
        }
        for (; c < count; ++c)
          for (int i = 0; i < 8; ++i) dst[c * rows + q + i] = value(row0 + q + i, c0 + c);
      }
    }
#endif
    for (; q < rows; ++q)
      for (int64_t c = 0; c < count; ++c) dst[c * rows + q] = value(row0 + q, c0 + c);
  }

 private:
  Tensor tensor_;
  const T* values_ = nullptr;
  const uint16_t* bf16_ = nullptr;
  int64_t n_;
};

// Split bf16 (rounding ISAs): a value v is the sum hi + lo of two bf16 numbers (hi = bf16(v), lo =
// bf16(v - hi)), exact to about 2^-17 relative. The LoRA products use it for the LoRA matrices and
// the rank-r intermediates, so that on these ISAs only the activations (the base GEMMs' inputs) are
// rounded, at the cost of two or three bf16 products per LoRA product, which the tiles absorb:
//   expansion   V . B^T  ~ Vhi . Bhi^T + Vlo . Bhi^T + Vhi . Blo^T   (extra products of the base GEMM)
//   contraction X . A^T  ~ X . [Ahi; Alo]^T, the two halves of the result summed
// (the dropped Vlo . Blo is below 2^-16 relative). LoRA matrices that are bf16 already have no lo
// part; exact ISAs (Act = T) use v itself.
inline uint16_t round_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
inline uint16_t bf16_lo(float x, uint16_t hi) {
  const float rest = x - bf16_value(hi);
  return std::isfinite(rest) ? round_bf16(rest) : uint16_t(0);
}

template <typename Act>
constexpr bool kSplit = sizeof(Act) == 2;
// The row stride of an expansion's A rows over rank n: [hi | lo] halves (split) or the values.
template <typename Act>
constexpr int64_t expansion_stride(int64_t n) {
  return kSplit<Act> ? 2 * act_stride(n) : act_stride(n);
}

// An expansion's A row: hi and lo of v in two halves of act_stride(n) (split), or v itself; the
// padding of each is zero.
template <typename T, typename Act>
void expansion_row(const Kernels<T, Act>& k, const T* v, int64_t n, Act* dst) {
  const int64_t half = act_stride(n);
  if constexpr (kSplit<Act>) {
    for (int64_t q = 0; q < n; ++q) {
      const uint16_t hi = round_bf16(static_cast<float>(v[q]));
      dst[q] = hi;
      dst[half + q] = bf16_lo(static_cast<float>(v[q]), hi);
    }
    std::fill(dst + n, dst + half, Act(0));
    std::fill(dst + half + n, dst + 2 * half, Act(0));
  } else {
    k.to_act(v, n, dst, half);
  }
}

// The six LoRA matrices, which the tasks read slice by slice: in place when they are T, else
// converted (bf16, or another float type converted once). Each task packs the slices its products
// need into its own scratch, where the GEMM reads them from cache:
//   an expansion V . B^T (B = Bg, Bu, Bd rows of the block's columns; Ad, [Ag; Au] columns of the
//     block in the backward) takes B's hi (and lo) panels as extra products of the block's GEMM;
//   a contraction X . A^T (x . [Ag; Au]^T, dY . Bd, per expert) runs over the hi and lo panels;
//   the exact contractions of h, dg, du (contract) read Ad^T, Bg, Bu as T rows.
template <typename T, typename Act>
class LoraMatrices {
 public:
  enum Which { GateA, GateB, UpA, UpB, DownA, DownB };

  explicit LoraMatrices(const LoraArgs& args) {
    const Tensor* all[6] = {&args.gate_a, &args.gate_b, &args.up_a, &args.up_b, &args.down_a, &args.down_b};
    for (int m = 0; m < 6; ++m) {
      rows_[m] = all[m]->size(1);
      cols_[m] = all[m]->size(2);
      // A bf16 matrix is its own hi: it has no lo part.
      lo_[m] = kSplit<Act> && all[m]->scalar_type() != at::kBFloat16;
      sources_[m].emplace(*all[m], cols_[m]);
    }
  }
  int64_t rows(Which m) const { return rows_[m]; }
  int64_t cols(Which m) const { return cols_[m]; }
  bool has_lo(Which m) const { return lo_[m]; }
  // Rows [r0, r0 + n) of expert e's matrix m in T, cols(m) apart: in place or converted into
  // `scratch` (room for n * cols(m)).
  const T* rows_of(Which m, int64_t e, int64_t r0, int64_t n, T* scratch) const {
    const int64_t first = e * rows_[m] + r0;
    const T* in_place = sources_[m]->segment(first, 0, 0, nullptr);
    if (in_place != nullptr) return in_place;
    for (int64_t i = 0; i < n; ++i) sources_[m]->segment(first + i, 0, cols_[m], scratch + i * cols_[m]);
    return scratch;
  }
  // The activation panels (stride apart, at dst) of the block rows [r0, r0 + n) x columns [c0, c0 +
  // ncols) of expert e's matrix m, or of its transpose (by_columns), packed straight from the matrix's
  // bits where it is bf16 (widened as they are placed where the activations are wider: converting
  // rows first, then packing them, took ~9% of a forward at qlen 32 with r = 16 on fp32 ISAs). False,
  // with nothing written, for other matrices (pack_slice packs those from T values).
  bool pack_bits(const Kernels<T, Act>& k, Which m, int64_t e, int64_t r0, int64_t n, int64_t c0, int64_t ncols,
                 bool by_columns, Act* dst, int64_t stride) const {
    const uint16_t* bits = sources_[m]->bf16_row(e * rows_[m] + r0);
    if (bits == nullptr) return false;
    const int rows = static_cast<int>(n), cols = static_cast<int>(ncols);
    if (by_columns)
      k.pack_cols(bits + c0, cols_[m], rows, cols, dst, stride);
    else
      k.pack_rows(bits + c0, cols_[m], rows, cols, dst, stride);
    return true;
  }
  // The block rows [r0, r0 + n) x columns [c0, c0 + ncols) of expert e's matrix m into cache.
  void prefetch(Which m, int64_t e, int64_t r0, int64_t n, int64_t c0, int64_t ncols) const {
    for (int64_t q = 0; q < n; ++q) sources_[m]->prefetch(e * rows_[m] + r0 + q, c0, ncols);
  }
  // Columns [c0, c0 + n) of expert e's matrix m transposed, into dst [n][rows(m)] as T, in one pass.
  void copy_columns(Which m, int64_t e, int64_t c0, int64_t n, T* dst) const {
    sources_[m]->transpose_columns(e * rows_[m], rows_[m], c0, n, dst);
  }
  // Columns [c0, c0 + n) of row `row` of expert e's matrix m, into dst as T: a task converts only
  // the slice it uses, not whole rows once per column block.
  void copy_segment(Which m, int64_t e, int64_t row, int64_t c0, int64_t n, T* dst) const {
    const T* src = sources_[m]->segment(e * rows_[m] + row, c0, n, dst);
    if (src != dst) std::copy_n(src, n, dst);
  }

 private:
  int64_t rows_[6] = {}, cols_[6] = {};
  bool lo_[6] = {};
  std::optional<RowSource<T, Act>> sources_[6];
};

// hi (and lo) activation panels of a LoRA slice, in a task's scratch; stride apart.
template <typename Act>
struct SlicePanels {
  const Act* hi = nullptr;
  const Act* lo = nullptr;
  int64_t stride = 0;
};

// The panels of B = M [N rows, K] (T, lds apart) or of B = M^T (by_columns: M [K rows, N]).
template <typename T, typename Act>
SlicePanels<Act> pack_slice(const Kernels<T, Act>& k, const T* m, int64_t lds, int64_t N, int64_t K, bool by_columns,
                            bool lo, Slot slot) {
  SlicePanels<Act> out;
  out.stride = act_panel_elems(K);
  const int64_t set = ceil_div(N, kPanelRows) * out.stride;
  Act* buffer = task_buffer<Act>(slot, (lo ? 2 : 1) * set);
  Act* lo_panels = lo ? buffer + set : nullptr;
  if (by_columns)
    k.pack_cols_split(m, lds, static_cast<int>(K), static_cast<int>(N), buffer, lo_panels, out.stride);
  else
    k.pack_rows_split(m, lds, static_cast<int>(N), static_cast<int>(K), buffer, lo_panels, out.stride);
  out.hi = buffer;
  out.lo = lo_panels;
  return out;
}

// pack_slice of the block rows [r0, r0 + n) x columns [c0, c0 + ncols) of expert e's LoRA matrix m
// (by_columns: of its transpose), from the matrix's own bits where LoraMatrices::pack_bits can, else
// from its T values: whole rows in place where they are T, else converted or copied into `scratch`
// (room for n * ncols).
template <typename T, typename Act>
SlicePanels<Act> pack_lora(const Kernels<T, Act>& k, const LoraMatrices<T, Act>& lora,
                           typename LoraMatrices<T, Act>::Which m, int64_t e, int64_t r0, int64_t n, int64_t c0,
                           int64_t ncols, bool by_columns, Slot slot, T* scratch) {
  const int64_t N = by_columns ? ncols : n, K = by_columns ? n : ncols;
  SlicePanels<Act> out;
  out.stride = act_panel_elems(K);
  Act* panels = task_buffer<Act>(slot, ceil_div(N, kPanelRows) * out.stride);
  if (lora.pack_bits(k, m, e, r0, n, c0, ncols, by_columns, panels, out.stride)) {
    out.hi = panels;
    return out;
  }
  const T* values = scratch;
  if (c0 == 0 && ncols == lora.cols(m))
    values = lora.rows_of(m, e, r0, n, scratch);
  else
    for (int64_t q = 0; q < n; ++q) lora.copy_segment(m, e, r0 + q, c0, ncols, scratch + q * ncols);
  return pack_slice(k, values, ncols, N, K, by_columns, lora.has_lo(m), slot);
}

// The extra products of an expansion (gemm.h): V . B^T added to a weight GEMM's C, with V's rows
// written by expansion_row (lda = expansion_stride(n)) and B's panels starting at the GEMM's first.
template <typename Act>
ExtraProducts<Act> expansion(const SlicePanels<Act>& b, const Act* rows, int64_t n) {
  ExtraProducts<Act> extra;
  extra.K = static_cast<int>(n);
  extra.lda = expansion_stride<Act>(n);
  extra.panel_stride = b.stride;
  extra.a[0] = rows;
  extra.b[0] = b.hi;
  extra.count = 1;
  if constexpr (kSplit<Act>) {
    extra.a[1] = rows + act_stride(n);
    extra.b[1] = b.hi;
    extra.count = 2;
    if (b.lo != nullptr) {
      extra.a[2] = rows;
      extra.b[2] = b.lo;
      extra.count = 3;
    }
  }
  return extra;
}

// C += the extra products (the LoRA expansions) over np panels, by the table's gemm_a, as the weight
// GEMMs add them after their own product (the same bits): for rows whose base product ran elsewhere
// (on the codes, or over a backward task's whole run of blocks).
template <typename T, typename Act>
void add_products(const Kernels<T, Act>& k, const ExtraProducts<Act>& extra, int64_t m, int64_t np, T* c, int64_t ldc) {
  for (int j = 0; j < extra.count; ++j)
    k.gemm_a(extra.a[j], extra.lda, static_cast<int>(m), extra.K, extra.b[j], extra.panel_stride, static_cast<int>(np),
             c, ldc, true);
}

// VariantArgs checked and converted to T (biases are [E, I] / [E, H]: small, converted whole).
template <typename T>
class Variant {
 public:
  Variant(const VariantArgs& v, const Shapes& s)
      : kind(check_variant(v, s.E, s.H, s.I)),
        glu{kind != Activation::Silu, kind == Activation::ClampedSilu ? T(1) : static_cast<T>(v.alpha),
            kind == Activation::ClampedSilu ? T(0) : T(1), static_cast<T>(v.limit)},
        gate_(convert(v.gate_bias)), up_(convert(v.up_bias)), down_(convert(v.down_bias)), I_(s.I), H_(s.H) {}

  // The expert's bias row, or nullptr without that bias.
  const T* gate_bias(int64_t e) const { return gate_.defined() ? gate_.data_ptr<T>() + e * I_ : nullptr; }
  const T* up_bias(int64_t e) const { return up_.defined() ? up_.data_ptr<T>() + e * I_ : nullptr; }
  const T* down_bias(int64_t e) const { return down_.defined() ? down_.data_ptr<T>() + e * H_ : nullptr; }

  const Activation kind;
  const Glu<T> glu;

 private:
  static Tensor convert(const std::optional<Tensor>& t) {
    return t.has_value() ? t->to(c10::CppTypeToScalarType<T>::value).contiguous() : Tensor();
  }
  const Tensor gate_, up_, down_;
  const int64_t I_, H_;
};

// out[t] = sum over the token's valid slots j of rows[t * k + j], in slot order so the result does
// not depend on scheduling.
template <typename T>
void combine_rows(const Shapes& s, const Routing& routing, const T* rows, int64_t width, T* out) {
  parallel_for(ceil_div(s.T, kTokensPerTask), [&](int64_t task) {
    for (int64_t t = task * kTokensPerTask; t < std::min(s.T, (task + 1) * kTokensPerTask); ++t) {
      T* o = out + t * width;
      std::fill(o, o + width, T(0));
      for (int64_t j = 0; j < s.k; ++j) {
        const int64_t p = t * s.k + j;
        if (routing.expert_of_pair[p] < 0) continue;
        const T* row = rows + p * width;
        for (int64_t n = 0; n < width; ++n) o[n] += row[n];
      }
    }
  });
}

// Weight panels [p0, p0 + np) of `w` for expert e, in `buffer` when they must be dequantized.
inline const uint16_t* weight_panels(const ExpertWeights& w, int64_t e, int64_t p0, int64_t np, int64_t& stride,
                                     Slot slot) {
  uint16_t* buffer = w.is_bf16() ? nullptr : task_buffer<uint16_t>(slot, w.nt_buffer_elems(np));
  return w.nt_panels(e, p0, np, stride, buffer);
}

// Whether an expert's `rows` rows take the products straight on the codes (quant.h): decode, where
// dequantizing whole panels would cost more than the bandwidth it saves, and the integer-coded
// formats' rows (int8, 4-bit) under integer_dot_enabled() (runtime/cpu.h).
template <typename T>
bool on_codes(const ExpertWeights& w, int64_t rows, bool integer_dot) {
  return std::is_same_v<T, float> && w.codes_path(rows, integer_dot);
}

// The input rows of the experts that on_codes takes, as the codes kernels read them: fp32 values and,
// where the kernel multiplies quantized rows (integer codes), their quantization. Prepared once per row and
// call: every (expert, column block) task of the expert reads them (22-32 tasks per expert of
// DeepSeek-V2-Lite), which would otherwise convert and quantize the same rows each. An expert's rows
// are consecutive slots; `shape` gives K and the groups (gate and up share them).
class CodesRows {
 public:
  CodesRows(const ExpertWeights& shape, int64_t rows)
      : K_(shape.cols()), groups_(shape.activation_groups()), q_stride_(2 * k_pairs(K_)),
        quantized_(shape.codes_quantized()), values_(std::max<int64_t>(rows * K_, 1)),
        q_(quantized_ ? std::max<int64_t>(rows * q_stride_, 1) : 1),
        q8_(quantized_ ? (rows + kTileRowSlack) * q_stride_ : 1),
        step_(quantized_ ? std::max<int64_t>(rows * groups_, 1) : 1), usable_(std::max<int64_t>(rows, 1), 0),
        row_pointers_(rows) {
    for (int64_t slot = 0; slot < rows; ++slot) row_pointers_[slot] = row(slot);
  }

  float* row(int64_t slot) const { return values_.data() + slot * K_; }
  // Quantizes the m rows from `slot` (one expert's, all written) where `w` multiplies quantized rows.
  void quantize(const ExpertWeights& w, int64_t slot, int64_t m) {
    if (!quantized_) return;
    const bool usable = w.quantize_rows(row_pointers_.data() + slot, static_cast<int>(m), q_.data() + slot * q_stride_,
                                        q8_.data() + slot * q_stride_, step_.data() + slot * groups_);
    std::fill_n(usable_.begin() + slot, m, usable);
  }
  // C [m, 16 np] = rows [slot, slot + m) . W_e^T over panels [p0, p0 + np) of `w`.
  template <typename T>
  void gemm(const ExpertWeights& w, int64_t e, int64_t slot, int64_t m, int64_t p0, int64_t np, T* c) const {
    if constexpr (std::is_same_v<T, float>) {
      const QuantizedRows quantized{q_.data() + slot * q_stride_, q8_.data() + slot * q_stride_,
                                    step_.data() + slot * groups_, groups_};
      w.gemm_nt_codes(e, row_pointers_.data() + slot, usable_[slot] ? &quantized : nullptr, static_cast<int>(m), p0, np,
                      c);
    }
  }

 private:
  const int64_t K_, groups_, q_stride_;
  const bool quantized_;
  const ReusedBuffer<float> values_;
  const ReusedBuffer<int16_t> q_;
  // The AMX tile products (quant_amx.inc) load rows in blocks of 16: up to 15 rows past the last.
  static constexpr int64_t kTileRowSlack = 15;
  const ReusedBuffer<int8_t> q8_;
  const ReusedBuffer<float> step_;
  std::vector<char> usable_;                // per slot: its expert's quantization is there (no NaN / Inf in its rows)
  std::vector<const float*> row_pointers_;  // row(slot) per slot, as the kernels take rows
};

// ---------------------------------------------------------------------------------------------
// Forward:
//   1. gather x into rows (activations);
//   2. (LoRA) xa = x . [Ag; Au]^T per expert; saved, and s xa as activations;
//   3. gate and up per (expert, column block): x . W^T + (s xa) . B^T, the activation in the
//      epilogue: h as activation rows, g and u saved for backward;
//   4. (LoRA) ha = h . Ad^T per expert;
//   5. down per (expert, column block): h . Wd^T + (s ha) . Bd^T (+ bias), times the routing
//      weight, into per-pair rows; 6. summed per token.

template <typename T, typename Act>
class Forward {
 public:
  Forward(const Shapes& s, const Kernels<T, Act>& k, const Tensor& hidden, const Tensor& ids, const Tensor& weights,
          const ExpertWeights& gate_w, const ExpertWeights& up_w, const ExpertWeights& down_w,
          const LoraArgs& lora_args, T scaling, bool save, const Variant<T>& variant)
      : s_(s), k_(k), hidden_(hidden), gate_w_(gate_w), up_w_(up_w), down_w_(down_w), lora_args_(lora_args),
        scaling_(scaling), save_(save), variant_(variant), routing_(route(ids, s.E)), R_(routing_.order.size()),
        order_(routing_.order.data()), w_(as_reused(weights, dtype())), ldx_(row_stride<Act>(s.H)),
        ldh_(row_stride<Act>(s.I)), ldr_(expansion_stride<Act>(s.r)), xs_(std::max<int64_t>(row_buffer(R_) * ldx_, 1)),
        hs_(std::max<int64_t>(row_buffer(R_) * ldh_, 1)), lora_act_(std::max<int64_t>(3 * row_buffer(R_) * ldr_, 1)),
        ha_partial_(std::max<int64_t>(R_ * ceil_div(padded_rows(s.I), kColsPerTask) * s.r, 1)),
        y_(std::max<int64_t>(s.pairs() * s.H, 1)) {
    codes_base_.assign(s.E, -1);
    int64_t slots = 0;
    const bool integer_dot = integer_dot_enabled();  // once: every expert of the call sees one setting
    for (int64_t e : routing_.hit_experts) {
      const int64_t rows = routing_.offsets[e + 1] - routing_.offsets[e];
      if (!on_codes<T>(gate_w_, rows, integer_dot)) continue;
      codes_experts_.push_back(e);
      codes_base_[e] = slots;
      slots += rows;
    }
    if (slots == 0) return;
    codes_x_.emplace(gate_w_, slots);
    codes_h_.emplace(down_w_, slots);
    if (s.r > 0) codes_scaled_.emplace(3 * slots * s.r);
    codes_slots_ = slots;
  }

  std::tuple<Tensor, Tensor, Tensor> run() {
    const auto opts = hidden_.options().dtype(dtype());
    const int64_t P = s_.pairs();
    gate_up_pre_ = save_ ? reused_tensor({2, P, s_.I}, opts) : at::empty({0}, opts);
    if (save_) zero_skipped_pairs(routing_, gate_up_pre_.data_ptr<T>(), 2, P, s_.I);
    lora_mid_ = save_ ? reused_tensor({3, P, s_.r}, opts).zero_() : at::empty({0}, opts);
    lora_mid_data_ = save_ ? lora_mid_.data_ptr<T>() : nullptr;
    Tensor out = reused_tensor({s_.T, s_.H}, opts);
    if (R_ == 0) {
      out.zero_();
      return {as_reused(out, hidden_.scalar_type()), gate_up_pre_, lora_mid_};
    }
    {
      const Phase phase("forward: gather x");
      gather_x();
    }
    std::optional<LoraMatrices<T, Act>> lora;
    if (s_.r > 0) lora.emplace(lora_args_);
    if (s_.r > 0) {
      const Phase phase("forward: x . A^T");
      input_rank_products(*lora);
    }
    if (codes_slots_ > 0) {
      const Phase phase("forward: rows on codes (x)");
      prepare_codes_x();
    }
    {
      const Phase phase("forward: gate/up GEMM + activation");
      gate_up(lora ? &*lora : nullptr);
    }
    if (s_.r > 0) {
      const Phase phase("forward: h . Ad^T sums");
      down_rank_products();
    }
    if (codes_slots_ > 0) {
      const Phase phase("forward: rows on codes (h)");
      prepare_codes_h();
    }
    {
      const Phase phase("forward: down GEMM");
      down(lora ? &*lora : nullptr);
    }
    const Phase phase("forward: combine");
    combine_rows<T>(s_, routing_, y_.data(), s_.H, out.data_ptr<T>());
    return {as_reused(out, hidden_.scalar_type()), gate_up_pre_, lora_mid_};
  }

 private:
  static constexpr c10::ScalarType dtype() { return c10::CppTypeToScalarType<T>::value; }
  // s * (rank-r product) rows as activations: [which][row capacity][ldr].
  Act* lora_act(int which) const { return lora_act_.data() + which * row_buffer(R_) * ldr_; }
  // The s * (rank-r product) values of plane `which` (0 xa_g, 1 xa_u, 2 ha) for an on-codes row slot.
  T* codes_scaled(int which, int64_t slot) const {
    return codes_scaled_->data() + (which * codes_slots_ + slot) * s_.r;
  }

  // x as activation rows; with LoRA, when rounding them loses something (fp32 hidden states on a
  // rounding ISA), also what it lost, for the exact contraction x . A^T (split bf16, see above).
  void gather_x() {
    const RowSource<T, Act> source(hidden_, s_.H);
    if (s_.r > 0 && !source.exact_in(k_))
      xs_lo_ = std::make_unique<ReusedBuffer<Act>>(std::max<int64_t>(row_buffer(R_) * ldx_, 1));
    parallel_for(ceil_div(R_, kRowsPerTask), [&](int64_t task) {
      for (int64_t i = task * kRowsPerTask; i < std::min(R_, (task + 1) * kRowsPerTask); ++i) {
        source.to_act(k_, order_[i] / s_.k, xs_.data() + i * ldx_, ldx_);
        if (xs_lo_) source.residual(k_, order_[i] / s_.k, xs_lo_->data() + i * ldx_, ldx_);
      }
    });
  }

  // xa = x . [Ag; Au]^T per expert: saved (lora_mid planes 0, 1; pair order) and kept as s xa
  // activations for the gate / up expansions.
  void input_rank_products(const LoraMatrices<T, Act>& lora) {
    using L = LoraMatrices<T, Act>;
    const int64_t r = s_.r, H = s_.H, np = ceil_div(2 * r, kPanelRows), ldc = np * kPanelRows;
    parallel_for(routing_.hit_experts.size(), [&](int64_t slot) {
      const int64_t e = routing_.hit_experts[slot];
      // [Ag; Au] of the expert (2r rows), packed as B of the contraction: straight from the
      // matrices' bits where each fills whole panels, else from their T rows stacked in scratch.
      SlicePanels<Act> a;
      a.stride = act_panel_elems(H);
      Act* panels = task_buffer<Act>(kPanels, np * a.stride);
      if (r % kPanelRows == 0 && lora.pack_bits(k_, L::GateA, e, 0, r, 0, H, false, panels, a.stride) &&
          lora.pack_bits(k_, L::UpA, e, 0, r, 0, H, false, panels + r / kPanelRows * a.stride, a.stride)) {
        a.hi = panels;
      } else {
        T* stacked = task_buffer<T>(kConvert, 2 * r * H);
        for (int half = 0; half < 2; ++half) {
          const auto which = half ? L::UpA : L::GateA;
          const T* rows = lora.rows_of(which, e, 0, r, stacked + half * r * H);
          if (rows != stacked + half * r * H) std::copy_n(rows, r * H, stacked + half * r * H);
        }
        a = pack_slice(k_, stacked, H, 2 * r, H, false, lora.has_lo(L::GateA) || lora.has_lo(L::UpA), kPanels);
      }
      const int64_t begin = routing_.offsets[e], end = routing_.offsets[e + 1];
      for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
        const int64_t m = std::min(kChunkRows, end - c0);
        T* c = task_buffer<T>(kStageA, row_capacity(m) * ldc);
        const Act* x = xs_.data() + c0 * ldx_;
        k_.gemm_a(x, ldx_, m, H, a.hi, a.stride, np, c, ldc, false);
        if (a.lo) k_.gemm_a(x, ldx_, m, H, a.lo, a.stride, np, c, ldc, true);
        if (xs_lo_) k_.gemm_a(xs_lo_->data() + c0 * ldx_, ldx_, m, H, a.hi, a.stride, np, c, ldc, true);
        for (int64_t i = 0; i < m; ++i)
          for (int plane = 0; plane < 2; ++plane) keep_rank_product(plane, c0 + i, c + i * ldc + plane * r);
      }
    });
  }

  // ha = h . Ad^T: the sum of the gate / up tasks' exact partial contractions, per row.
  void down_rank_products() {
    const int64_t r = s_.r, blocks = blocks_i();
    parallel_for(ceil_div(R_, kRowsPerTask), [&](int64_t task) {
      T* ha = task_buffer<T>(kStageA, r);
      for (int64_t row = task * kRowsPerTask; row < std::min(R_, (task + 1) * kRowsPerTask); ++row) {
        const T* partial = ha_partial_.data() + row * blocks * r;
        std::copy(partial, partial + r, ha);
        for (int64_t b = 1; b < blocks; ++b)
          for (int64_t q = 0; q < r; ++q) ha[q] += partial[b * r + q];
        keep_rank_product(2, row, ha);
      }
    });
  }

  // Rank-r product `plane` (0 xa_g, 1 xa_u, 2 ha) of a row: into lora_mid when saving, and s times it
  // as activations for the expansion.
  void keep_rank_product(int plane, int64_t row, const T* values) {
    const int64_t r = s_.r;
    if (save_) std::copy(values, values + r, lora_mid_data_ + (plane * s_.pairs() + order_[row]) * r);
    T scaled[kMaxStackRank];
    T* s_values = r <= kMaxStackRank ? scaled : task_buffer<T>(kConvert, r);
    for (int64_t q = 0; q < r; ++q) s_values[q] = scaling_ * values[q];
    const int64_t e = routing_.expert_of_pair[order_[row]];
    if (codes_base_[e] >= 0)
      std::copy(s_values, s_values + r, codes_scaled(plane, codes_base_[e] + row - routing_.offsets[e]));
    expansion_row(k_, s_values, r, lora_act(plane) + row * ldr_);
  }

  int64_t blocks_i() const { return ceil_div(padded_rows(s_.I), kColsPerTask); }

  // Decode's few rows on the codes take exact LoRA products (gemm_a_exact) rather than tile
  // products, which would spend 16-row tiles on each; more rows (integer dot products at every row
  // count) take the tile GEMM's own, as add_products.
  static bool few_rows(int64_t rows) { return rows <= kDirectQuantRows; }

  // c = rows . W_e^T over panels [p0, p0 + np) (K = W's columns), plus `extra`. On the fp32 ISAs a
  // quantized W times few rows takes gemm_nt_scaled (its codes decoded in registers, no buffer);
  // otherwise W's bf16 panels: the packed ones, or dequantized into the task buffer `slot` on first
  // use (`panels` and `stride` keep them for the task's next row chunk).
  void weight_product(const ExpertWeights& w, int64_t e, const Act* a, int64_t lda, int64_t m, int64_t p0, int64_t np,
                      T* c, int64_t ldc, const ExtraProducts<Act>* extra, Slot slot, const uint16_t*& panels,
                      int64_t& stride) const {
    if constexpr (std::is_same_v<Act, float>) {
      if (w.scaled_path(m)) {
        w.gemm_nt_scaled(e, a, lda, m, p0, np, c, ldc);
        if (extra != nullptr) add_products(k_, *extra, m, np, c, ldc);
        return;
      }
    }
    if (panels == nullptr) panels = weight_panels(w, e, p0, np, stride, slot);
    k_.gemm_w(a, lda, static_cast<int>(m), static_cast<int>(w.cols()), panels, stride, static_cast<int>(np), c, ldc,
              false, extra);
  }

  // The on-codes experts' input rows, once per call: x as fp32 (the hidden states as given),
  // quantized where the kernel wants.
  void prepare_codes_x() {
    if constexpr (std::is_same_v<T, float>) {
      const RowSource<T, Act> source(hidden_, s_.H);
      parallel_for(codes_experts_.size(), [&](int64_t i) {
        const int64_t e = codes_experts_[i], begin = routing_.offsets[e], m = routing_.offsets[e + 1] - begin;
        const int64_t slot = codes_base_[e];
        for (int64_t row = 0; row < m; ++row) {
          float* dst = codes_x_->row(slot + row);
          const float* values = source.row_values(order_[begin + row] / s_.k, dst);
          if (values != dst) std::copy_n(values, s_.H, dst);
        }
        codes_x_->quantize(gate_w_, slot, m);
      });
    }
  }

  // The same for h (its activations, as the other rows' down GEMM reads them).
  void prepare_codes_h() {
    if constexpr (std::is_same_v<T, float>) {
      parallel_for(codes_experts_.size(), [&](int64_t i) {
        const int64_t e = codes_experts_[i], begin = routing_.offsets[e], m = routing_.offsets[e + 1] - begin;
        const int64_t slot = codes_base_[e];
        for (int64_t row = 0; row < m; ++row) {
          const Act* h = hs_.data() + (begin + row) * ldh_;
          float* dst = codes_h_->row(slot + row);
          if constexpr (std::is_same_v<Act, float>) {
            std::copy_n(h, s_.I, dst);
          } else {
            for (int64_t n = 0; n < s_.I; ++n) dst[n] = bf16_value(h[n]);
          }
        }
        codes_h_->quantize(down_w_, slot, m);
      });
    }
  }

  void gate_up(const LoraMatrices<T, Act>* lora) {
    using L = LoraMatrices<T, Act>;
    const int64_t I = s_.I, Ip = padded_rows(I), P = s_.pairs();
    const auto tasks = block_tasks(routing_, Ip);
    T* prep = save_ ? gate_up_pre_.data_ptr<T>() : nullptr;
    parallel_for(tasks.size(), [&](int64_t ti) {
      const int64_t e = tasks[ti].expert, p0 = tasks[ti].block * kPanelsPerTask;
      const int64_t np = std::min(kPanelsPerTask, Ip / kPanelRows - p0), n0 = p0 * kPanelRows, ldc = np * kPanelRows;
      const int64_t cols = std::min(kColsPerTask, I - n0);
      const bool last_block = p0 + np == Ip / kPanelRows;
      const int64_t begin = routing_.offsets[e], end = routing_.offsets[e + 1];
      const uint16_t *wg = nullptr, *wu = nullptr;
      int64_t stride_g = 0, stride_u = 0;
      const T* gate_bias = variant_.gate_bias(e);
      const T* up_bias = variant_.up_bias(e);
      // The block's LoRA: rows [n0, n0 + 16 np) of Bg and Bu as expansion panels (extra products of the
      // tile GEMM, also after the products on codes, or gemm_a_exact after decode's), and Ad^T's rows
      // [n0, n0 + cols) for the exact h . Ad^T.
      const bool codes = codes_base_[e] >= 0, exact_lora = codes && few_rows(end - begin);
      const int64_t nrows = std::min(np * kPanelRows, I - n0);
      SlicePanels<Act> bg, bu, ad;
      const T* ad_t = nullptr;
      if (lora && exact_lora) {
        // Read after the products on codes, which take long enough for these to arrive from RAM.
        lora->prefetch(L::DownA, e, 0, s_.r, n0, cols);
        lora->prefetch(L::GateB, e, n0, nrows, 0, s_.r);
        lora->prefetch(L::UpB, e, n0, nrows, 0, s_.r);
      } else if (lora) {
        const int64_t r = s_.r;
        for_tasks_ahead(tasks, ti, [&](const BlockTask& next) {
          const int64_t n1 = next.block * kColsPerTask, cols1 = std::min(kColsPerTask, I - n1);
          lora->prefetch(L::GateB, next.expert, n1, cols1, 0, r);
          lora->prefetch(L::UpB, next.expert, n1, cols1, 0, r);
          lora->prefetch(L::DownA, next.expert, 0, r, n1, cols1);
        });
        T* scratch = task_buffer<T>(kConvert, nrows * r * 2);
        bg = pack_lora(k_, *lora, L::GateB, e, n0, nrows, 0, r, false, kLoraA, scratch);
        bu = pack_lora(k_, *lora, L::UpB, e, n0, nrows, 0, r, false, kLoraB, scratch + nrows * r);
        T* transposed = task_buffer<T>(kLoraC, cols * r);  // Ad's columns [n0, n0 + cols) as [cols][r]
        lora->copy_columns(L::DownA, e, n0, cols, transposed);
        ad_t = transposed;
      }
      for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
        const int64_t m = std::min(kChunkRows, end - c0);
        T* cg = task_buffer<T>(kStageA, row_capacity(m) * ldc);
        T* cu = task_buffer<T>(kStageB, row_capacity(m) * ldc);
        if (codes) {
          const int64_t slot = codes_base_[e] + (c0 - begin);
          codes_x_->gemm(gate_w_, e, slot, m, p0, np, cg);
          codes_x_->gemm(up_w_, e, slot, m, p0, np, cu);
          if (lora && !exact_lora) {
            add_products(k_, expansion(bg, lora_act(0) + c0 * ldr_, s_.r), m, np, cg, ldc);
            add_products(k_, expansion(bu, lora_act(1) + c0 * ldr_, s_.r), m, np, cu, ldc);
          } else if (lora) {
            const int64_t r = s_.r;
            T* scratch = task_buffer<T>(kConvert, nrows * r);
            bg = pack_lora(k_, *lora, L::GateB, e, n0, nrows, 0, r, false, kLoraA, scratch);
            k_.gemm_a_exact(codes_scaled(0, slot), r, m, r, bg.hi, bg.lo, bg.stride, np, cg, ldc);
            bu = pack_lora(k_, *lora, L::UpB, e, n0, nrows, 0, r, false, kLoraB, scratch);
            k_.gemm_a_exact(codes_scaled(1, slot), r, m, r, bu.hi, bu.lo, bu.stride, np, cu, ldc);
            // Ad's rows over the block's columns as panels: h . Ad^T by gemm_a_exact below, where the
            // transposed copy that contract reads cost more than the products at one row.
            ad = pack_lora(k_, *lora, L::DownA, e, 0, r, n0, cols, false, kLoraC, task_buffer<T>(kConvert, r * cols));
          }
        } else {
          ExtraProducts<Act> lora_g, lora_u;
          if (lora) {
            lora_g = expansion(bg, lora_act(0) + c0 * ldr_, s_.r);
            lora_u = expansion(bu, lora_act(1) + c0 * ldr_, s_.r);
          }
          const Act* x = xs_.data() + c0 * ldx_;
          weight_product(gate_w_, e, x, ldx_, m, p0, np, cg, ldc, lora ? &lora_g : nullptr, kWeightsA, wg, stride_g);
          weight_product(up_w_, e, x, ldx_, m, p0, np, cu, ldc, lora ? &lora_u : nullptr, kWeightsB, wu, stride_u);
        }
        for (int64_t i = 0; i < m; ++i) {
          const int64_t p = order_[c0 + i];
          T* g = cg + i * ldc;
          T* u = cu + i * ldc;
          if (gate_bias)
            for (int64_t n = 0; n < cols; ++n) g[n] += gate_bias[n0 + n];
          if (up_bias)
            for (int64_t n = 0; n < cols; ++n) u[n] += up_bias[n0 + n];
          if (prep) {
            std::copy(g, g + cols, prep + p * I + n0);
            std::copy(u, u + cols, prep + (P + p) * I + n0);
          }
          T* h = g;  // g is not needed once h is computed
          k_.glu_forward(g, u, cols, variant_.glu, h);
          if (lora) {
            T* partial = ha_partial_.data() + ((c0 + i) * blocks_i() + tasks[ti].block) * s_.r;
            if (exact_lora) {
              const int64_t panels = ceil_div(s_.r, kPanelRows);
              T sums[kMaxStackRank + kPanelRows];
              T* out = s_.r <= kMaxStackRank ? sums : task_buffer<T>(kWeightsA, panels * kPanelRows);
              std::fill(out, out + panels * kPanelRows, T(0));
              k_.gemm_a_exact(h, cols, 1, static_cast<int>(cols), ad.hi, ad.lo, ad.stride, static_cast<int>(panels),
                              out, panels * kPanelRows);
              std::copy(out, out + s_.r, partial);
            } else {
              k_.contract(h, cols, ad_t, s_.r, partial);
            }
          }
          Act* h_row = hs_.data() + (c0 + i) * ldh_;
          k_.to_act(h, cols, h_row + n0, last_block ? ldh_ - n0 : cols);
        }
      }
    });
  }

  void down(const LoraMatrices<T, Act>* lora) {
    using L = LoraMatrices<T, Act>;
    const int64_t H = s_.H, Hp = padded_rows(H);
    const auto tasks = block_tasks(routing_, Hp);
    const T* wp = w_.data_ptr<T>();
    parallel_for(tasks.size(), [&](int64_t ti) {
      const int64_t e = tasks[ti].expert, p0 = tasks[ti].block * kPanelsPerTask;
      const int64_t np = std::min(kPanelsPerTask, Hp / kPanelRows - p0), n0 = p0 * kPanelRows, ldc = np * kPanelRows;
      const int64_t cols = std::min(kColsPerTask, H - n0);
      const uint16_t* wd = nullptr;
      int64_t stride = 0;
      const T* bias = variant_.down_bias(e);
      const int64_t begin = routing_.offsets[e], end = routing_.offsets[e + 1];
      // Rows [n0, n0 + 16 np) of Bd as expansion panels (extra products of the tile GEMM, also after
      // the products on codes, or gemm_a_exact after decode's).
      const bool codes = codes_base_[e] >= 0, exact_lora = codes && few_rows(end - begin);
      const int64_t nrows = std::min(np * kPanelRows, H - n0);
      SlicePanels<Act> bd;
      if (lora && exact_lora)
        lora->prefetch(L::DownB, e, n0, nrows, 0, s_.r);  // read after the products on codes
      else if (lora) {
        for_tasks_ahead(tasks, ti, [&](const BlockTask& next) {
          const int64_t n1 = next.block * kColsPerTask;
          lora->prefetch(L::DownB, next.expert, n1, std::min(kColsPerTask, H - n1), 0, s_.r);
        });
        bd = pack_lora(k_, *lora, L::DownB, e, n0, nrows, 0, s_.r, false, kLoraA,
                       task_buffer<T>(kConvert, nrows * s_.r));
      }
      for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
        const int64_t m = std::min(kChunkRows, end - c0);
        T* c = task_buffer<T>(kStageA, row_capacity(m) * ldc);
        if (codes) {
          const int64_t slot = codes_base_[e] + (c0 - begin);
          codes_h_->gemm(down_w_, e, slot, m, p0, np, c);
          if (lora && !exact_lora) {
            add_products(k_, expansion(bd, lora_act(2) + c0 * ldr_, s_.r), m, np, c, ldc);
          } else if (lora) {
            bd = pack_lora(k_, *lora, L::DownB, e, n0, nrows, 0, s_.r, false, kLoraA,
                           task_buffer<T>(kConvert, nrows * s_.r));
            k_.gemm_a_exact(codes_scaled(2, slot), s_.r, m, s_.r, bd.hi, bd.lo, bd.stride, np, c, ldc);
          }
        } else {
          ExtraProducts<Act> lora_d;
          if (lora) lora_d = expansion(bd, lora_act(2) + c0 * ldr_, s_.r);
          weight_product(down_w_, e, hs_.data() + c0 * ldh_, ldh_, m, p0, np, c, ldc, lora ? &lora_d : nullptr,
                         kWeightsA, wd, stride);
        }
        for (int64_t i = 0; i < m; ++i) {
          const int64_t p = order_[c0 + i];
          const T* ci = c + i * ldc;
          T* y = y_.data() + p * H + n0;
          const T scale = wp[p];
          if (bias) {
            for (int64_t n = 0; n < cols; ++n) y[n] = scale * (ci[n] + bias[n0 + n]);
          } else {
            for (int64_t n = 0; n < cols; ++n) y[n] = scale * ci[n];
          }
        }
      }
    });
  }

  const Shapes& s_;
  const Kernels<T, Act>& k_;
  const Tensor& hidden_;
  const ExpertWeights &gate_w_, &up_w_, &down_w_;
  const LoraArgs& lora_args_;
  const T scaling_;
  const bool save_;
  const Variant<T>& variant_;
  const Routing routing_;
  const int64_t R_;
  const int64_t* order_;
  const Tensor w_;
  const int64_t ldx_, ldh_, ldr_;
  // Rows (expert order): x and h as activations; s xa_g, s xa_u, s ha as activations; per-pair
  // weighted expert outputs y (pair order).
  const ReusedBuffer<Act> xs_, hs_, lora_act_;
  // Partial ha = h . Ad^T per row and block of I (exact, summed by down_rank_products).
  const ReusedBuffer<T> ha_partial_, y_;
  std::unique_ptr<ReusedBuffer<Act>> xs_lo_;
  // The experts whose products run on the codes (on_codes, decided here once per call: the
  // set_integer_dot setting may change meanwhile), each one's first row slot (-1: not on codes),
  // their prepared x and h rows and, with LoRA, their rows' s * (rank-r products) as T values
  // ([3][codes_slots_][r]) for the exact expansions.
  std::vector<int64_t> codes_experts_, codes_base_;
  int64_t codes_slots_ = 0;
  std::optional<CodesRows> codes_x_, codes_h_;
  std::optional<ReusedBuffer<T>> codes_scaled_;
  Tensor gate_up_pre_, lora_mid_;
  T* lora_mid_data_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Backward (base weights frozen: gradients for hidden states, routing weights and LoRA only):
//   1. gather dY into rows (activations);
//   2. (LoRA) dYB = dY . Bd per expert, s dYB as activations;
//   3. per (expert, block of I): dh_raw = dY . Wd + s dYB . Ad (repacked Wd), and in the epilogue,
//      in T: through the activation (h, dg = w dh_raw dh/dg, du; partial routing-weight gradient),
//      the partial contractions dg . Bg, du . Bu, and the block's LoRA gradients dBg = s dg^T xa_g,
//      dBu = s du^T xa_u, dAd = s (w dYB)^T h, summed over the expert's rows; h, dg, du are kept
//      as activation rows;
//   4. per row: the routing-weight gradient, dgB and duB (sums of the partials), s [dgB, duB] as
//      activations;
//   5. per (expert, block of H): dX per pair = dg . Wg + du . Wu + s [dgB, duB] . [Ag; Au]
//      (repacked Wg, Wu), and in the epilogue the block's dAg = s dgB^T x, dAu = s duB^T x,
//      dBd = s dY^T (w ha);  6. dX summed per token.
// The LoRA gradients and rank-r contractions are accumulated in T from exact values (the hidden
// states and output gradients as given, the T results of the epilogues), so only the GEMM inputs
// are rounded on the rounding ISAs.

template <typename T, typename Act>
class Backward {
 public:
  Backward(const Shapes& s, const Kernels<T, Act>& k, const Tensor& grad_output, const Tensor& hidden,
           const Tensor& ids, const Tensor& weights, const ExpertWeights& gate_w, const ExpertWeights& up_w,
           const ExpertWeights& down_w, const LoraArgs& lora_args, T scaling, const Tensor& gate_up_pre,
           const Tensor& lora_mid, const Variant<T>& variant)
      : s_(s), k_(k), gate_w_(gate_w), up_w_(up_w), down_w_(down_w), lora_args_(lora_args), scaling_(scaling),
        variant_(variant), routing_(route(ids, s.E)), R_(routing_.order.size()), order_(routing_.order.data()),
        weights_dtype_(weights.scalar_type()), hidden_dtype_(hidden.scalar_type()), options_(hidden.options()),
        dy_source_(grad_output, s.H), x_source_(hidden, s.H), w_(as_reused(weights, dtype())),
        pre_(as_reused(gate_up_pre, dtype())), mid_(as_reused(lora_mid, dtype())), mid_data_(mid_.data_ptr<T>()),
        ldx_(row_stride<Act>(s.H)), ldi_(row_stride<Act>(s.I)), ldr_(expansion_stride<Act>(s.r)),
        ld2r_(expansion_stride<Act>(2 * s.r)), blocks_i_(ceil_div(padded_rows(s.I), kNnCols)),
        dys_(std::max<int64_t>(row_buffer(R_) * ldx_, 1)), dgs_(std::max<int64_t>(row_buffer(R_) * ldi_, 1)),
        dus_(std::max<int64_t>(row_buffer(R_) * ldi_, 1)), grad_factors_(std::max<int64_t>(3 * R_ * s.r, 1)),
        rank_act_(std::max<int64_t>(row_buffer(R_) * (ldr_ + ld2r_), 1)),
        rank_partial_(std::max<int64_t>(R_ * blocks_i_ * 2 * s.r, 1)),
        dw_partial_(std::max<int64_t>(R_ * blocks_i_, 1)), dx_pairs_(std::max<int64_t>(s.pairs() * s.H, 1)) {}

  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> run(bool compute_lora_grads) {
    const auto opts = options_.dtype(dtype());
    Tensor grad_hidden = reused_tensor({s_.T, s_.H}, opts);
    Tensor dw = at::zeros({s_.pairs()}, opts);
    lora_grads_ = compute_lora_grads && s_.r > 0;
    grads_ = lora_grad_tensors();
    if (R_ == 0) {
      grad_hidden.zero_();
      for (Tensor& g : grads_) g.zero_();
    } else {
      {
        const Phase phase("backward: gather dY");
        gather_dy();
      }
      std::optional<LoraMatrices<T, Act>> lora;
      if (s_.r > 0) lora.emplace(lora_args_);
      if (s_.r > 0) {
        const Phase phase("backward: dY . Bd");
        down_rank_products(*lora);
      }
      {
        const Phase phase("backward: zero LoRA grads of idle experts");
        if (lora_grads_)
          zero_unrouted_experts();
        else
          for (Tensor& g : grads_) g.zero_();
      }
      {
        const Phase phase("backward: dY . Wd GEMM + activation + B/Ad grads");
        grad_h(lora ? &*lora : nullptr);
      }
      {
        const Phase phase("backward: per-row sums");
        per_row(dw.data_ptr<T>());
      }
      {
        const Phase phase("backward: dX GEMM + A/Bd grads");
        grad_hidden_pairs(lora ? &*lora : nullptr);
      }
      const Phase phase("backward: combine");
      combine_rows<T>(s_, routing_, dx_pairs_.data(), s_.H, grad_hidden.data_ptr<T>());
    }
    // Skipped (-1) slots keep a zero routing-weight gradient: they are never routed.
    Tensor grad_weights = dw.view({s_.T, s_.k}).to(weights_dtype_);
    return {as_reused(grad_hidden, hidden_dtype_),
            grad_weights,
            grads_[0],
            grads_[1],
            grads_[2],
            grads_[3],
            grads_[4],
            grads_[5]};
  }

 private:
  static constexpr c10::ScalarType dtype() { return c10::CppTypeToScalarType<T>::value; }
  // s dYB (ldr) and s [dgB, duB] (ld2r) as activations.
  Act* dyb_act(int64_t row) const { return rank_act_.data() + row * ldr_; }
  Act* dgub_act(int64_t row) const { return rank_act_.data() + row_buffer(R_) * ldr_ + row * ld2r_; }
  // lora_mid's plane (0 xa_g, 1 xa_u, 2 ha) for pair p.
  const T* mid(int plane, int64_t p) const { return mid_data_ + (plane * s_.pairs() + p) * s_.r; }
  T* grad_factors(int64_t row) const { return grad_factors_.data() + row * 3 * s_.r; }

  std::vector<Tensor> lora_grad_tensors() const {
    const Tensor* inputs[6] = {&lora_args_.gate_a, &lora_args_.gate_b, &lora_args_.up_a,
                               &lora_args_.up_b,   &lora_args_.down_a, &lora_args_.down_b};
    std::vector<Tensor> grads;
    for (const Tensor* t : inputs) grads.push_back(reused_tensor(t->sizes(), t->options()));
    return grads;
  }

  // dY as activation rows (and what rounding lost, for the exact contraction dY . Bd; see gather_x).
  void gather_dy() {
    if (s_.r > 0 && !dy_source_.exact_in(k_))
      dys_lo_ = std::make_unique<ReusedBuffer<Act>>(std::max<int64_t>(row_buffer(R_) * ldx_, 1));
    parallel_for(ceil_div(R_, kRowsPerTask), [&](int64_t task) {
      for (int64_t i = task * kRowsPerTask; i < std::min(R_, (task + 1) * kRowsPerTask); ++i) {
        dy_source_.to_act(k_, order_[i] / s_.k, dys_.data() + i * ldx_, ldx_);
        if (dys_lo_) dy_source_.residual(k_, order_[i] / s_.k, dys_lo_->data() + i * ldx_, ldx_);
      }
    });
  }

  // dYB = dY . Bd per expert: s dYB as activations, and grad_h's gradient factors.
  void down_rank_products(const LoraMatrices<T, Act>& lora) {
    using L = LoraMatrices<T, Act>;
    const int64_t r = s_.r, H = s_.H, np = ceil_div(r, kPanelRows), ldc = np * kPanelRows;
    const T* wp = w_.data_ptr<T>();
    parallel_for(routing_.hit_experts.size(), [&](int64_t slot) {
      const int64_t e = routing_.hit_experts[slot];
      // Bd [H, r] is B^T of the contraction dY . Bd.
      const SlicePanels<Act> b =
          pack_lora(k_, lora, L::DownB, e, 0, H, 0, r, true, kPanels, task_buffer<T>(kConvert, H * r));
      const int64_t begin = routing_.offsets[e], end = routing_.offsets[e + 1];
      T* scaled = task_buffer<T>(kStageB, r);
      for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
        const int64_t m = std::min(kChunkRows, end - c0);
        T* c = task_buffer<T>(kStageA, row_capacity(m) * ldc);
        const Act* dy = dys_.data() + c0 * ldx_;
        k_.gemm_a(dy, ldx_, m, H, b.hi, b.stride, np, c, ldc, false);
        if (b.lo) k_.gemm_a(dy, ldx_, m, H, b.lo, b.stride, np, c, ldc, true);
        if (dys_lo_) k_.gemm_a(dys_lo_->data() + c0 * ldx_, ldx_, m, H, b.hi, b.stride, np, c, ldc, true);
        for (int64_t i = 0; i < m; ++i) {
          const T* ci = c + i * ldc;
          for (int64_t q = 0; q < r; ++q) scaled[q] = scaling_ * ci[q];
          expansion_row(k_, scaled, r, dyb_act(c0 + i));
          if (lora_grads_) {
            const int64_t p = order_[c0 + i];
            T* f = grad_factors(c0 + i);
            for (int64_t q = 0; q < r; ++q) {
              f[q] = scaling_ * mid(0, p)[q];
              f[r + q] = scaling_ * mid(1, p)[q];
              f[2 * r + q] = scaling_ * wp[p] * ci[q];
            }
          }
        }
      }
    });
  }

  // The LoRA gradients of experts no token reached are zero; the others are written block by block.
  void zero_unrouted_experts() {
    std::vector<int64_t> idle;
    for (int64_t e = 0; e < s_.E; ++e)
      if (routing_.offsets[e] == routing_.offsets[e + 1]) idle.push_back(e);
    parallel_for(idle.size(), [&](int64_t i) {
      for (Tensor& g : grads_) {
        const int64_t bytes = g.size(1) * g.size(2) * g.element_size();
        zero_uncached(static_cast<char*>(g.data_ptr()) + idle[i] * bytes, bytes);
      }
    });
  }

  // The base product of a task's whole run of blocks (kRunWideRows), for its expert's rows
  // [row0, row0 + m) and columns [col0, col0 + cols); c is null where the task goes block by block.
  struct RunProduct {
    T* c = nullptr;
    int64_t ldc = 0, row0 = 0, m = 0;
    int col0 = 0, cols = 0;
  };

  RunProduct run_product(const BlockRun& run, int64_t width) const {
    RunProduct out;
    out.row0 = routing_.offsets[run.expert];
    out.m = routing_.offsets[run.expert + 1] - out.row0;
    if (out.m > kRunWideRows || run.count < 2) return out;
    out.col0 = static_cast<int>(run.first * kNnCols);
    out.cols = static_cast<int>(std::min(run.count * kNnCols, width - out.col0));
    out.ldc = run.count * kNnCols;
    out.c = task_buffer<T>(kStageB, row_capacity(out.m) * out.ldc);
    return out;
  }

  void grad_h(const LoraMatrices<T, Act>* lora) {
    using L = LoraMatrices<T, Act>;
    const int64_t I = s_.I, P = s_.pairs(), r = s_.r;
    const auto runs = block_runs(routing_, padded_rows(I), kNnCols);
    const T* prep = pre_.data_ptr<T>();
    const T* wp = w_.data_ptr<T>();
    parallel_for(runs.size(), [&](int64_t ti) {
      const int64_t e = runs[ti].expert;
      const NnWeights wd = down_w_.nn_weights(e);
      const RunProduct run = run_product(runs[ti], I);
      if (run.c != nullptr)
        k_.gemm_nn(dys_.data() + run.row0 * ldx_, ldx_, run.m, padded_rows(s_.H), wd, run.col0, run.cols, run.c,
                   run.ldc, false, nullptr);
      for (int64_t block = runs[ti].first; block < runs[ti].first + runs[ti].count; ++block) {
        const int64_t k0 = block * kNnCols;
        const int64_t kc = std::min(kNnCols, I - k0);
        const bool last_block = k0 + kc == I;
        // T scratch: a chunk's rows of h, dg and du; the block's dBg [kc][r], dBu [kc][r] and dAd
        // [r][kc] accumulators.
        const int64_t chunk = std::min(kChunkRows, routing_.offsets[e + 1] - routing_.offsets[e]);
        const int64_t grads = lora_grads_ ? 3 * kNnCols * r : 0;
        T* h_rows = task_buffer<T>(kPanels, 3 * chunk * kNnCols + grads);
        T* dg_rows = h_rows + chunk * kNnCols;
        T* du_rows = dg_rows + chunk * kNnCols;
        T* acc = du_rows + chunk * kNnCols;
        std::fill(acc, acc + grads, T(0));
        const int64_t n_padded = last_block ? ldi_ - k0 : kc;
        // The block's LoRA: Ad's columns [k0, k0 + kc) as expansion panels (Ad [r, I] = B^T); Bg and
        // Bu's rows [k0, k0 + kc) in T for the exact dg . Bg, du . Bu.
        SlicePanels<Act> ad;
        const T *bg = nullptr, *bu = nullptr;
        if (lora) {
          T* scratch = task_buffer<T>(kConvert, 3 * kc * r);
          ad = pack_lora(k_, *lora, L::DownA, e, 0, r, k0, kc, true, kLoraA, scratch);
          bg = lora->rows_of(L::GateB, e, k0, kc, scratch + r * kc);
          bu = lora->rows_of(L::UpB, e, k0, kc, scratch + 2 * r * kc);
        }
        const int64_t begin = routing_.offsets[e], end = routing_.offsets[e + 1];
        for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
          const int64_t m = std::min(kChunkRows, end - c0);
          ExtraProducts<Act> extra;
          if (lora) extra = expansion(ad, dyb_act(c0), r);
          T* c;
          int64_t ldc = kNnCols;
          if (run.c != nullptr) {
            c = run.c + (block - runs[ti].first) * kNnCols;
            ldc = run.ldc;
            add_products(k_, extra, m, ceil_div(kc, kPanelRows), c, ldc);
          } else {
            c = task_buffer<T>(kStageA, row_capacity(m) * kNnCols);
            if (c0 == begin && block + 1 < runs[ti].first + runs[ti].count)
              prefetch_columns(down_w_, e, k0 + kNnCols, std::min(kNnCols, I - k0 - kNnCols), extra);
            k_.gemm_nn(dys_.data() + c0 * ldx_, ldx_, m, padded_rows(s_.H), wd, static_cast<int>(k0), kc, c, kNnCols,
                       false, &extra);
          }
          for (int64_t i = 0; i < m; ++i) {
            const int64_t row = c0 + i, p = order_[row];
            T* h = h_rows + i * kNnCols;
            T* dg = dg_rows + i * kNnCols;
            T* du = du_rows + i * kNnCols;
            dw_partial_.data()[row * blocks_i_ + block] = k_.glu_backward(
                prep + p * I + k0, prep + (P + p) * I + k0, c + i * ldc, wp[p], kc, variant_.glu, h, dg, du);
            if (lora) {
              T* partial = rank_partial_.data() + (row * blocks_i_ + block) * 2 * r;
              k_.contract(dg, kc, bg, r, partial);
              k_.contract(du, kc, bu, r, partial + r);
            }
            k_.to_act(dg, kc, dgs_.data() + row * ldi_ + k0, n_padded);
            k_.to_act(du, kc, dus_.data() + row * ldi_ + k0, n_padded);
          }
          if (lora_grads_) {  // the chunk's terms of dBg = s dg^T xa_g, dBu = s du^T xa_u, dAd = s (w dYB)^T h
            const T* factors = grad_factors(c0);
            k_.outer_sum(dg_rows, kNnCols, kc, factors, 3 * r, r, m, acc);
            k_.outer_sum(du_rows, kNnCols, kc, factors + r, 3 * r, r, m, acc + kNnCols * r);
            k_.outer_sum(factors + 2 * r, 3 * r, r, h_rows, kNnCols, kc, m, acc + 2 * kNnCols * r);
          }
        }
        if (lora_grads_) {
          store_rows_of(grads_[1], e, k0, acc, kc, r);                       // dBg [E, I, r]
          store_rows_of(grads_[3], e, k0, acc + kNnCols * r, kc, r);         // dBu
          store_columns_of(grads_[4], e, k0, acc + 2 * kNnCols * r, r, kc);  // dAd [E, r, I]
        }
      }
    });
  }

  // The routing-weight gradient; with LoRA, dgB and duB (sums of grad_h's partial contractions),
  // s [dgB, duB] as activations and grad_hidden_pairs' gradient factors.
  void per_row(T* dw) {
    const int64_t r = s_.r;
    const T* wp = w_.data_ptr<T>();
    parallel_for(ceil_div(R_, kRowsPerTask), [&](int64_t task) {
      for (int64_t row = task * kRowsPerTask; row < std::min(R_, (task + 1) * kRowsPerTask); ++row) {
        const int64_t p = order_[row];
        T sum = 0;
        for (int64_t b = 0; b < blocks_i_; ++b) sum += dw_partial_.data()[row * blocks_i_ + b];
        // The down bias is part of the expert output the routing weight scales.
        if (const T* bias = variant_.down_bias(routing_.expert_of_pair[p]))
          for (int64_t n = 0; n < s_.H; ++n) sum += dy_source_.value(p / s_.k, n) * bias[n];
        dw[p] = sum;
        if (r == 0) continue;
        // grad_hidden_pairs' factors (grad_h, the last reader of the previous ones, is done): [dgB,
        // duB] summed over the blocks' partials, then scaled (the values of its expansion too).
        T* f = grad_factors(row);
        const T* partial = rank_partial_.data() + row * blocks_i_ * 2 * r;
        std::copy(partial, partial + 2 * r, f);
        for (int64_t b = 1; b < blocks_i_; ++b)
          for (int64_t q = 0; q < 2 * r; ++q) f[q] += partial[b * 2 * r + q];
        for (int64_t q = 0; q < 2 * r; ++q) f[q] = scaling_ * f[q];
        for (int64_t q = 0; q < r; ++q) f[2 * r + q] = scaling_ * wp[p] * mid(2, p)[q];
        expansion_row(k_, f, 2 * r, dgub_act(row));
      }
    });
  }

  void grad_hidden_pairs(const LoraMatrices<T, Act>* lora) {
    using L = LoraMatrices<T, Act>;
    const int64_t H = s_.H, Ip = padded_rows(s_.I), r = s_.r;
    const auto runs = block_runs(routing_, H, kNnCols);
    parallel_for(runs.size(), [&](int64_t ti) {
      const int64_t e = runs[ti].expert;
      const NnWeights wg = gate_w_.nn_weights(e), wu = up_w_.nn_weights(e);
      const RunProduct run = run_product(runs[ti], H);
      if (run.c != nullptr) {
        k_.gemm_nn(dgs_.data() + run.row0 * ldi_, ldi_, run.m, Ip, wg, run.col0, run.cols, run.c, run.ldc, false,
                   nullptr);
        k_.gemm_nn(dus_.data() + run.row0 * ldi_, ldi_, run.m, Ip, wu, run.col0, run.cols, run.c, run.ldc, true,
                   nullptr);
      }
      for (int64_t block = runs[ti].first; block < runs[ti].first + runs[ti].count; ++block) {
        const int64_t h0 = block * kNnCols;
        const int64_t kc = std::min(kNnCols, H - h0);
        // T scratch: a chunk's rows of the x and dY segments; the block's dAg, dAu [r][kc] and dBd
        // [kc][r] accumulators.
        const int64_t chunk = std::min(kChunkRows, routing_.offsets[e + 1] - routing_.offsets[e]);
        const int64_t grads = lora_grads_ ? 3 * kNnCols * r : 0;
        T* x_rows = task_buffer<T>(kPanels, 2 * chunk * kNnCols + grads);
        T* dy_rows = x_rows + chunk * kNnCols;
        T* acc = dy_rows + chunk * kNnCols;
        std::fill(acc, acc + grads, T(0));
        // The block's LoRA: [Ag; Au]'s columns [h0, h0 + kc) as expansion panels ([Ag; Au] [2r, H] =
        // B^T), from a T copy of the two stacked slices.
        SlicePanels<Act> agu;
        if (lora) {
          T* stacked = task_buffer<T>(kConvert, 2 * r * kc);
          for (int half = 0; half < 2; ++half)
            for (int64_t q = 0; q < r; ++q)
              lora->copy_segment(half ? L::UpA : L::GateA, e, q, h0, kc, stacked + (half * r + q) * kc);
          agu = pack_slice(k_, stacked, kc, kc, 2 * r, true, lora->has_lo(L::GateA) || lora->has_lo(L::UpA), kLoraA);
        }
        const int64_t begin = routing_.offsets[e], end = routing_.offsets[e + 1];
        for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
          const int64_t m = std::min(kChunkRows, end - c0);
          ExtraProducts<Act> next_g, extra_u;
          if (lora) extra_u = expansion(agu, dgub_act(c0), 2 * r);
          T* c;
          int64_t ldc = kNnCols;
          if (run.c != nullptr) {
            c = run.c + (block - runs[ti].first) * kNnCols;
            ldc = run.ldc;
            add_products(k_, extra_u, m, ceil_div(kc, kPanelRows), c, ldc);
          } else {
            c = task_buffer<T>(kStageA, row_capacity(m) * kNnCols);
            if (c0 == begin && block + 1 < runs[ti].first + runs[ti].count) {
              const int64_t next = h0 + kNnCols, next_kc = std::min(kNnCols, H - next);
              prefetch_columns(gate_w_, e, next, next_kc, next_g);
              prefetch_columns(up_w_, e, next, next_kc, extra_u);
            }
            k_.gemm_nn(dgs_.data() + c0 * ldi_, ldi_, m, Ip, wg, static_cast<int>(h0), kc, c, kNnCols, false, &next_g);
            k_.gemm_nn(dus_.data() + c0 * ldi_, ldi_, m, Ip, wu, static_cast<int>(h0), kc, c, kNnCols, true, &extra_u);
          }
          for (int64_t i = 0; i < m; ++i) {
            const int64_t row = c0 + i, p = order_[row], t = p / s_.k;
            std::copy(c + i * ldc, c + i * ldc + kc, dx_pairs_.data() + p * H + h0);
            if (!lora_grads_) continue;
            // The exact hidden states and output gradients (as given) of the row's segment.
            T* xr = x_rows + i * kNnCols;
            T* dyr = dy_rows + i * kNnCols;
            const T* xs = x_source_.segment(t, h0, kc, xr);
            if (xs != xr) std::copy_n(xs, kc, xr);
            const T* dys = dy_source_.segment(t, h0, kc, dyr);
            if (dys != dyr) std::copy_n(dys, kc, dyr);
          }
          if (lora_grads_) {  // the chunk's terms of dAg = s dgB^T x, dAu = s duB^T x, dBd = s dY^T (w ha)
            const T* factors = grad_factors(c0);
            k_.outer_sum(factors, 3 * r, r, x_rows, kNnCols, kc, m, acc);
            k_.outer_sum(factors + r, 3 * r, r, x_rows, kNnCols, kc, m, acc + kNnCols * r);
            k_.outer_sum(dy_rows, kNnCols, kc, factors + 2 * r, 3 * r, r, m, acc + 2 * kNnCols * r);
          }
        }
        if (lora_grads_) {
          store_columns_of(grads_[0], e, h0, acc, r, kc);                 // dAg [E, r, H]
          store_columns_of(grads_[2], e, h0, acc + kNnCols * r, r, kc);   // dAu
          store_rows_of(grads_[5], e, h0, acc + 2 * kNnCols * r, kc, r);  // dBd [E, H, r]
        }
      }
    });
  }

  // grad[e, n0 + i, q] = acc[i * r + q] for i < rows (a B gradient [E, n, r]: rows of r).
  static void store_rows_of(const Tensor& grad, int64_t e, int64_t n0, const T* acc, int64_t rows, int64_t r) {
    const int64_t n = grad.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "kt_store_lora_grad", [&] {
      scalar_t* out = grad.data_ptr<scalar_t>() + (e * n + n0) * r;
      for (int64_t i = 0; i < rows * r; ++i) out[i] = static_cast<scalar_t>(acc[i]);
    });
  }
  // grad[e, q, n0 + j] = acc[q * cols + j] for q < r, j < cols (an A gradient [E, r, n]).
  static void store_columns_of(const Tensor& grad, int64_t e, int64_t n0, const T* acc, int64_t r, int64_t cols) {
    const int64_t n = grad.size(2);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "kt_store_lora_grad", [&] {
      scalar_t* out = grad.data_ptr<scalar_t>() + e * r * n + n0;
      for (int64_t q = 0; q < r; ++q)
        for (int64_t j = 0; j < cols; ++j) out[q * n + j] = static_cast<scalar_t>(acc[q * cols + j]);
    });
  }

  const Shapes& s_;
  const Kernels<T, Act>& k_;
  const ExpertWeights &gate_w_, &up_w_, &down_w_;
  const LoraArgs& lora_args_;
  const T scaling_;
  const Variant<T>& variant_;
  const Routing routing_;
  const int64_t R_;
  const int64_t* order_;
  const c10::ScalarType weights_dtype_, hidden_dtype_;
  const at::TensorOptions options_;
  const RowSource<T, Act> dy_source_, x_source_;
  const Tensor w_, pre_, mid_;
  const T* mid_data_;
  const int64_t ldx_, ldi_, ldr_, ld2r_, blocks_i_;
  // Rows (expert order): dY, dg, du as activations; the gradient factors; s dYB and s [dgB, duB] as
  // activations; partial [dgB, duB] and routing-weight gradients per block of I (summed by per_row);
  // dX per pair (pair order).
  const ReusedBuffer<Act> dys_, dgs_, dus_;
  // Per row (expert order), the rank-side factors of the LoRA gradients' outer sums, [3][r] each,
  // computed once per row rather than once per column block: s xa_g, s xa_u, s w dYB for grad_h,
  // then s dgB, s duB, s w ha for grad_hidden_pairs.
  const ReusedBuffer<T> grad_factors_;
  const ReusedBuffer<Act> rank_act_;
  const ReusedBuffer<T> rank_partial_, dw_partial_, dx_pairs_;
  std::unique_ptr<ReusedBuffer<Act>> dys_lo_;
  bool lora_grads_ = false;
  std::vector<Tensor> grads_;
};

}  // namespace

void time_phases(bool on) {
  if (on) {
    PhaseTimes& t = phase_times();
    std::lock_guard<std::mutex> lock(t.mutex);
    t.seconds.clear();
  }
  g_time_phases = on;
}

std::vector<std::pair<std::string, double>> phase_seconds() {
  PhaseTimes& t = phase_times();
  std::lock_guard<std::mutex> lock(t.mutex);
  return t.seconds;
}

std::tuple<Tensor, Tensor, Tensor> moe_sft_forward(
    const Tensor& hidden_states, const Tensor& topk_ids, const Tensor& topk_weights, const Tensor& gate_weight,
    const Tensor& up_weight, const Tensor& down_weight, const std::optional<Tensor>& gate_scale,
    const std::optional<Tensor>& up_scale, const std::optional<Tensor>& down_scale, c10::string_view weight_format,
    int64_t intermediate_size, const Tensor& gate_lora_a, const Tensor& gate_lora_b, const Tensor& up_lora_a,
    const Tensor& up_lora_b, const Tensor& down_lora_a, const Tensor& down_lora_b, double lora_scaling,
    bool save_for_backward, const std::optional<Tensor>& gate_bias, const std::optional<Tensor>& up_bias,
    const std::optional<Tensor>& down_bias, c10::string_view activation, double swiglu_alpha, double swiglu_limit) {
  const VariantArgs variant{gate_bias, up_bias, down_bias, activation, swiglu_alpha, swiglu_limit};
  const LoraArgs lora{gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b};
  const Shapes s = check_inputs(hidden_states, topk_ids, topk_weights, gate_weight, up_weight, down_weight, gate_scale,
                                up_scale, down_scale, weight_format, intermediate_size, lora);
  const ExpertWeights gate(s.format, gate_weight, gate_scale, s.I, s.H, s.gate_groups);
  const ExpertWeights up(s.format, up_weight, up_scale, s.I, s.H, s.gate_groups);
  const ExpertWeights down(s.format, down_weight, down_scale, s.H, s.I, s.down_groups);
  const auto run = [&](const auto& kernels, auto scaling) {
    using T = decltype(scaling);
    const Variant<T> v(variant, s);
    Forward<T, typename std::decay_t<decltype(kernels)>::act_type> forward(
        s, kernels, hidden_states, topk_ids, topk_weights, gate, up, down, lora, scaling, save_for_backward, v);
    return forward.run();
  };
  if (hidden_states.scalar_type() == at::kDouble) return run(ref_kernels_f64(), lora_scaling);
  const IsaKernels isa = active_gemm_kernels();
  const float scaling = static_cast<float>(lora_scaling);
  return isa.bf16 ? run(*isa.bf16, scaling) : run(*isa.f32, scaling);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> moe_sft_backward(
    const Tensor& grad_output, const Tensor& hidden_states, const Tensor& topk_ids, const Tensor& topk_weights,
    const Tensor& gate_weight, const Tensor& up_weight, const Tensor& down_weight,
    const std::optional<Tensor>& gate_scale, const std::optional<Tensor>& up_scale,
    const std::optional<Tensor>& down_scale, c10::string_view weight_format, int64_t intermediate_size,
    const Tensor& gate_lora_a, const Tensor& gate_lora_b, const Tensor& up_lora_a, const Tensor& up_lora_b,
    const Tensor& down_lora_a, const Tensor& down_lora_b, double lora_scaling, const Tensor& gate_up_pre,
    const Tensor& lora_mid, bool lora_grads, const std::optional<Tensor>& gate_bias,
    const std::optional<Tensor>& up_bias, const std::optional<Tensor>& down_bias, c10::string_view activation,
    double swiglu_alpha, double swiglu_limit) {
  const VariantArgs variant{gate_bias, up_bias, down_bias, activation, swiglu_alpha, swiglu_limit};
  const LoraArgs lora{gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b};
  const Shapes s = check_inputs(hidden_states, topk_ids, topk_weights, gate_weight, up_weight, down_weight, gate_scale,
                                up_scale, down_scale, weight_format, intermediate_size, lora);
  check_cpu(grad_output, "grad_output");
  check_cpu(gate_up_pre, "gate_up_pre");
  check_cpu(lora_mid, "lora_mid");
  check_float_dtype(grad_output, "grad_output");
  check_shape(grad_output, "grad_output", {s.T, s.H}, "[num_tokens, hidden_size]");
  TORCH_CHECK_VALUE(gate_up_pre.numel() > 0 || s.pairs() == 0,
                    "kt_ops: backward needs the tensors saved by a forward run with save_for_backward=True");
  const auto acc_dtype = hidden_states.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(gate_up_pre.scalar_type() == acc_dtype && lora_mid.scalar_type() == acc_dtype,
                   "kt_ops: gate_up_pre and lora_mid must be ", acc_dtype, " as forward returned them");
  check_shape(gate_up_pre, "gate_up_pre", {2, s.pairs(), s.I},
              "[2, num_tokens * num_experts_per_tok, intermediate_size]");
  check_shape(lora_mid, "lora_mid", {3, s.pairs(), s.r}, "[3, num_tokens * num_experts_per_tok, lora_rank]");
  const ExpertWeights gate(s.format, gate_weight, gate_scale, s.I, s.H, s.gate_groups);
  const ExpertWeights up(s.format, up_weight, up_scale, s.I, s.H, s.gate_groups);
  const ExpertWeights down(s.format, down_weight, down_scale, s.H, s.I, s.down_groups);
  const auto run = [&](const auto& kernels, auto scaling) {
    using T = decltype(scaling);
    const Variant<T> v(variant, s);
    Backward<T, typename std::decay_t<decltype(kernels)>::act_type> backward(s, kernels, grad_output, hidden_states,
                                                                             topk_ids, topk_weights, gate, up, down,
                                                                             lora, scaling, gate_up_pre, lora_mid, v);
    return backward.run(lora_grads);
  };
  if (hidden_states.scalar_type() == at::kDouble) return run(ref_kernels_f64(), lora_scaling);
  const IsaKernels isa = active_gemm_kernels();
  const float scaling = static_cast<float>(lora_scaling);
  return isa.bf16 ? run(*isa.bf16, scaling) : run(*isa.f32, scaling);
}

}  // namespace kt
