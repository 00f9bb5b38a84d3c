// MoE expert computation with LoRA on gate/up/down: forward and backward (see kt_ops/reference.py for
// the math). The ISA-specific part is only the two GEMM shapes of kernels/gemm.h; this file does the
// routing (counting sort of (token, slot) pairs by expert), the LoRA rank-r products, the
// activation, and the reductions, with fp32 accumulation (fp64 for verification runs).
//
// Every per-pair intermediate is stored in pair order p = t * k + j, so backward can be fed the
// tensors forward returned without any hidden state, and their sizes follow from input shapes.
#include "moe_sft.h"

#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "formats.h"
#include "kernels/gemm.h"
#include "runtime/cpu.h"
#include "runtime/thread_pool.h"

namespace kt {
namespace {

constexpr int64_t kRowsPerTask = 64;       // rows of one expert handled by one GEMM task
constexpr int64_t kPanelsPerTask = 4;      // 64 output columns per gate/up/down forward task
constexpr int64_t kColsPerNnTask = 64;     // output columns per backward GEMM task
constexpr int64_t kPairsPerTask = 8;       // per-pair elementwise / rank-r work
constexpr int64_t kTokensPerTask = 16;

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

// A GEMM task: rows [row_begin, row_end) of one expert's routed pairs, one block of output columns.
struct GemmTask {
  int64_t expert, row_begin, row_end, col_begin, col_end;
};

std::vector<GemmTask> gemm_tasks(const Routing& routing, int64_t cols, int64_t cols_per_task) {
  std::vector<GemmTask> tasks;
  for (int64_t e : routing.hit_experts) {
    for (int64_t r0 = routing.offsets[e]; r0 < routing.offsets[e + 1]; r0 += kRowsPerTask) {
      const int64_t r1 = std::min(routing.offsets[e + 1], r0 + kRowsPerTask);
      for (int64_t c0 = 0; c0 < cols; c0 += cols_per_task) tasks.push_back({e, r0, r1, c0, std::min(cols, c0 + cols_per_task)});
    }
  }
  return tasks;
}

template <typename T>
std::vector<T>& scratch(int slot, size_t size) {
  thread_local std::vector<T> buffers[4];
  auto& buffer = buffers[slot];
  if (buffer.size() < size) buffer.resize(size);
  return buffer;
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

// Torch ops are not called from pool tasks (they would start their own threads inside ours).
// Writes a [rows, cols] block into dst (contiguous) at offset; with src_transposed, src holds it as
// [cols, rows].
template <typename T>
void store_rows(const T* src, int64_t rows, int64_t cols, bool src_transposed, const Tensor& dst, int64_t offset) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dst.scalar_type(), "kt_store_rows", [&] {
    scalar_t* out = dst.data_ptr<scalar_t>() + offset;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        out[i * cols + j] = static_cast<scalar_t>(src_transposed ? src[j * rows + i] : src[i * cols + j]);
  });
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// VariantArgs checked and converted to T (biases are [E, I] / [E, H]: small, converted whole).
template <typename T>
class Variant {
 public:
  Variant(const VariantArgs& v, const Shapes& s)
      : kind(check_variant(v, s.E, s.H, s.I)),
        alpha(kind == Activation::ClampedSilu ? T(1) : static_cast<T>(v.alpha)),
        up_offset(kind == Activation::ClampedSilu ? T(0) : T(1)),
        limit(static_cast<T>(v.limit)),
        gate_(convert(v.gate_bias)), up_(convert(v.up_bias)), down_(convert(v.down_bias)), I_(s.I), H_(s.H) {}

  // The expert's bias row, or nullptr without that bias.
  const T* gate_bias(int64_t e) const { return gate_.defined() ? gate_.data_ptr<T>() + e * I_ : nullptr; }
  const T* up_bias(int64_t e) const { return up_.defined() ? up_.data_ptr<T>() + e * I_ : nullptr; }
  const T* down_bias(int64_t e) const { return down_.defined() ? down_.data_ptr<T>() + e * H_ : nullptr; }

  const Activation kind;
  // Both clamped activations: h = (u' + up_offset) * g' * sigmoid(alpha * g').
  const T alpha, up_offset, limit;

