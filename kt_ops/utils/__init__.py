"""kt-kernel's import paths for the concrete wrappers and loaders (`kt_kernel.utils.amx_sft` ->
`kt_ops.utils.amx_sft`, ...); they live in kt_ops.wrappers and kt_ops.weights."""
