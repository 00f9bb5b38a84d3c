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
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <type_traits>

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
  const std::pair<const Tensor*, const char*> all[] = {
      {&hidden, "hidden_states"}, {&ids, "topk_ids"},         {&weights, "topk_weights"},
      {&gate_w, "gate_weight"},   {&up_w, "up_weight"},       {&down_w, "down_weight"},
      {&lora.gate_a, "gate_lora_a"}, {&lora.gate_b, "gate_lora_b"}, {&lora.up_a, "up_lora_a"},
      {&lora.up_b, "up_lora_b"},  {&lora.down_a, "down_lora_a"}, {&lora.down_b, "down_lora_b"}};
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
  const std::pair<const Tensor*, const char*> packed[] = {{&gate_w, "gate_weight"}, {&up_w, "up_weight"},
                                                         {&down_w, "down_weight"}};
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
  TORCH_CHECK_VALUE(up_w.size(0) == E && down_w.size(0) == E, "kt_ops: gate_weight, up_weight and down_weight must "
                    "hold the same number of experts, got ", gate_w.size(0), ", ", up_w.size(0), ", ", down_w.size(0));
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
  struct AlignedDelete {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t{kAlignment}); }
  };
  using Storage = std::unique_ptr<T[], AlignedDelete>;
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
// LoRA products and the LoRA gradients are GEMMs too: their matrices are packed into activation
// panels once per call (LoraPanels), and the row-reduced LoRA gradients take their B operand as
// panels built from these rows (pack_cols) inside the task that needs them.
//
// Tasks: one per (expert, block of kColsPerTask output columns), all of the expert's rows inside, in
// chunks of kChunkRows, so the block's weight panels are read from RAM once per call and stay in L2
// across the chunks. Every output element is written by one task in a fixed order: results do not
// depend on the thread count.

constexpr int64_t kColsPerTask = 64;
constexpr int64_t kPanelsPerTask = kColsPerTask / kPanelRows;
constexpr int64_t kChunkRows = 256;
constexpr int64_t kRowsPerTask = 32;   // gathers and other per-row passes
constexpr int64_t kTokensPerTask = 16;
constexpr int64_t kMaxStackRank = 256;  // rank-r rows up to this rank live on the stack

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of a row buffer holding R rows: a GEMM on rows [c0, c0 + m) may read up to row
// c0 + row_capacity(m) (gemm.h), whatever c0.
int64_t row_buffer(int64_t R) { return R + kRowAlign; }

// Per-thread grow-only buffers, 64-byte aligned (pool threads live as long as the process). A task
// uses each slot for one purpose at a time.
enum Slot { kStageA, kStageB, kWeightsA, kWeightsB, kPanels, kConvert, kSlots };

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

// (expert, column block) tasks over `cols` output columns.
struct BlockTask {
  int64_t expert, block;
};

std::vector<BlockTask> block_tasks(const Routing& routing, int64_t cols) {
  std::vector<BlockTask> tasks;
  for (int64_t e : routing.hit_experts)
    for (int64_t b = 0; b * kColsPerTask < cols; ++b) tasks.push_back({e, b});
  return tasks;
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
  const T* segment(int64_t row, int64_t c0, int64_t count, T* scratch) const {
    if (values_) return values_ + row * n_ + c0;
    const uint16_t* src = bf16_ + row * n_ + c0;
    for (int64_t c = 0; c < count; ++c) scratch[c] = widen(src[c]);
    return scratch;
  }
  const T* row_values(int64_t row, T* scratch) const { return segment(row, 0, n_, scratch); }
  T value(int64_t row, int64_t col) const { return values_ ? values_[row * n_ + col] : widen(bf16_[row * n_ + col]); }

 private:
  static T widen(uint16_t bits) {
    const uint32_t widened = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &widened, sizeof(f));
    return static_cast<T>(f);
  }
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
inline float bf16_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &widened, sizeof(f));
  return f;
}
inline uint16_t bf16_lo(float x, uint16_t hi) {
  const float rest = x - bf16_float(hi);
  return std::isfinite(rest) ? round_bf16(rest) : uint16_t(0);
}

template <typename Act>
constexpr bool kSplit = sizeof(Act) == 2;
// The row stride of an expansion's A rows over rank n: [hi | lo] halves (split) or the values.
template <typename Act>
constexpr int64_t expansion_stride(int64_t n) { return kSplit<Act> ? 2 * act_stride(n) : act_stride(n); }

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

// The rank-r matrices of the hit experts in the forms the products read, built once per call. A job
// takes, for every hit expert, one LoRA matrix or two stacked ([Ag; Au]) as M [rows, cols] and makes
//   Rows:        activation panels (gemm.h) of B = M [N = rows, K = cols], for C = A . B^T;
//   Cols:        activation panels of B with M = B^T [K = rows, N = cols];
//   Values:      M itself in T, row-major (the stored layout: read in place when already T);
//   Transposed:  M^T in T, row-major.
// A panel job's Role says how its B takes part in the split bf16 products (above): as the B of an
// expansion (a second panel set, lo, when the matrix has one) or of a contraction (N doubled:
// [Bhi; Blo], when it has a lo part).
// The T forms are the `m` of the kernels' contract (rank-r products of h, dg and du, kept exact).
template <typename T, typename Act>
class LoraPanels {
 public:
  enum Kind { Rows, Cols, Values, Transposed };
  enum Role { Expansion, Contraction, Plain };
  struct Job {
    std::vector<int> sources;  // indices into the six LoRA tensors (Which)
    Kind kind;
    Role role = Plain;
  };
  enum Which { GateA, GateB, UpA, UpB, DownA, DownB };