 private:
  static Tensor convert(const std::optional<Tensor>& t) {
    return t.has_value() ? t->to(c10::CppTypeToScalarType<T>::value).contiguous() : Tensor();
  }
  const Tensor gate_, up_, down_;
  const int64_t I_, H_;
};

// dst [cols, rows] = src [rows, cols] transposed and converted to T (a LoRA B matrix [out, r] to
// [r, out]). In 4 x 4 tiles, so that every store is a 16-byte run and only 4 output rows are written
// at once: writing one element to each of the r rows per step put r stores rows * sizeof(T) bytes
// apart, a multiple of 4 KiB for the usual sizes, into one L1 set, and the conversion took 15% of a
// decode call. The tiles use SSE2, the x86-64 baseline this file is compiled for.
template <typename T, typename S>
void transpose_to(const S* src, int64_t rows, int64_t cols, T* dst) {
  int64_t i0 = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float> && (std::is_same_v<S, float> || std::is_same_v<S, c10::BFloat16>)) {
    const auto load4 = [](const S* p) {
      if constexpr (std::is_same_v<S, float>) {
        return _mm_loadu_ps(p);
      } else {  // bf16 is the high half of an fp32
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), raw));
      }
    };
    if (cols % 4 == 0) {
      for (; i0 + 4 <= rows; i0 += 4) {
        for (int64_t j = 0; j < cols; j += 4) {
          __m128 r0 = load4(src + i0 * cols + j), r1 = load4(src + (i0 + 1) * cols + j);
          __m128 r2 = load4(src + (i0 + 2) * cols + j), r3 = load4(src + (i0 + 3) * cols + j);
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
          _mm_storeu_ps(dst + j * rows + i0, r0);
          _mm_storeu_ps(dst + (j + 1) * rows + i0, r1);
          _mm_storeu_ps(dst + (j + 2) * rows + i0, r2);
          _mm_storeu_ps(dst + (j + 3) * rows + i0, r3);
        }
      }
    }
  }
#endif
  for (; i0 < rows; i0 += 4) {
    const int64_t end = std::min(i0 + 4, rows);
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = i0; i < end; ++i) dst[j * rows + i] = static_cast<T>(src[i * cols + j]);
  }
}

// The LoRA matrices of the experts that are hit, converted to T, with every B transposed to
// [r, out] so that all rank-r work is a dot or an axpy over contiguous rows. Only hit experts are
// converted, so a decode step does not touch all E experts' adapters; A matrices already in T are
// not copied at all.
template <typename T>
class Lora {
 public:
  enum Which { GateA, GateB, UpA, UpB, DownA, DownB };

  Lora(const LoraArgs& args, const Routing& routing) : sources_{&args.gate_a, &args.gate_b, &args.up_a,
                                                                &args.up_b,   &args.down_a, &args.down_b} {
    slot_of_expert_.assign(args.gate_a.size(0), -1);
    for (size_t i = 0; i < routing.hit_experts.size(); ++i) slot_of_expert_[routing.hit_experts[i]] = i;
    int64_t total = 0;
    for (int m = 0; m < 6; ++m) {
      contiguous_[m] = sources_[m]->contiguous();
      // An A matrix already in T is read in place: only B (transposed) and other dtypes are copied.
      in_place_[m] = !is_b(m) && contiguous_[m].scalar_type() == c10::CppTypeToScalarType<T>::value;
      offset_[m] = total;
      if (!in_place_[m]) total += sources_[m]->size(1) * sources_[m]->size(2);
    }
    per_expert_ = total;
    const int64_t hits = routing.hit_experts.size();
    storage_ = std::make_unique<ReusedBuffer<T>>(std::max<int64_t>(hits * per_expert_, 1));
    ThreadPool::instance().parallel_for(hits * 6, [&](int64_t task) {
      const int64_t e = routing.hit_experts[task / 6];
      const int m = task % 6;
      if (in_place_[m]) return;
      const Tensor& src = contiguous_[m];
      const int64_t rows = src.size(1), cols = src.size(2);
      T* dst = storage_->data() + slot_of_expert_[e] * per_expert_ + offset_[m];
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, src.scalar_type(), "kt_lora_convert", [&] {
        const scalar_t* from = src.data_ptr<scalar_t>() + e * rows * cols;
        if (!is_b(m)) {
          for (int64_t i = 0; i < rows * cols; ++i) dst[i] = static_cast<T>(from[i]);
        } else {
          transpose_to(from, rows, cols, dst);
        }
      });
    });
  }
  // A as [r, in]; B transposed as [r, out].
  const T* get(Which which, int64_t expert) const {
    if (in_place_[which]) {
      const Tensor& src = contiguous_[which];
      return src.data_ptr<T>() + expert * src.size(1) * src.size(2);
    }
    return storage_->data() + slot_of_expert_[expert] * per_expert_ + offset_[which];
  }

 private:
  static bool is_b(int m) { return m == GateB || m == UpB || m == DownB; }

  const Tensor* sources_[6];
  Tensor contiguous_[6];
  bool in_place_[6] = {};
  int64_t offset_[6] = {};
  int64_t per_expert_ = 0;
  std::vector<int64_t> slot_of_expert_;
  std::unique_ptr<ReusedBuffer<T>> storage_;
};

template <typename T>
const Kernels<T>& kernels();

template <>
const Kernels<float>& kernels<float>() {
  return active_gemm_kernels();
}

