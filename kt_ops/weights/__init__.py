"""Weight I/O: reading checkpoints and writing kt_ops' own files. Every reader ends in `PackedExperts`
(kt_ops.core.packed), which is all the layers and wrappers above consume.

- `loaders`: Hugging Face safetensors checkpoints (sharded or not; per-expert, fused or multimodal
  layouts) and kt_ops' packed files behind the kt-kernel `SafeTensorLoader` API.
- `native`: pre-quantized Hugging Face checkpoints (DeepSeek block-FP8, compressed-tensors INT4) and the FP8 decode.
- `gguf`: GGUF files (llama.cpp quantizations).
- `ktransformers`: KTransformers' converted expert directories, read exactly.
- `packed_io`: kt_ops' packed safetensors layout (save, load, memory-mapped load).
- `convert`: checkpoint -> packed files (`python -m kt_ops.convert_weights`).
- `moe_lora`: peft adapter -> the MoE-LoRA file the serving wrapper reads (`python -m kt_ops.convert_moe_lora`).
- `sources`: `ExpertSource`, the one reader `from_pretrained` and `apply_kt(kt_weight_path=...)` use for
  a layer's experts, whatever the source above.
"""
