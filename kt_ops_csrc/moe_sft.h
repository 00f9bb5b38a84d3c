#pragma once
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

namespace kt {

// Both ops end with the expert MLP's variant (see ops.cpp): optional per-expert biases and the
// activation ("silu", "clamped_swiglu" with swiglu_alpha / swiglu_limit, or "clamped_silu" with
// swiglu_limit).

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> moe_sft_forward(
    const Tensor& hidden_states, const Tensor& topk_ids, const Tensor& topk_weights, const Tensor& gate_weight,
    const Tensor& up_weight, const Tensor& down_weight, const std::optional<Tensor>& gate_scale,
    const std::optional<Tensor>& up_scale, const std::optional<Tensor>& down_scale, c10::string_view weight_format,
    int64_t intermediate_size, const Tensor& gate_lora_a, const Tensor& gate_lora_b, const Tensor& up_lora_a,
    const Tensor& up_lora_b, const Tensor& down_lora_a, const Tensor& down_lora_b, double lora_scaling,
    bool save_for_backward, const std::optional<Tensor>& gate_bias, const std::optional<Tensor>& up_bias,
    const std::optional<Tensor>& down_bias, c10::string_view activation, double swiglu_alpha, double swiglu_limit);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> moe_sft_backward(
    const Tensor& grad_output, const Tensor& hidden_states, const Tensor& topk_ids, const Tensor& topk_weights,
    const Tensor& gate_weight, const Tensor& up_weight, const Tensor& down_weight,
    const std::optional<Tensor>& gate_scale, const std::optional<Tensor>& up_scale,
    const std::optional<Tensor>& down_scale, c10::string_view weight_format, int64_t intermediate_size,
    const Tensor& gate_lora_a, const Tensor& gate_lora_b, const Tensor& up_lora_a, const Tensor& up_lora_b,
    const Tensor& down_lora_a, const Tensor& down_lora_b, double lora_scaling, const Tensor& gate_up_pre,
    const Tensor& lora_mid, bool lora_grads, const std::optional<Tensor>& gate_bias,
    const std::optional<Tensor>& up_bias, const std::optional<Tensor>& down_bias, c10::string_view activation,
    double swiglu_alpha, double swiglu_limit);

// Per-phase wall times of the ops (for benchmarks): time_phases(true) clears and starts them.
void time_phases(bool on);
std::vector<std::pair<std::string, double>> phase_seconds();

}  // namespace kt