  LoraPanels(const Kernels<T, Act>& k, const LoraArgs& args, const Routing& routing, std::vector<Job> jobs)
      : jobs_(std::move(jobs)) {
    const Tensor* all[6] = {&args.gate_a, &args.gate_b, &args.up_a, &args.up_b, &args.down_a, &args.down_b};
    slot_of_expert_.assign(args.gate_a.size(0), -1);
    const int64_t hits = routing.hit_experts.size();
    for (int64_t i = 0; i < hits; ++i) slot_of_expert_[routing.hit_experts[i]] = i;
    int64_t act_total = 0, value_total = 0;
    for (size_t j = 0; j < jobs_.size(); ++j) {
      Layout& l = layouts_[j];
      for (int m : jobs_[j].sources) {
        if (!sources_[m]) sources_[m].emplace(*all[m], all[m]->size(2));
        l.rows += all[m]->size(1);
        l.cols = all[m]->size(2);
        // A bf16 matrix is its own hi: it has no lo part.
        l.lo = l.lo || (kSplit<Act> && jobs_[j].role != Plain && all[m]->scalar_type() != at::kBFloat16);
      }
      const Kind kind = jobs_[j].kind;
      if (kind == Values && jobs_[j].sources.size() == 1 && all[jobs_[j].sources[0]]->scalar_type() == dtype() &&
          all[jobs_[j].sources[0]]->is_contiguous()) {
        l.in_place = all[jobs_[j].sources[0]]->template data_ptr<T>();  // no copy: the parameter is the matrix
        l.per_expert = l.rows * l.cols;
        continue;
      }
      if (kind == Values || kind == Transposed) {
        l.per_expert = l.rows * l.cols;
        l.offset = value_total;
        value_total += hits * l.per_expert;
        continue;
      }
      const int64_t N = kind == Rows ? l.rows : l.cols, K = kind == Rows ? l.cols : l.rows;
      const bool doubled = l.lo && jobs_[j].role == Contraction;
      l.stride = act_panel_elems(K);
      l.set = ceil_div(doubled ? 2 * N : N, kPanelRows) * l.stride;
      l.per_expert = (l.lo && jobs_[j].role == Expansion ? 2 : 1) * l.set;
      l.offset = act_total;
      act_total += hits * l.per_expert;
    }
    panels_ = std::make_unique<ReusedBuffer<Act>>(std::max<int64_t>(act_total, 1));
    values_ = std::make_unique<ReusedBuffer<T>>(std::max<int64_t>(value_total, 1));
    const int64_t njobs = jobs_.size();
    parallel_for(hits * njobs, [&](int64_t task) {
      const int64_t slot = task / njobs, j = task % njobs, e = routing.hit_experts[slot];
      if (!layouts_[j].in_place) build(k, j, e, slot, all);
    });
  }
  // Expert e's panels of a Rows / Cols job (set 1: the lo panels of an expansion), panel_stride(j)
  // elements apart.
  const Act* get(int j, int64_t expert, int set = 0) const {
    return panels_->data() + layouts_[j].offset + slot_of_expert_[expert] * layouts_[j].per_expert +
           set * layouts_[j].set;
  }
  int64_t panel_stride(int j) const { return layouts_[j].stride; }
  // Whether job j's matrix has a lo part (split bf16 of a matrix that is not bf16 itself).
  bool has_lo(int j) const { return layouts_[j].lo; }
  // Expert e's matrix of a Values / Transposed job.
  const T* values(int j, int64_t expert) const {
    const Layout& l = layouts_[j];
    if (l.in_place) return l.in_place + expert * l.per_expert;
    return values_->data() + l.offset + slot_of_expert_[expert] * l.per_expert;
  }

 private:
  static constexpr c10::ScalarType dtype() { return c10::CppTypeToScalarType<T>::value; }
  struct Layout {
    int64_t rows = 0, cols = 0, stride = 0, set = 0, per_expert = 0, offset = 0;
    bool lo = false;
    const T* in_place = nullptr;
  };

