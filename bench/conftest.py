import os
import sys

import torch

# `pytest bench` from the repo root: make `import harness` work.
sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """POSENC_FAST_BENCH_HEADLINE=1 keeps the headline workloads only (each bench
    module's WORKLOADS maps a name to a tuple whose last item says headline)."""
    if os.environ.get("POSENC_FAST_BENCH_HEADLINE") != "1":
        return
    keep, drop = [], []
    for item in items:
        workloads = getattr(item.module, "WORKLOADS", None)
        name = getattr(getattr(item, "callspec", None), "params", {}).get("workload")
        is_headline = workloads is not None and name in workloads and workloads[name][-1] is True
        (keep if is_headline else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