template <>
const Kernels<double>& kernels<double>() {
  return ref_kernels_f64();  // float64 exists for verification; only the reference kernel has it
}

// C = A . W^T for panels [p0, p0 + np) of one expert's weight, whatever its format.
template <typename T>
void project_nt(const Kernels<T>& k, const ExpertWeights& w, int64_t expert, const T* const* rows, int64_t m,
                int64_t K, int64_t p0, int64_t np, T* tile) {
  if constexpr (std::is_same_v<T, float>) {
    if (w.gemm_nt_codes(expert, rows, m, p0, np, tile)) return;
  }
  int64_t first_panel;
  const uint16_t* panels = w.nt_panels(expert, p0, np, first_panel);
  k.gemm_nt(rows, m, K, panels, first_panel, np, tile);
}

template <typename T>
void parallel_over(int64_t count, int64_t per_task, const std::function<void(int64_t, int64_t)>& body) {
  const int64_t tasks = (count + per_task - 1) / per_task;
  ThreadPool::instance().parallel_for(tasks, [&](int64_t task) {
    body(task * per_task, std::min(count, (task + 1) * per_task));
  });
}

// out[t] = sum over the token's valid slots j of scale(t, j) * rows[t * k + j], in slot order so the
// result does not depend on scheduling.
template <typename T>
void combine_rows(const Shapes& s, const Routing& routing, const T* rows, int64_t width, const T* scale,
                  Tensor& out) {
  const Kernels<T>& k = kernels<T>();
  T* dst = out.data_ptr<T>();
  parallel_over<T>(s.T, kTokensPerTask, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* o = dst + t * width;
      std::fill(o, o + width, T(0));
      for (int64_t j = 0; j < s.k; ++j) {
        const int64_t p = t * s.k + j;
        if (routing.expert_of_pair[p] >= 0) k.axpy(scale ? scale[p] : T(1), rows + p * width, o, width);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename T>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Shapes& s, const Tensor& hidden, const Tensor& ids,
                                                const Tensor& weights, const ExpertWeights& gate_w,
                                                const ExpertWeights& up_w, const ExpertWeights& down_w,
                                                const LoraArgs& lora_args, T scaling,
                                                bool save, const Variant<T>& variant) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  const auto opts = hidden.options().dtype(dtype);
  const int64_t P = s.pairs(), H = s.H, I = s.I, r = s.r, Hp = padded_rows(H), Ip = padded_rows(I);
  const Routing routing = route(ids, s.E);
  const Lora<T> lora(lora_args, routing);
  const Kernels<T>& k = kernels<T>();

  Tensor x = as_reused(hidden, dtype);
  Tensor w = as_reused(weights, dtype);
  Tensor gate_up_pre = save ? reused_tensor({2, P, I}, opts) : at::empty({0}, opts);
  if (save) zero_skipped_pairs(routing, gate_up_pre.data_ptr<T>(), 2, P, I);
  Tensor lora_mid = save ? reused_tensor({3, P, r}, opts).zero_() : at::empty({0}, opts);
  // Per-pair intermediates, reused across calls; only rows of routed pairs are written and read.
  const ReusedBuffer<T> mid_buffer(save ? 1 : std::max<int64_t>(3 * P * r, 1));  // xa_gate, xa_up, ha_down
  const ReusedBuffer<T> h(std::max<int64_t>(P * I, 1)), y(std::max<int64_t>(P * H, 1));
  const T* xp = x.data_ptr<T>();
  T* midp = save ? lora_mid.data_ptr<T>() : mid_buffer.data();
  T* hp = h.data();
  T* yp = y.data();
  T* prep = save ? gate_up_pre.data_ptr<T>() : nullptr;
  const int64_t* order = routing.order.data();

  // Rank-r inputs of the gate/up LoRA: xa = x . A^T.
  if (r > 0) {
    parallel_over<T>(routing.order.size(), kPairsPerTask, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t p = order[i], e = routing.expert_of_pair[p];
        const T* xr = xp + (p / s.k) * H;
        for (int64_t q = 0; q < r; ++q) {
          midp[p * r + q] = k.dot(xr, lora.get(Lora<T>::GateA, e) + q * H, H);
          midp[(P + p) * r + q] = k.dot(xr, lora.get(Lora<T>::UpA, e) + q * H, H);
        }
      }
    });
  }

  // Gate and up as one job: both tiles of a block, then LoRA, SiLU(g) * u in the epilogue.
  {
    const auto tasks = gemm_tasks(routing, Ip / kPanelRows, kPanelsPerTask);
    ThreadPool::instance().parallel_for(tasks.size(), [&](int64_t ti) {
      const GemmTask& task = tasks[ti];
      const int64_t m = task.row_end - task.row_begin, np = task.col_end - task.col_begin, cols = np * kPanelRows;
      std::vector<const T*> rows(m);
      for (int64_t i = 0; i < m; ++i) rows[i] = xp + (order[task.row_begin + i] / s.k) * H;
      T* tile_g = scratch<T>(0, m * cols).data();
      T* tile_u = scratch<T>(1, m * cols).data();
      project_nt(k, gate_w, task.expert, rows.data(), m, H, task.col_begin, np, tile_g);
      project_nt(k, up_w, task.expert, rows.data(), m, H, task.col_begin, np, tile_u);
      const int64_t n0 = task.col_begin * kPanelRows, n1 = std::min(I, n0 + cols);
      const T* bg = r ? lora.get(Lora<T>::GateB, task.expert) : nullptr;
      const T* bu = r ? lora.get(Lora<T>::UpB, task.expert) : nullptr;
      // The variant is chosen once per task: the SiLU loop below stays the plain one.
      const T* gate_bias = variant.gate_bias(task.expert);
      const T* up_bias = variant.up_bias(task.expert);
      const bool clamped = variant.kind != Activation::Silu;
      const T alpha = variant.alpha, up_offset = variant.up_offset, limit = variant.limit;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t p = order[task.row_begin + i];
        T* gi = tile_g + i * cols;
        T* ui = tile_u + i * cols;
        for (int64_t q = 0; q < r; ++q) {
          k.axpy(scaling * midp[p * r + q], bg + q * I + n0, gi, n1 - n0);
          k.axpy(scaling * midp[(P + p) * r + q], bu + q * I + n0, ui, n1 - n0);
        }
        if (gate_bias) k.axpy(T(1), gate_bias + n0, gi, n1 - n0);
        if (up_bias) k.axpy(T(1), up_bias + n0, ui, n1 - n0);
        if (clamped) {
          for (int64_t n = n0; n < n1; ++n) {
            const T g = gi[n - n0], u = ui[n - n0];
            if (prep) {
              prep[p * I + n] = g;
              prep[(P + p) * I + n] = u;
            }
            const T gc = std::min(g, limit), uc = std::min(std::max(u, -limit), limit);
            hp[p * I + n] = (uc + up_offset) * gc * sigmoid(alpha * gc);
          }
          continue;
        }
        for (int64_t n = n0; n < n1; ++n) {
          const T g = gi[n - n0], u = ui[n - n0];
          if (prep) {
            prep[p * I + n] = g;
            prep[(P + p) * I + n] = u;
          }
          hp[p * I + n] = g * sigmoid(g) * u;
        }
      }
    });
  }

  // Rank-r input of the down LoRA: ha = h . Ad^T.
  if (r > 0) {
    parallel_over<T>(routing.order.size(), kPairsPerTask, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t p = order[i], e = routing.expert_of_pair[p];
        for (int64_t q = 0; q < r; ++q) midp[(2 * P + p) * r + q] = k.dot(hp + p * I, lora.get(Lora<T>::DownA, e) + q * I, I);
      }
    });
  }

  // Down projection per pair (unweighted), then the weighted sum over each token's slots.
  {
    const auto tasks = gemm_tasks(routing, Hp / kPanelRows, kPanelsPerTask);
    ThreadPool::instance().parallel_for(tasks.size(), [&](int64_t ti) {
      const GemmTask& task = tasks[ti];
      const int64_t m = task.row_end - task.row_begin, np = task.col_end - task.col_begin, cols = np * kPanelRows;
      std::vector<const T*> rows(m);
      for (int64_t i = 0; i < m; ++i) rows[i] = hp + order[task.row_begin + i] * I;
      T* tile = scratch<T>(0, m * cols).data();
      project_nt(k, down_w, task.expert, rows.data(), m, I, task.col_begin, np, tile);
      const int64_t n0 = task.col_begin * kPanelRows, n1 = std::min(H, n0 + cols);
      const T* bd = r ? lora.get(Lora<T>::DownB, task.expert) : nullptr;
      const T* down_bias = variant.down_bias(task.expert);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t p = order[task.row_begin + i];
        T* yi = tile + i * cols;
        for (int64_t q = 0; q < r; ++q) k.axpy(scaling * midp[(2 * P + p) * r + q], bd + q * H + n0, yi, n1 - n0);
        if (down_bias) k.axpy(T(1), down_bias + n0, yi, n1 - n0);
        std::copy(yi, yi + (n1 - n0), yp + p * H + n0);
      }
    });
  }

  Tensor out = reused_tensor({s.T, H}, opts);
  combine_rows<T>(s, routing, yp, H, w.data_ptr<T>(), out);
  return {as_reused(out, hidden.scalar_type()), gate_up_pre, lora_mid};
}