  void build(const Kernels<T, Act>& k, int64_t j, int64_t e, int64_t slot, const Tensor* const* all) {
    const Layout& l = layouts_[j];
    const Job& job = jobs_[j];
    const int64_t rows = l.rows, cols = l.cols;
    // M in T, row-major.
    T* m = task_buffer<T>(kConvert, rows * cols);
    int64_t row = 0;
    for (int source : job.sources) {
      const int64_t n = all[source]->size(1);
      for (int64_t i = 0; i < n; ++i, ++row) {
        const T* values = sources_[source]->row_values(e * n + i, m + row * cols);
        if (values != m + row * cols) std::copy_n(values, cols, m + row * cols);
      }
    }
    if (job.kind == Values || job.kind == Transposed) {
      T* dst = values_->data() + l.offset + slot * l.per_expert;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) (job.kind == Values ? dst[r * cols + c] : dst[c * rows + r]) = m[r * cols + c];
      return;
    }
    // hi (and lo) of M in Act, each packed: an expansion's lo is its second panel set; a
    // contraction's lo doubles N (its rows of B after the hi rows: stacked for Rows, side by side
    // for Cols, where N runs along M's rows or its columns).
    const bool stack = job.role == Contraction && l.lo;
    const int64_t out_rows = stack && job.kind == Rows ? 2 * rows : rows;
    const int64_t out_cols = stack && job.kind == Cols ? 2 * cols : cols;
    Act* hi = task_buffer<Act>(kStageA, out_rows * out_cols);
    Act* lo = job.role == Expansion && l.lo ? task_buffer<Act>(kStageB, rows * cols) : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      const T* src = m + r * cols;
      k.to_act(src, cols, hi + r * out_cols, cols);
      if (stack) k.to_act_residual(src, cols, job.kind == Rows ? hi + (rows + r) * out_cols : hi + r * out_cols + cols, cols);
      if (lo) k.to_act_residual(src, cols, lo + r * cols, cols);
    }
    Act* dst = panels_->data() + l.offset + slot * l.per_expert;
    const auto pack = [&](const Act* src, int64_t src_rows, int64_t src_cols, Act* out) {
      if (job.kind == Rows)
        k.pack_rows(src, src_cols, src_rows, src_cols, out, l.stride);
      else
        k.pack_cols(src, src_cols, src_rows, src_cols, out, l.stride);
    };
    pack(hi, out_rows, out_cols, dst);
    if (lo) pack(lo, rows, cols, dst + l.set);
  }

  std::vector<Job> jobs_;
  Layout layouts_[6];
  std::optional<RowSource<T, Act>> sources_[6];  // one per LoRA tensor a job reads
  std::vector<int64_t> slot_of_expert_;
  std::unique_ptr<ReusedBuffer<Act>> panels_;
  std::unique_ptr<ReusedBuffer<T>> values_;
};

// The extra products of an expansion (gemm.h): V . B^T added to a weight GEMM's C, with V's rows
// written by expansion_row (lda = expansion_stride(n)) and B the panels of expansion job j for the
// GEMM's first panel p0.
template <typename T, typename Act>
ExtraProducts<Act> expansion(const LoraPanels<T, Act>& lora, int j, int64_t e, int64_t p0, const Act* rows,
                             int64_t n) {
  ExtraProducts<Act> extra;
  extra.K = static_cast<int>(n);
  extra.lda = expansion_stride<Act>(n);
  extra.panel_stride = lora.panel_stride(j);
  const Act* b_hi = lora.get(j, e) + p0 * extra.panel_stride;
  extra.a[0] = rows;
  extra.b[0] = b_hi;
  extra.count = 1;
  if constexpr (kSplit<Act>) {
    extra.a[1] = rows + act_stride(n);
    extra.b[1] = b_hi;
    extra.count = 2;
    if (lora.has_lo(j)) {
      extra.a[2] = rows;
      extra.b[2] = lora.get(j, e, 1) + p0 * extra.panel_stride;
      extra.count = 3;
    }
  }
  return extra;
}

// The extra products added to a C that another path computed (the products on codes).
template <typename T, typename Act>
void add_extra(const Kernels<T, Act>& k, const ExtraProducts<Act>& extra, int64_t m, int64_t np, T* c, int64_t ldc) {
  for (int i = 0; i < extra.count; ++i)
    k.gemm_a(extra.a[i], extra.lda, m, extra.K, extra.b[i], extra.panel_stride, np, c, ldc, true);
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

// Few rows of a quantized format (decode): the product straight on the codes (quant.h), where
// dequantizing whole panels would cost more than the bandwidth it saves. C is dense [m, 16 np].
template <typename T, typename RowFn>
bool direct_on_codes(const ExpertWeights& w, int64_t e, int64_t m, int64_t p0, int64_t np, const RowFn& row, T* c) {
  if constexpr (std::is_same_v<T, float>) {
    if (w.is_bf16() || m > kDirectQuantRows) return false;
    const float* rows[kDirectQuantRows];
    for (int64_t i = 0; i < m; ++i) rows[i] = row(i);
    return w.gemm_nt_codes(e, rows, static_cast<int>(m), p0, np, c);
  }
  return false;
}

// An activation row as fp32 values: itself (fp32 ISAs) or widened from bf16 into `scratch`.
template <typename T, typename Act>
const float* act_row_f32(const Kernels<T, Act>& k, const Act* row, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<Act, float>) {
    return row;
  } else {
    (void)k;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(row[i]) << 16;
      std::memcpy(scratch + i, &bits, sizeof(float));
    }
    return scratch;
  }
}

