"""pytest configuration of the kt_ops suite.

* ``isa`` fixture: parametrized over ``kt_ops.cpu_info()["available_isas"]``;
  selects the ISA with ``kt_ops.set_isa`` and restores the previous one. That
  includes "amx-emu" (the AMX kernels on software tiles), available on every
  CPU. ISAs that round fp32 activations to bf16 (amx, amx-emu, avx512 with
  AVX512_BF16) are held to the bf16 bars instead of the fp32 "tight" one:
  see ``kt_testing.BF16_ROUNDING_ISAS`` / ``comparison_mode``.
* hypothesis profiles: "default" (modest, deadline=None), "thorough" (more
  examples); choose with ``HYPOTHESIS_PROFILE=thorough``.

kt_ops is imported lazily, only when a test module asks for it, so the
reference tests run without the C++ extension.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=50,
    deadline=None,
    # CI must not turn red on a new random draw: the default run replays the same examples; the
    # "thorough" profile explores new ones.
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _available_isas():
    import kt_ops

    return list(kt_ops.cpu_info()["available_isas"])


def pytest_generate_tests(metafunc):
    if "isa" in metafunc.fixturenames:
        metafunc.parametrize("isa", _available_isas(), indirect=True)


@pytest.fixture
def isa(request):
    """Run the test with kernel ISA ``request.param``; restore the previous ISA afterwards."""
    import kt_ops

    previous = kt_ops.get_isa()
    kt_ops.set_isa(request.param)
    try:
        yield request.param
    finally:
        kt_ops.set_isa(previous)


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Tests must not leak ISA / thread-count / grad-mode changes into each other."""
    kt = sys.modules.get("kt_ops")
    isa = kt.get_isa() if kt is not None else None
    nthreads = kt.get_num_threads() if kt is not None else None
    torch_threads = torch.get_num_threads()
    grad_enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(grad_enabled)
    torch.set_num_threads(torch_threads)
    if kt is not None:
        kt.set_isa(isa)
        kt.set_num_threads(nthreads)


@pytest.fixture
def one_torch_thread():
    """Tiny models' torch ops run faster on one thread than contending with kt_ops' worker pool (and
    anything else running) for the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
