"""The bottom layer of kt_ops: what every other module may import, and which imports no kt_ops module
itself (only the compiled kernels, `kt_ops._C`).

- `formats`: weight formats, method names and what they map to, LoRA tensor names and shapes.
- `packed`: `PackedExperts` (frozen expert weights in the kernels' layout) and the pure functions on it
  (pack, unpack, split along the intermediate dimension, permute expert slots).
- `checks`: argument checks that raise a clear exception naming the argument.
- `durable`: crash-consistent writes (every file kt_ops writes goes through it) and the cpu_save lock.
"""
