// The op schemas (defined once, here), their CPU kernels, and the small runtime module.
#include <torch/extension.h>

#include "formats.h"
#include "moe_sft.h"
#include "runtime/cpu.h"
#include "runtime/thread_pool.h"

// Arguments after `*` are keyword-only. moe_sft_forward keeps its tensors positional: torch's
// register_autograd (kt_ops/ops.py) refuses keyword-only tensors on an op it differentiates. The order
// of every schema is the C++ functions' parameter order; kt_ops/ops.py passes every argument by name.
TORCH_LIBRARY(kt, m) {
  m.def(
      "moe_sft_forward(Tensor hidden_states, Tensor topk_ids, Tensor topk_weights, Tensor gate_weight, "
      "Tensor up_weight, Tensor down_weight, Tensor? gate_scale, Tensor? up_scale, Tensor? down_scale, "
      "str weight_format, int intermediate_size, Tensor gate_lora_a, Tensor gate_lora_b, Tensor up_lora_a, "
      "Tensor up_lora_b, Tensor down_lora_a, Tensor down_lora_b, float lora_scaling, bool save_for_backward, "
      "Tensor? gate_bias=None, Tensor? up_bias=None, Tensor? down_bias=None, *, str activation=\"silu\", "
      "float swiglu_alpha=1.702, float swiglu_limit=7.0) "
      "-> (Tensor output, Tensor gate_up_pre, Tensor lora_mid)");
  m.def(
      "moe_sft_backward(Tensor grad_output, Tensor hidden_states, Tensor topk_ids, Tensor topk_weights, *, "
      "Tensor gate_weight, Tensor up_weight, Tensor down_weight, Tensor? gate_scale=None, Tensor? up_scale=None, "
      "Tensor? down_scale=None, str weight_format, int intermediate_size, Tensor gate_lora_a, Tensor gate_lora_b, "
      "Tensor up_lora_a, Tensor up_lora_b, Tensor down_lora_a, Tensor down_lora_b, float lora_scaling, "
      "Tensor gate_up_pre, Tensor lora_mid, bool lora_grads=True, "
      "Tensor? gate_bias=None, Tensor? up_bias=None, Tensor? down_bias=None, str activation=\"silu\", "
      "float swiglu_alpha=1.702, float swiglu_limit=7.0) -> (Tensor grad_hidden_states, Tensor grad_topk_weights, "
      "Tensor grad_gate_lora_a, Tensor grad_gate_lora_b, Tensor grad_up_lora_a, Tensor grad_up_lora_b, "
      "Tensor grad_down_lora_a, Tensor grad_down_lora_b)");
  m.def("pack_weights(Tensor weight, str weight_format, int group_size) -> (Tensor packed, Tensor scales)");
  m.def("pack_codes(Tensor codes, Tensor scales, str weight_format) -> (Tensor packed, Tensor scales)");
  m.def("unpack_weights(Tensor packed, Tensor? scales, str weight_format, int rows, int cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(kt, CPU, m) {
  m.impl("moe_sft_forward", &kt::moe_sft_forward);
  m.impl("moe_sft_backward", &kt::moe_sft_backward);
  m.impl("pack_weights", &kt::pack_weights);
  m.impl("pack_codes", &kt::pack_codes);
  m.impl("unpack_weights", &kt::unpack_weights);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("set_isa", &kt::set_isa, "Choose the kernel ISA by name ('auto', 'ref', 'avx2', ...)");
  module.def("get_isa", [] { return kt::isa_name(kt::current_isa()); });
  module.def("available_isas", &kt::available_isa_names);
  module.def("set_integer_dot", &kt::set_integer_dot,
             "int8 and 4-bit formats: integer dot products at every row count");
  module.def("get_integer_dot", &kt::integer_dot_enabled);
  module.def("known_isas", &kt::known_isa_names);
  module.def("cpu_features", &kt::cpu_feature_list);
  module.def("cpu_model_name", &kt::cpu_model_name);
  module.def("physical_cores", &kt::physical_core_count);
  module.def("set_num_threads", [](int n) { kt::ThreadPool::main_pool().set_num_threads(n); });
  module.def("get_num_threads", [] { return kt::ThreadPool::main_pool().num_threads(); });
  module.def(
      "packed_bytes",
      [](const std::string& format, int64_t rows, int64_t cols) {
        return kt::packed_bytes(kt::parse_weight_format(format), rows, cols);
      },
      "Bytes per expert of a rows x cols matrix packed in `format` (overflow-checked)");
  module.def(
      "_inject_task_fault",
      [](bool on_caller, int subpool) {
        (subpool < 0 ? kt::ThreadPool::main_pool() : kt::ThreadPool::subpool(subpool)).inject_task_fault(on_caller);
      },
      py::arg("on_caller"), py::arg("subpool") = -1,
      "Test hook: the next task of the main pool (or of `subpool`) on a worker (or the calling) thread throws "
      "std::bad_alloc");
  // Sub-pools (threadpool_count > 1); kt_ops/core/subpools.py is their Python side.
  module.def("_configure_subpools", &kt::ThreadPool::configure_subpools, py::call_guard<py::gil_scoped_release>(),
             "(count, threads each, CPU set per sub-pool; empty = not pinned)");
  module.def("_subpool_count", &kt::ThreadPool::subpool_count);
  module.def("_subpool_threads", [](int i) { return kt::ThreadPool::subpool(i).num_threads(); });
  module.def("_enter_subpool", &kt::ThreadPool::enter_subpool,
             "The calling thread's ops run on sub-pool i from now on; the thread is pinned to its CPUs");
  module.def("_current_subpool", &kt::ThreadPool::current_subpool);
  module.def(
      "_first_touch_copy",
      [](const at::Tensor& t) {
        TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous(), "_first_touch_copy needs a contiguous CPU tensor");
        const size_t bytes = t.nbytes();
        if (bytes == 0) return t.clone();
        void* copy = kt::first_touch_copy(t.data_ptr(), bytes);
        return at::from_blob(copy, t.sizes(), [bytes](void* p) { kt::release_pages(p, bytes); }, t.options());
      },
      py::call_guard<py::gil_scoped_release>(),
      "A copy of the tensor in fresh pages first written by the calling thread's pool (NUMA first touch)");
  module.def("_time_phases", &kt::time_phases, "Benchmarks: start (clearing) or stop timing the ops' phases");
  module.def("_phase_times", &kt::phase_seconds, "Benchmarks: [(phase, seconds)] accumulated while timing");
  module.def("_arm_rendezvous", &kt::ThreadPool::arm_rendezvous, "Test hook, see thread_pool.h");
  module.def("_take_rendezvous_log", &kt::ThreadPool::take_rendezvous_log, "Test hook, see thread_pool.h");
}