// Weight panels of W^T for W's columns [k0, k0 + kc) (gemm.h's repack_nn), in `slot`; returns the
// panel stride. n_padded: W's padded rows, the reduction of the products that read them.
template <typename T, typename Act>
int64_t repacked_columns(const Kernels<T, Act>& k, const ExpertWeights& w, int64_t e, int64_t k0, int64_t kc,
                         Slot slot, uint16_t*& panels) {
  const int64_t n_padded = padded_rows(w.rows()), stride = n_padded * kPanelRows;
  uint16_t* source_buffer = w.is_bf16() ? nullptr : task_buffer<uint16_t>(kConvert, w.nn_buffer_elems(kc));
  int64_t k_total, k_first;
  const uint16_t* source = w.nn_panels(e, k0, kc, k_total, k_first, source_buffer);
  panels = task_buffer<uint16_t>(slot, ceil_div(kc, kPanelRows) * stride);
  k.repack_nn(source, k_pairs(k_total), static_cast<int>(n_padded), static_cast<int>(n_padded / 2),
              static_cast<int>(k_first), static_cast<int>(kc), panels, stride);
  return stride;
}

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
        scaling_(scaling), save_(save), variant_(variant), routing_(route(ids, s.E)),
        R_(routing_.order.size()), order_(routing_.order.data()), w_(as_reused(weights, dtype())),
        ldx_(act_stride(s.H)), ldh_(act_stride(s.I)), ldr_(expansion_stride<Act>(s.r)),
        xs_(std::max<int64_t>(row_buffer(R_) * ldx_, 1)), hs_(std::max<int64_t>(row_buffer(R_) * ldh_, 1)),
        lora_act_(std::max<int64_t>(3 * row_buffer(R_) * ldr_, 1)),
        ha_partial_(std::max<int64_t>(R_ * ceil_div(padded_rows(s.I), kColsPerTask) * s.r, 1)),
        y_(std::max<int64_t>(s.pairs() * s.H, 1)) {}

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
    gather_x();
    std::optional<LoraPanels<T, Act>> lora;
    if (s_.r > 0) {
      using L = LoraPanels<T, Act>;
      lora.emplace(k_, lora_args_, routing_,
                   std::vector<typename L::Job>{{{L::GateA, L::UpA}, L::Rows, L::Contraction},
                                                {{L::GateB}, L::Rows, L::Expansion},
                                                {{L::UpB}, L::Rows, L::Expansion},
                                                {{L::DownA}, L::Transposed},
                                                {{L::DownB}, L::Rows, L::Expansion}});
      input_rank_products(*lora);
    }
    gate_up(lora ? &*lora : nullptr);
    if (s_.r > 0) down_rank_products();
    down(lora ? &*lora : nullptr);
    combine_rows<T>(s_, routing_, y_.data(), s_.H, out.data_ptr<T>());
    return {as_reused(out, hidden_.scalar_type()), gate_up_pre_, lora_mid_};
  }

 private:
  static constexpr c10::ScalarType dtype() { return c10::CppTypeToScalarType<T>::value; }
  // s * (rank-r product) rows as activations: [which][row capacity][ldr].
  Act* lora_act(int which) const { return lora_act_.data() + which * row_buffer(R_) * ldr_; }

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
  void input_rank_products(const LoraPanels<T, Act>& lora) {
    const int64_t r = s_.r, halves = lora.has_lo(0) ? 2 : 1;
    const int64_t np = ceil_div(halves * 2 * r, kPanelRows), ldc = np * kPanelRows;
    parallel_for(routing_.hit_experts.size(), [&](int64_t slot) {
      const int64_t e = routing_.hit_experts[slot];
      const int64_t begin = routing_.offsets[e], end = routing_.offsets[e + 1];
      for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
        const int64_t m = std::min(kChunkRows, end - c0);
        T* c = task_buffer<T>(kStageA, row_capacity(m) * ldc);
        k_.gemm_a(xs_.data() + c0 * ldx_, ldx_, m, s_.H, lora.get(0, e), lora.panel_stride(0), np, c, ldc, false);
        if (xs_lo_)
          k_.gemm_a(xs_lo_->data() + c0 * ldx_, ldx_, m, s_.H, lora.get(0, e), lora.panel_stride(0), np, c, ldc, true);
        T* xa = task_buffer<T>(kStageB, 2 * r);
        for (int64_t i = 0; i < m; ++i) {
          const T* ci = c + i * ldc;
          for (int64_t q = 0; q < 2 * r; ++q) xa[q] = halves == 2 ? ci[q] + ci[2 * r + q] : ci[q];
          for (int plane = 0; plane < 2; ++plane) keep_rank_product(plane, c0 + i, xa + plane * r);
        }
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
    expansion_row(k_, s_values, r, lora_act(plane) + row * ldr_);
  }

  int64_t blocks_i() const { return ceil_div(padded_rows(s_.I), kColsPerTask); }

  void gate_up(const LoraPanels<T, Act>* lora) {
    const int64_t I = s_.I, Ip = padded_rows(I), P = s_.pairs();
    const auto tasks = block_tasks(routing_, Ip);
    T* prep = save_ ? gate_up_pre_.data_ptr<T>() : nullptr;
    const RowSource<T, Act> x_source(hidden_, s_.H);
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
      for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
        const int64_t m = std::min(kChunkRows, end - c0);
        T* cg = task_buffer<T>(kStageA, row_capacity(m) * ldc);
        T* cu = task_buffer<T>(kStageB, row_capacity(m) * ldc);
        // The exact input rows (the hidden states as given) for the products on codes.
        T* x_scratch = nullptr;
        const auto x_row = [&](int64_t i) {
          if (x_scratch == nullptr) x_scratch = task_buffer<T>(kConvert, m * s_.H);
          return x_source.row_values(order_[c0 + i] / s_.k, x_scratch + i * s_.H);
        };
        ExtraProducts<Act> lora_g, lora_u;
        if (lora) {
          lora_g = expansion(*lora, 1, e, p0, lora_act(0) + c0 * ldr_, s_.r);
          lora_u = expansion(*lora, 2, e, p0, lora_act(1) + c0 * ldr_, s_.r);
        }
        if (direct_on_codes(gate_w_, e, m, p0, np, x_row, cg)) {
          direct_on_codes(up_w_, e, m, p0, np, x_row, cu);
          add_extra(k_, lora_g, m, np, cg, ldc);
          add_extra(k_, lora_u, m, np, cu, ldc);
        } else {
          if (wg == nullptr) {
            wg = weight_panels(gate_w_, e, p0, np, stride_g, kWeightsA);
            wu = weight_panels(up_w_, e, p0, np, stride_u, kWeightsB);
          }
          const Act* x = xs_.data() + c0 * ldx_;
          k_.gemm_w(x, ldx_, m, s_.H, wg, stride_g, np, cg, ldc, false, lora ? &lora_g : nullptr);
          k_.gemm_w(x, ldx_, m, s_.H, wu, stride_u, np, cu, ldc, false, lora ? &lora_u : nullptr);
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
          if (lora)
            k_.contract(h, cols, lora->values(3, e) + n0 * s_.r, s_.r,
                        ha_partial_.data() + ((c0 + i) * blocks_i() + tasks[ti].block) * s_.r);
          Act* h_row = hs_.data() + (c0 + i) * ldh_;
          k_.to_act(h, cols, h_row + n0, last_block ? ldh_ - n0 : cols);
        }
      }
    });
  }

  void down(const LoraPanels<T, Act>* lora) {
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
      for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
        const int64_t m = std::min(kChunkRows, end - c0);
        T* c = task_buffer<T>(kStageA, row_capacity(m) * ldc);
        float* h_scratch = nullptr;
        const auto h_row = [&](int64_t i) {
          if (h_scratch == nullptr) h_scratch = task_buffer<float>(kConvert, m * s_.I);
          return act_row_f32(k_, hs_.data() + (c0 + i) * ldh_, s_.I, h_scratch + i * s_.I);
        };
        ExtraProducts<Act> lora_d;
        if (lora) lora_d = expansion(*lora, 4, e, p0, lora_act(2) + c0 * ldr_, s_.r);
        if (direct_on_codes(down_w_, e, m, p0, np, h_row, c)) {
          add_extra(k_, lora_d, m, np, c, ldc);
        } else {
          if (wd == nullptr) wd = weight_panels(down_w_, e, p0, np, stride, kWeightsA);
          k_.gemm_w(hs_.data() + c0 * ldh_, ldh_, m, s_.I, wd, stride, np, c, ldc, false, lora ? &lora_d : nullptr);
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
        ldx_(act_stride(s.H)), ldi_(act_stride(s.I)), ldr_(expansion_stride<Act>(s.r)),
        ld2r_(expansion_stride<Act>(2 * s.r)),
        blocks_i_(ceil_div(padded_rows(s.I), kColsPerTask)), dys_(std::max<int64_t>(row_buffer(R_) * ldx_, 1)),
        dgs_(std::max<int64_t>(row_buffer(R_) * ldi_, 1)), dus_(std::max<int64_t>(row_buffer(R_) * ldi_, 1)),
        rank_(std::max<int64_t>(3 * R_ * s.r, 1)), rank_act_(std::max<int64_t>(row_buffer(R_) * (ldr_ + ld2r_), 1)),
        rank_partial_(std::max<int64_t>(R_ * blocks_i_ * 2 * s.r, 1)), dw_partial_(std::max<int64_t>(R_ * blocks_i_, 1)),
        dx_pairs_(std::max<int64_t>(s.pairs() * s.H, 1)) {}

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
      gather_dy();
      std::optional<LoraPanels<T, Act>> lora;
      if (s_.r > 0) {
        using L = LoraPanels<T, Act>;
        lora.emplace(k_, lora_args_, routing_,
                     std::vector<typename L::Job>{{{L::DownB}, L::Cols, L::Contraction},
                                                  {{L::DownA}, L::Cols, L::Expansion},
                                                  {{L::GateB}, L::Values},
                                                  {{L::UpB}, L::Values},
                                                  {{L::GateA, L::UpA}, L::Cols, L::Expansion}});
        down_rank_products(*lora);
      }
      if (lora_grads_) zero_unrouted_experts();
      else for (Tensor& g : grads_) g.zero_();
      grad_h(lora ? &*lora : nullptr);
      per_row(dw.data_ptr<T>());
      grad_hidden_pairs(lora ? &*lora : nullptr);
      combine_rows<T>(s_, routing_, dx_pairs_.data(), s_.H, grad_hidden.data_ptr<T>());
    }
    // Skipped (-1) slots keep a zero routing-weight gradient: they are never routed.
    Tensor grad_weights = dw.view({s_.T, s_.k}).to(weights_dtype_);
    return {as_reused(grad_hidden, hidden_dtype_), grad_weights, grads_[0], grads_[1], grads_[2], grads_[3],
            grads_[4], grads_[5]};
  }

 private:
  static constexpr c10::ScalarType dtype() { return c10::CppTypeToScalarType<T>::value; }
  // Rank-r rows (expert order, T): 0 dYB, 1 dgB, 2 duB.
  T* rank(int which, int64_t row) const { return rank_.data() + (which * R_ + row) * s_.r; }
  // s dYB (ldr) and s [dgB, duB] (ld2r) as activations.
  Act* dyb_act(int64_t row) const { return rank_act_.data() + row * ldr_; }
  Act* dgub_act(int64_t row) const { return rank_act_.data() + row_buffer(R_) * ldr_ + row * ld2r_; }
  // lora_mid's plane (0 xa_g, 1 xa_u, 2 ha) for pair p.
  const T* mid(int plane, int64_t p) const { return mid_data_ + (plane * s_.pairs() + p) * s_.r; }

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

  // dYB = dY . Bd per expert (rank(0)), s dYB as activations.
  void down_rank_products(const LoraPanels<T, Act>& lora) {
    const int64_t r = s_.r, halves = lora.has_lo(0) ? 2 : 1;
    const int64_t np = ceil_div(halves * r, kPanelRows), ldc = np * kPanelRows;
    parallel_for(routing_.hit_experts.size(), [&](int64_t slot) {
      const int64_t e = routing_.hit_experts[slot];
      const int64_t begin = routing_.offsets[e], end = routing_.offsets[e + 1];
      T* scaled = task_buffer<T>(kStageB, r);
      for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
        const int64_t m = std::min(kChunkRows, end - c0);
        T* c = task_buffer<T>(kStageA, row_capacity(m) * ldc);
        k_.gemm_a(dys_.data() + c0 * ldx_, ldx_, m, s_.H, lora.get(0, e), lora.panel_stride(0), np, c, ldc, false);
        if (dys_lo_)
          k_.gemm_a(dys_lo_->data() + c0 * ldx_, ldx_, m, s_.H, lora.get(0, e), lora.panel_stride(0), np, c, ldc, true);
        for (int64_t i = 0; i < m; ++i) {
          const T* ci = c + i * ldc;
          T* dyb = rank(0, c0 + i);
          for (int64_t q = 0; q < r; ++q) {
            dyb[q] = halves == 2 ? ci[q] + ci[r + q] : ci[q];
            scaled[q] = scaling_ * dyb[q];
          }
          expansion_row(k_, scaled, r, dyb_act(c0 + i));
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
        std::memset(static_cast<char*>(g.data_ptr()) + idle[i] * bytes, 0, bytes);
      }
    });
  }

  void grad_h(const LoraPanels<T, Act>* lora) {
    const int64_t I = s_.I, P = s_.pairs(), r = s_.r;
    const auto tasks = block_tasks(routing_, padded_rows(I));
    const T* prep = pre_.data_ptr<T>();
    const T* wp = w_.data_ptr<T>();
    parallel_for(tasks.size(), [&](int64_t ti) {
      const int64_t e = tasks[ti].expert, block = tasks[ti].block, k0 = block * kColsPerTask;
      const int64_t kc = std::min(kColsPerTask, I - k0), np = ceil_div(kc, kPanelRows);
      const bool last_block = k0 + kc == I;
      uint16_t* panels;
      const int64_t stride = repacked_columns(k_, down_w_, e, k0, kc, kWeightsA, panels);
      // T scratch: h, dg, du of a row; s xa_g, s xa_u, s w dYB of a row; the block's dBg [kc][r],
      // dBu [kc][r] and dAd [r][kc] accumulators.
      const int64_t grads = lora_grads_ ? 3 * kColsPerTask * r : 0;
      T* h = task_buffer<T>(kPanels, 3 * kColsPerTask + 3 * r + grads);
      T *dg = h + kColsPerTask, *du = dg + kColsPerTask, *row_rank = du + kColsPerTask;
      T* acc = row_rank + 3 * r;
      std::fill(acc, acc + grads, T(0));
      const int64_t n_padded = last_block ? ldi_ - k0 : kc;
      const int64_t begin = routing_.offsets[e], end = routing_.offsets[e + 1];
      for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
        const int64_t m = std::min(kChunkRows, end - c0);
        T* c = task_buffer<T>(kStageA, row_capacity(m) * kColsPerTask);
        ExtraProducts<Act> lora_d;
        if (lora) lora_d = expansion(*lora, 1, e, k0 / kPanelRows, dyb_act(c0), r);
        k_.gemm_w(dys_.data() + c0 * ldx_, ldx_, m, padded_rows(s_.H), panels, stride, np, c, kColsPerTask, false,
                  lora ? &lora_d : nullptr);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t row = c0 + i, p = order_[row];
          dw_partial_.data()[row * blocks_i_ + block] = k_.glu_backward(
              prep + p * I + k0, prep + (P + p) * I + k0, c + i * kColsPerTask, wp[p], kc, variant_.glu, h, dg, du);
          if (lora) {
            T* partial = rank_partial_.data() + (row * blocks_i_ + block) * 2 * r;
            k_.contract(dg, kc, lora->values(2, e) + k0 * r, r, partial);
            k_.contract(du, kc, lora->values(3, e) + k0 * r, r, partial + r);
          }
          if (lora_grads_) {
            for (int64_t q = 0; q < r; ++q) {
              row_rank[q] = scaling_ * mid(0, p)[q];
              row_rank[r + q] = scaling_ * mid(1, p)[q];
              row_rank[2 * r + q] = scaling_ * wp[p] * rank(0, row)[q];
            }
            k_.rank1(dg, kc, row_rank, r, acc);                             // dBg
            k_.rank1(du, kc, row_rank + r, r, acc + kColsPerTask * r);      // dBu
            k_.rank1(row_rank + 2 * r, r, h, kc, acc + 2 * kColsPerTask * r);  // dAd ([r][kc])
          }
          k_.to_act(dg, kc, dgs_.data() + row * ldi_ + k0, n_padded);
          k_.to_act(du, kc, dus_.data() + row * ldi_ + k0, n_padded);
        }
      }
      if (lora_grads_) {
        store_rows_of(grads_[1], e, k0, acc, kc, r);                     // dBg [E, I, r]
        store_rows_of(grads_[3], e, k0, acc + kColsPerTask * r, kc, r);  // dBu
        store_columns_of(grads_[4], e, k0, acc + 2 * kColsPerTask * r, r, kc);  // dAd [E, r, I]
      }
    });
  }

  // The routing-weight gradient; with LoRA, dgB and duB (sums of grad_h's partial contractions) and
  // s [dgB, duB] as activations.
  void per_row(T* dw) {
    const int64_t r = s_.r;
    parallel_for(ceil_div(R_, kRowsPerTask), [&](int64_t task) {
      T* scaled = task_buffer<T>(kStageB, 2 * r);
      for (int64_t row = task * kRowsPerTask; row < std::min(R_, (task + 1) * kRowsPerTask); ++row) {
        const int64_t p = order_[row];
        T sum = 0;
        for (int64_t b = 0; b < blocks_i_; ++b) sum += dw_partial_.data()[row * blocks_i_ + b];
        // The down bias is part of the expert output the routing weight scales.
        if (const T* bias = variant_.down_bias(routing_.expert_of_pair[p]))
          for (int64_t n = 0; n < s_.H; ++n) sum += dy_source_.value(p / s_.k, n) * bias[n];
        dw[p] = sum;
        if (r == 0) continue;
        const T* partial = rank_partial_.data() + row * blocks_i_ * 2 * r;
        T* dgb = rank(1, row);
        T* dub = rank(2, row);
        std::copy(partial, partial + r, dgb);
        std::copy(partial + r, partial + 2 * r, dub);
        for (int64_t b = 1; b < blocks_i_; ++b)
          for (int64_t q = 0; q < r; ++q) {
            dgb[q] += partial[b * 2 * r + q];
            dub[q] += partial[b * 2 * r + r + q];
          }
        for (int64_t q = 0; q < r; ++q) {
          scaled[q] = scaling_ * dgb[q];
          scaled[r + q] = scaling_ * dub[q];
        }
        expansion_row(k_, scaled, 2 * r, dgub_act(row));
      }
    });
  }

  void grad_hidden_pairs(const LoraPanels<T, Act>* lora) {
    const int64_t H = s_.H, Ip = padded_rows(s_.I), r = s_.r;
    const auto tasks = block_tasks(routing_, H);
    const T* wp = w_.data_ptr<T>();
    parallel_for(tasks.size(), [&](int64_t ti) {
      const int64_t e = tasks[ti].expert, h0 = tasks[ti].block * kColsPerTask;
      const int64_t kc = std::min(kColsPerTask, H - h0), np = ceil_div(kc, kPanelRows);
      uint16_t *panels_g, *panels_u;
      const int64_t stride_g = repacked_columns(k_, gate_w_, e, h0, kc, kWeightsA, panels_g);
      const int64_t stride_u = repacked_columns(k_, up_w_, e, h0, kc, kWeightsB, panels_u);
      // T scratch: x and dY segments of a row; s dgB, s duB, s w ha of a row; the block's dAg, dAu
      // [r][kc] and dBd [kc][r] accumulators.
      const int64_t grads = lora_grads_ ? 3 * kColsPerTask * r : 0;
      T* x = task_buffer<T>(kPanels, 2 * kColsPerTask + 3 * r + grads);
      T *dy = x + kColsPerTask, *row_rank = dy + kColsPerTask, *acc = row_rank + 3 * r;
      std::fill(acc, acc + grads, T(0));
      const int64_t begin = routing_.offsets[e], end = routing_.offsets[e + 1];
      for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
        const int64_t m = std::min(kChunkRows, end - c0);
        T* c = task_buffer<T>(kStageA, row_capacity(m) * kColsPerTask);
        ExtraProducts<Act> lora_x;
        if (lora) lora_x = expansion(*lora, 4, e, h0 / kPanelRows, dgub_act(c0), 2 * r);
        k_.gemm_w(dgs_.data() + c0 * ldi_, ldi_, m, Ip, panels_g, stride_g, np, c, kColsPerTask, false, nullptr);
        k_.gemm_w(dus_.data() + c0 * ldi_, ldi_, m, Ip, panels_u, stride_u, np, c, kColsPerTask, true,
                  lora ? &lora_x : nullptr);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t row = c0 + i, p = order_[row], t = p / s_.k;
          std::copy(c + i * kColsPerTask, c + i * kColsPerTask + kc, dx_pairs_.data() + p * H + h0);
          if (!lora_grads_) continue;
          for (int64_t q = 0; q < r; ++q) {
            row_rank[q] = scaling_ * rank(1, row)[q];
            row_rank[r + q] = scaling_ * rank(2, row)[q];
            row_rank[2 * r + q] = scaling_ * wp[p] * mid(2, p)[q];
          }
          const T* xs = x_source_.segment(t, h0, kc, x);
          const T* dys = dy_source_.segment(t, h0, kc, dy);
          k_.rank1(row_rank, r, xs, kc, acc);                              // dAg [r][kc]
          k_.rank1(row_rank + r, r, xs, kc, acc + kColsPerTask * r);       // dAu
          k_.rank1(dys, kc, row_rank + 2 * r, r, acc + 2 * kColsPerTask * r);  // dBd [kc][r]
        }
      }
      if (lora_grads_) {
        store_columns_of(grads_[0], e, h0, acc, r, kc);                      // dAg [E, r, H]
        store_columns_of(grads_[2], e, h0, acc + kColsPerTask * r, r, kc);   // dAu
        store_rows_of(grads_[5], e, h0, acc + 2 * kColsPerTask * r, kc, r);  // dBd [E, H, r]
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
  // Rows (expert order): dY, dg, du as activations; dYB, dgB, duB; their scaled activations; partial
  // [dgB, duB] and routing-weight gradients per block of I (summed by per_row); dX per pair (pair order).
  const ReusedBuffer<Act> dys_, dgs_, dus_;
  const ReusedBuffer<T> rank_;
  const ReusedBuffer<Act> rank_act_;
  const ReusedBuffer<T> rank_partial_, dw_partial_, dx_pairs_;
  std::unique_ptr<ReusedBuffer<Act>> dys_lo_;
  bool lora_grads_ = false;
  std::vector<Tensor> grads_;
};

}  // namespace

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
  const Shapes s = check_inputs(hidden_states, topk_ids, topk_weights, gate_weight, up_weight, down_weight,
                                gate_scale, up_scale, down_scale, weight_format, intermediate_size, lora);
  const ExpertWeights gate(s.format, gate_weight, gate_scale, s.I, s.H, s.gate_groups);
  const ExpertWeights up(s.format, up_weight, up_scale, s.I, s.H, s.gate_groups);
  const ExpertWeights down(s.format, down_weight, down_scale, s.H, s.I, s.down_groups);
  const auto run = [&](const auto& kernels, auto scaling) {
    using T = decltype(scaling);
    const Variant<T> v(variant, s);
    Forward<T, typename std::decay_t<decltype(kernels)>::act_type> forward(s, kernels, hidden_states, topk_ids, topk_weights,
                                                                      gate, up, down, lora, scaling, save_for_backward, v);
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
  const Shapes s = check_inputs(hidden_states, topk_ids, topk_weights, gate_weight, up_weight, down_weight,
                                gate_scale, up_scale, down_scale, weight_format, intermediate_size, lora);
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
  check_shape(gate_up_pre, "gate_up_pre", {2, s.pairs(), s.I}, "[2, num_tokens * num_experts_per_tok, intermediate_size]");
  check_shape(lora_mid, "lora_mid", {3, s.pairs(), s.r}, "[3, num_tokens * num_experts_per_tok, lora_rank]");
  const ExpertWeights gate(s.format, gate_weight, gate_scale, s.I, s.H, s.gate_groups);
  const ExpertWeights up(s.format, up_weight, up_scale, s.I, s.H, s.gate_groups);
  const ExpertWeights down(s.format, down_weight, down_scale, s.H, s.I, s.down_groups);
  const auto run = [&](const auto& kernels, auto scaling) {
    using T = decltype(scaling);
    const Variant<T> v(variant, s);
    Backward<T, typename std::decay_t<decltype(kernels)>::act_type> backward(s, kernels, grad_output, hidden_states,
                                                                        topk_ids, topk_weights, gate, up, down, lora,
                                                                        scaling, gate_up_pre, lora_mid, v);
    return backward.run(lora_grads);
  };
  if (hidden_states.scalar_type() == at::kDouble) return run(ref_kernels_f64(), lora_scaling);
  const IsaKernels isa = active_gemm_kernels();
  const float scaling = static_cast<float>(lora_scaling);
  return isa.bf16 ? run(*isa.bf16, scaling) : run(*isa.f32, scaling);
}

}  // namespace kt
