"""Test setup shared by the whole suite.

Without a CUDA device the Triton kernels run in the interpreter on CPU tensors
(TRITON_INTERPRET must be set before triton is imported), and every output buffer
is NaN-poisoned (POSENC_FAST_POISON) so an element a kernel forgets to write fails.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("POSENC_FAST_POISON", "1")

import pytest  # noqa: E402

import posenc_fast  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (dtype, atol, rtol) for results of fp32-accumulated kernels compared with an fp32
# reference and rounded once to the output dtype.
DTYPE_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]


def fast_backends():
    """The non-reference backends that can run on this machine's test device."""
    return [b for b in ("triton", "cuda") if posenc_fast.available_backends(DEVICE)[b] == "available"]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cuda_library():
    """The built CUDA extension module. Skips without it, except under CI
    (POSENC_FAST_REQUIRE_CUDA_EXT=1), which builds it and so must find it."""
    from posenc_fast import _cuda

    if _cuda.load_error():
        if os.environ.get("POSENC_FAST_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"the CUDA extension must be built here: {_cuda.load_error()}")
        pytest.skip(f"CUDA extension not built: {_cuda.load_error()}")
    return _cuda.lib()


def capture_and_replay(step, refresh):
    """Warms ``step()`` up on a side stream (kernel compilation, autotuning, cached
    tables), captures it in a CUDA graph, calls ``refresh()`` to change the inputs in
    place, replays, and returns (the replayed outputs, a fresh eager ``step()``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    refresh()
    graph.replay()
    torch.cuda.synchronize()
    return static, step()