// ---------------------------------------------------------------------------------------------
// Backward (base weights frozen: gradients for hidden states, routing weights and LoRA only), in
// named phases that share one set of per-pair buffers:
//   1. down_rank_grads:      dYB = dY . Bd (rank r), shared by dh_raw and the down-A gradient
//   2. grad_h:               dh_raw = dY . Wd + s dYB . Ad   (gemm_nn; unweighted by the routing weight)
//   3. through_activation:   routing-weight gradient (plus dY . down bias); dg, du through the
//                            activation (zero where a clamp is active); rank-r dg.Bg, du.Bu
//   4. grad_hidden_pairs:    dX per pair = dg . Wg + du . Wu + s [(dg.Bg) . Ag + (du.Bu) . Au]   (gemm_nn)
//   5. lora_grads:           outer products summed over each expert's pairs
// then the per-pair dX rows are summed per token. Only rows of routed pairs are written or read, so
// the buffers need no zero fill beyond the padding columns gemm_nn reads.

template <typename T>
class Backward {
 public:
  Backward(const Shapes& s, const Tensor& grad_output, const Tensor& hidden, const Tensor& ids, const Tensor& weights,
           const ExpertWeights& gate_w, const ExpertWeights& up_w, const ExpertWeights& down_w,
           const LoraArgs& lora_args, T scaling, const Tensor& gate_up_pre, const Tensor& lora_mid,
           const Variant<T>& variant)
      : s_(s), H_(s.H), I_(s.I), r_(s.r), P_(s.pairs()), Hp_(padded_rows(s.H)), Ip_(padded_rows(s.I)),
        gate_w_(gate_w), up_w_(up_w), down_w_(down_w), lora_args_(lora_args), variant_(variant), scaling_(scaling),
        routing_(route(ids, s.E)), lora_(lora_args, routing_), k_(kernels<T>()), order_(routing_.order.data()),
        routed_(routing_.order.size()), x_(as_reused(hidden, dtype())), w_(as_reused(weights, dtype())),
        pre_(as_reused(gate_up_pre, dtype())), mid_(as_reused(lora_mid, dtype())),
        dy_(std::max<int64_t>(s.T * Hp_, 1)), dg_(std::max<int64_t>(P_ * Ip_, 1)), du_(std::max<int64_t>(P_ * Ip_, 1)),
        h_(std::max<int64_t>(P_ * I_, 1)), rank_grads_(std::max<int64_t>(3 * P_ * r_, 1)),
        dx_pairs_(std::max<int64_t>(P_ * H_, 1)), dw_(at::zeros({P_}, hidden.options().dtype(dtype()))) {
    // Rows that feed gemm_nn must be zero beyond N up to the padded N.
    Tensor g = grad_output.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "kt_grad_output", [&] {
      const scalar_t* src = g.data_ptr<scalar_t>();
      for (int64_t t = 0; t < s.T; ++t) {
        T* row = dy_.data() + t * Hp_;
        for (int64_t n = 0; n < H_; ++n) row[n] = static_cast<T>(src[t * H_ + n]);
        std::fill(row + H_, row + Hp_, T(0));
      }
    });
  }

  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> run(const Tensor& hidden,
                                                                                   const Tensor& weights,
                                                                                   bool compute_lora_grads) {
    if (r_ > 0) down_rank_grads();
    grad_h();
    through_activation();
    grad_hidden_pairs();
    std::vector<Tensor> lora = lora_grads(compute_lora_grads);
    const auto opts = hidden.options().dtype(dtype());
    Tensor grad_hidden = reused_tensor({s_.T, H_}, opts);
    combine_rows<T>(s_, routing_, dx_pairs_.data(), H_, nullptr, grad_hidden);
    // Skipped (-1) slots keep a zero routing-weight gradient: dw starts at zero and they are never routed.
    Tensor grad_weights = dw_.view({s_.T, s_.k}).to(weights.scalar_type());
    return {as_reused(grad_hidden, hidden.scalar_type()), grad_weights, lora[0], lora[1], lora[2], lora[3], lora[4], lora[5]};
  }

 private:
  static constexpr c10::ScalarType dtype() { return c10::CppTypeToScalarType<T>::value; }
  const T* dy_row(int64_t p) const { return dy_.data() + (p / s_.k) * Hp_; }
  T* rank_grad(int which, int64_t p) const { return rank_grads_.data() + (which * P_ + p) * r_; }

  void down_rank_grads() {
    parallel_over<T>(routed_, kPairsPerTask, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t p = order_[i];
        const T* bd = lora_.get(Lora<T>::DownB, routing_.expert_of_pair[p]);
        T* out = rank_grad(0, p);
        for (int64_t q = 0; q < r_; ++q) out[q] = k_.dot(dy_row(p), bd + q * H_, H_);
      }
    });
  }

  void grad_h() {
    const auto tasks = gemm_tasks(routing_, I_, kColsPerNnTask);
    ThreadPool::instance().parallel_for(tasks.size(), [&](int64_t ti) {
      const GemmTask& task = tasks[ti];
      const int64_t m = task.row_end - task.row_begin, kc = task.col_end - task.col_begin;
      std::vector<const T*> rows(m);
      for (int64_t i = 0; i < m; ++i) rows[i] = dy_row(order_[task.row_begin + i]);
      T* tile = scratch<T>(0, m * kc).data();
      int64_t k_total, k_first;
      const uint16_t* wd = down_w_.nn_panels(task.expert, task.col_begin, kc, k_total, k_first);
      k_.gemm_nn(rows.data(), m, Hp_, wd, k_total, k_first, kc, tile, kc);
      const T* ad = r_ ? lora_.get(Lora<T>::DownA, task.expert) : nullptr;
      const bool last = task.col_end == I_;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t p = order_[task.row_begin + i];
        T* dst = dg_.data() + p * Ip_ + task.col_begin;
        std::copy(tile + i * kc, tile + (i + 1) * kc, dst);
        for (int64_t q = 0; q < r_; ++q) k_.axpy(scaling_ * rank_grad(0, p)[q], ad + q * I_ + task.col_begin, dst, kc);
        if (last) {  // the padding columns that grad_hidden_pairs' gemm_nn reads
          std::fill(dst + kc, dst + kc + (Ip_ - I_), T(0));
          std::fill(du_.data() + p * Ip_ + I_, du_.data() + (p + 1) * Ip_, T(0));
        }
      }
    });
  }

  void through_activation() {
    const T* wp = w_.data_ptr<T>();
    const T* prep = pre_.data_ptr<T>();
    T* dwp = dw_.data_ptr<T>();
    const bool clamped = variant_.kind != Activation::Silu;
    const T alpha = variant_.alpha, up_offset = variant_.up_offset, limit = variant_.limit;
    parallel_over<T>(routed_, kPairsPerTask, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t p = order_[i], e = routing_.expert_of_pair[p];
        const T* g = prep + p * I_;
        const T* u = prep + (P_ + p) * I_;
        T* dgr = dg_.data() + p * Ip_;
        T* dur = du_.data() + p * Ip_;
        T* hr = h_.data() + p * I_;
        T dweight = 0;
        if (clamped) {
          for (int64_t n = 0; n < I_; ++n) {
            const T gc = std::min(g[n], limit), uc = std::min(std::max(u[n], -limit), limit);
            const T sig = sigmoid(alpha * gc), glu = gc * sig;
            hr[n] = (uc + up_offset) * glu;
            dweight += hr[n] * dgr[n];
            const T dh = wp[p] * dgr[n];
            // A clamped value passes no gradient (torch.clamp's rule: the bounds themselves pass it).
            dgr[n] = g[n] <= limit ? dh * (uc + up_offset) * sig * (T(1) + alpha * gc * (T(1) - sig)) : T(0);
            dur[n] = (u[n] >= -limit && u[n] <= limit) ? dh * glu : T(0);
          }
        } else {
          for (int64_t n = 0; n < I_; ++n) {
            const T sig = sigmoid(g[n]), silu = g[n] * sig;
            hr[n] = silu * u[n];
            dweight += hr[n] * dgr[n];
            const T dh = wp[p] * dgr[n];
            dgr[n] = dh * u[n] * sig * (T(1) + g[n] * (T(1) - sig));
            dur[n] = dh * silu;
          }
        }
        // The down bias is part of the expert output the routing weight scales.
        const T* down_bias = variant_.down_bias(e);
        dwp[p] = down_bias ? dweight + k_.dot(dy_row(p), down_bias, H_) : dweight;
        if (r_ > 0) {
          const T* bg = lora_.get(Lora<T>::GateB, e);
          const T* bu = lora_.get(Lora<T>::UpB, e);
          for (int64_t q = 0; q < r_; ++q) {
            rank_grad(1, p)[q] = k_.dot(dgr, bg + q * I_, I_);
            rank_grad(2, p)[q] = k_.dot(dur, bu + q * I_, I_);
          }
        }
      }
    });
  }

  void grad_hidden_pairs() {
    const auto tasks = gemm_tasks(routing_, H_, kColsPerNnTask);
    ThreadPool::instance().parallel_for(tasks.size(), [&](int64_t ti) {
      const GemmTask& task = tasks[ti];
      const int64_t m = task.row_end - task.row_begin, kc = task.col_end - task.col_begin;
      std::vector<const T*> rows_g(m), rows_u(m);
      for (int64_t i = 0; i < m; ++i) {
        rows_g[i] = dg_.data() + order_[task.row_begin + i] * Ip_;
        rows_u[i] = du_.data() + order_[task.row_begin + i] * Ip_;
      }
      T* tile_g = scratch<T>(0, m * kc).data();
      T* tile_u = scratch<T>(1, m * kc).data();
      int64_t k_total, k_first;
      const uint16_t* wg = gate_w_.nn_panels(task.expert, task.col_begin, kc, k_total, k_first);
      k_.gemm_nn(rows_g.data(), m, Ip_, wg, k_total, k_first, kc, tile_g, kc);
      const uint16_t* wu = up_w_.nn_panels(task.expert, task.col_begin, kc, k_total, k_first);
      k_.gemm_nn(rows_u.data(), m, Ip_, wu, k_total, k_first, kc, tile_u, kc);
      const T* ag = r_ ? lora_.get(Lora<T>::GateA, task.expert) : nullptr;
      const T* au = r_ ? lora_.get(Lora<T>::UpA, task.expert) : nullptr;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t p = order_[task.row_begin + i];
        T* dst = dx_pairs_.data() + p * H_ + task.col_begin;
        for (int64_t c = 0; c < kc; ++c) dst[c] = tile_g[i * kc + c] + tile_u[i * kc + c];
        for (int64_t q = 0; q < r_; ++q) {
          k_.axpy(scaling_ * rank_grad(1, p)[q], ag + q * H_ + task.col_begin, dst, kc);
          k_.axpy(scaling_ * rank_grad(2, p)[q], au + q * H_ + task.col_begin, dst, kc);
        }
      }
    });
  }

  // One task per (expert, matrix); B gradients are accumulated transposed ([r, out]). Zeros when the
  // caller does not need them (a frozen adapter): autograd drops them anyway.
  std::vector<Tensor> lora_grads(bool compute) {
    std::vector<Tensor> grads;
    const Tensor* inputs[6] = {&lora_args_.gate_a, &lora_args_.gate_b, &lora_args_.up_a,
                               &lora_args_.up_b,   &lora_args_.down_a, &lora_args_.down_b};
    for (const Tensor* t : inputs) grads.push_back(reused_tensor(t->sizes(), t->options()));
    if (r_ == 0 || !compute) {
      for (Tensor& g : grads) g.zero_();
      return grads;
    }
    const T* xp = x_.data_ptr<T>();
    const T* wp = w_.data_ptr<T>();
    const T* midp = mid_.data_ptr<T>();
    // Every expert's slice is written once: zeros for the experts no token reached, the sums for the
    // others (so a prefill step, where all experts are hit, writes no zero fill at all).
    ThreadPool::instance().parallel_for(s_.E * 6, [&](int64_t ti) {
      const int64_t e = ti / 6, which = ti % 6;
      const int64_t rows = inputs[which]->size(1), cols = inputs[which]->size(2);
      if (routing_.offsets[e] == routing_.offsets[e + 1]) {
        const int64_t bytes = rows * cols * grads[which].element_size();
        std::memset(static_cast<char*>(grads[which].data_ptr()) + e * bytes, 0, bytes);
        return;
      }
      std::vector<T>& acc = scratch<T>(2, rows * cols);
      std::fill(acc.begin(), acc.begin() + rows * cols, T(0));
      for (int64_t i = routing_.offsets[e]; i < routing_.offsets[e + 1]; ++i) {
        const int64_t p = order_[i], t = p / s_.k;
        switch (which) {
          case 0:  // dAg[q, :] += s (dg.Bg)[q] x
          case 2:
            for (int64_t q = 0; q < r_; ++q)
              k_.axpy(scaling_ * rank_grad(which == 0 ? 1 : 2, p)[q], xp + t * H_, acc.data() + q * H_, H_);
            break;
          case 1:  // dBg^T[q, :] += s xa[q] dg
          case 3: {
            const T* d = which == 1 ? dg_.data() + p * Ip_ : du_.data() + p * Ip_;
            const T* xa = midp + ((which == 1 ? 0 : 1) * P_ + p) * r_;
            for (int64_t q = 0; q < r_; ++q) k_.axpy(scaling_ * xa[q], d, acc.data() + q * I_, I_);
            break;
          }
          case 4:  // dAd[q, :] += s w (dY.Bd)[q] h
            for (int64_t q = 0; q < r_; ++q)
              k_.axpy(scaling_ * wp[p] * rank_grad(0, p)[q], h_.data() + p * I_, acc.data() + q * I_, I_);
            break;
          case 5: {  // dBd^T[q, :] += s w ha[q] dY
            const T* ha = midp + (2 * P_ + p) * r_;
            for (int64_t q = 0; q < r_; ++q) k_.axpy(scaling_ * wp[p] * ha[q], dy_row(p), acc.data() + q * H_, H_);
            break;
          }
        }
      }
      // store_rows puts the transposed B gradients back as [out, r].
      const bool transposed = which == 1 || which == 3 || which == 5;
      store_rows(acc.data(), rows, cols, transposed, grads[which], e * rows * cols);
    });
    return grads;
  }

  const Shapes& s_;
  const int64_t H_, I_, r_, P_, Hp_, Ip_;
  const ExpertWeights &gate_w_, &up_w_, &down_w_;
  const LoraArgs& lora_args_;
  const Variant<T>& variant_;
  const T scaling_;
  const Routing routing_;
  const Lora<T> lora_;
  const Kernels<T>& k_;
  const int64_t* order_;
  const int64_t routed_;
  const Tensor x_, w_, pre_, mid_;
  // Per-pair intermediates, reused across calls (ReusedBuffer): dY padded to Hp; dg (first dh_raw,
  // then the gate pre-activation gradient) and du padded to Ip; h; the rank-r products dY.Bd,
  // dg.Bg, du.Bu; dX per pair.
  const ReusedBuffer<T> dy_, dg_, du_, h_, rank_grads_, dx_pairs_;
  Tensor dw_;
};

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Shapes& s, const Tensor& grad_output, const Tensor& hidden, const Tensor& ids, const Tensor& weights,
    const ExpertWeights& gate_w, const ExpertWeights& up_w, const ExpertWeights& down_w, const LoraArgs& lora_args,
    T scaling, const Tensor& gate_up_pre, const Tensor& lora_mid, bool compute_lora_grads, const VariantArgs& v) {
  const Variant<T> variant(v, s);
  Backward<T> backward(s, grad_output, hidden, ids, weights, gate_w, up_w, down_w, lora_args, scaling, gate_up_pre,
                       lora_mid, variant);
  return backward.run(hidden, weights, compute_lora_grads);
}

