"""Concrete wrappers, laid out as in kt-kernel (`kt_kernel.utils.amx_sft` → `kt_ops.utils.amx_sft`)."""
