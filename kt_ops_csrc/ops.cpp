// The op schemas (defined once, here), their CPU kernels, and the small runtime module.
#include <torch/extension.h>

#include "formats.h"
#include "moe_sft.h"
#include "runtime/cpu.h"
#include "runtime/thread_pool.h"

TORCH_LIBRARY(kt, m) {
  m.def(
      "moe_sft_forward(Tensor hidden_states, Tensor topk_ids, Tensor topk_weights, Tensor gate_weight, "
      "Tensor up_weight, Tensor down_weight, Tensor? gate_scale, Tensor? up_scale, Tensor? down_scale, "
      "str weight_format, int intermediate_size, Tensor gate_lora_a, Tensor gate_lora_b, Tensor up_lora_a, "
      "Tensor up_lora_b, Tensor down_lora_a, Tensor down_lora_b, float lora_scaling, bool save_for_backward, "
      "Tensor? gate_bias=None, Tensor? up_bias=None, Tensor? down_bias=None, str activation=\"silu\", "
      "float swiglu_alpha=1.702, float swiglu_limit=7.0) "
      "-> (Tensor output, Tensor gate_up_pre, Tensor lora_mid)");
  m.def(
      "moe_sft_backward(Tensor grad_output, Tensor hidden_states, Tensor topk_ids, Tensor topk_weights, "
      "Tensor gate_weight, Tensor up_weight, Tensor down_weight, Tensor? gate_scale, Tensor? up_scale, "
      "Tensor? down_scale, str weight_format, int intermediate_size, Tensor gate_lora_a, Tensor gate_lora_b, "
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
  module.def("known_isas", &kt::known_isa_names);
  module.def("cpu_features", &kt::cpu_feature_list);
  module.def("cpu_model_name", &kt::cpu_model_name);
  module.def("physical_cores", &kt::physical_core_count);
  module.def("set_num_threads", [](int n) { kt::ThreadPool::instance().set_num_threads(n); });
  module.def("get_num_threads", [] { return kt::ThreadPool::instance().num_threads(); });
  module.def("packed_bytes", [](const std::string& format, int64_t rows, int64_t cols) {
    return kt::packed_bytes(kt::parse_weight_format(format), rows, cols);
  }, "Bytes per expert of a rows x cols matrix packed in `format` (overflow-checked)");
  module.def("_inject_task_fault", [](bool on_caller) { kt::ThreadPool::instance().inject_task_fault(on_caller); },
             "Test hook: the next pool task on a worker (or the calling) thread throws std::bad_alloc");
}