// The few torch ops used inside the kernels (conversions, zero fills) must run inline: waking
// torch's OpenMP team would leave it spinning on the cores the kt_ops pool is about to use.
// c10::ParallelGuard covers torch's native thread pool, but OpenMP builds decide by
// omp_in_parallel() and this thread's omp_get_max_threads(), so the calling thread's OpenMP thread
// count is lowered to 1 for the duration (an OpenMP ICV: other threads are unaffected). The symbols
// are weak so that a torch without OpenMP still loads.
extern "C" {
int omp_get_max_threads(void) __attribute__((weak));
void omp_set_num_threads(int) __attribute__((weak));
}

class InlineTorchOps {
 public:
  InlineTorchOps() : guard_(true) {
    if (omp_get_max_threads != nullptr && omp_set_num_threads != nullptr) {
      saved_ = omp_get_max_threads();
      if (saved_ > 1) omp_set_num_threads(1);
    }
  }
  ~InlineTorchOps() {
    if (saved_ > 1) omp_set_num_threads(saved_);
  }
  InlineTorchOps(const InlineTorchOps&) = delete;
  InlineTorchOps& operator=(const InlineTorchOps&) = delete;

 private:
  c10::ParallelGuard guard_;
  int saved_ = 0;
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
  const InlineTorchOps inline_torch_ops;
  const VariantArgs variant{gate_bias, up_bias, down_bias, activation, swiglu_alpha, swiglu_limit};
  const LoraArgs lora{gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b};
  const Shapes s = check_inputs(hidden_states, topk_ids, topk_weights, gate_weight, up_weight, down_weight,
                                gate_scale, up_scale, down_scale, weight_format, intermediate_size, lora);
  const ExpertWeights gate(s.format, gate_weight, gate_scale, s.I, s.H, s.gate_groups);
  const ExpertWeights up(s.format, up_weight, up_scale, s.I, s.H, s.gate_groups);
  const ExpertWeights down(s.format, down_weight, down_scale, s.H, s.I, s.down_groups);
  if (hidden_states.scalar_type() == at::kDouble)
    return forward_impl<double>(s, hidden_states, topk_ids, topk_weights, gate, up, down, lora, lora_scaling,
                                save_for_backward, Variant<double>(variant, s));
  return forward_impl<float>(s, hidden_states, topk_ids, topk_weights, gate, up, down, lora,
                             static_cast<float>(lora_scaling), save_for_backward, Variant<float>(variant, s));
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
  const InlineTorchOps inline_torch_ops;
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
  if (hidden_states.scalar_type() == at::kDouble)
    return backward_impl<double>(s, grad_output, hidden_states, topk_ids, topk_weights, gate, up, down, lora,
                                 lora_scaling, gate_up_pre, lora_mid, lora_grads, variant);
  return backward_impl<float>(s, grad_output, hidden_states, topk_ids, topk_weights, gate, up, down, lora,
                              static_cast<float>(lora_scaling), gate_up_pre, lora_mid, lora_grads, variant);
}

}  // namespace kt
