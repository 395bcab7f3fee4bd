"""KV-cache handling in scale-by-scale sampling: VAR's cache that grows by
``torch.cat`` at every scale against ``qkv_proj(..., kv_cache=...)`` writing k and
v into one cache pair allocated per sampling run (``FusedSelfAttention`` /
``patch_var``).

Workloads: a stack of ``layers`` attention layers (VAR's l2-norm attention,
FusedSelfAttention weights; Infinity with its 2D RoPE) sampled over the whole
pyramid, the batch doubled for classifier-free guidance, bf16. For each mode (``cat``, ``fused``) it records:

* ``copied_bytes``: bytes read + written by cache handling (``cat`` / ``copy_``),
  counted by a dispatch mode over one pyramid. Both modes write every new k/v row
  once in the projection kernel (the cat path into fresh k, v tensors); those
  writes are the projection's output, not cache handling, and are not counted.
* ``peak_bytes``: the peak of the live bytes of every tensor the k/v path
  allocates (q, k, v, inverse norms, caches, cat results), tracked from allocation
  to free by the same dispatch mode.
* on a GPU also ``ms`` (the whole pyramid through the layers: qkv_proj, SDPA and
  the output projection per layer; CUDA events, median of repeats after warm-up)
  for ``cat``, ``fused`` and ``fused+graphs`` (one CUDA graph per scale, captured
  after a warm-up run and replayed), and ``cuda_peak_bytes`` (allocator peak over a
  run, weights excluded).

The byte counts do not depend on the device: without a GPU the kernel launches
are stubbed (tests/launch_stubs.py), only the counts are recorded, and the k/v
path runs without SDPA and the output projection.

    python bench/kv_cache.py [--workloads VAR-d16,VAR-d30,Infinity-2B] [--max-gib 4] [--json OUT]

A workload whose caches would pass ``--max-gib`` runs with fewer layers (its
``layers`` field says how many): the caches grow linearly with the layers, while
the cat path's transient is one layer's cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import weakref
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import posenc_fast as pf  # noqa: E402
from posenc_fast.nn.attention import FusedSelfAttention, _projection_params, attention_qkv  # noqa: E402
from harness import git_commit, time_ms, versions  # noqa: E402

VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # L = 680
INFINITY_PN = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)  # 1:1 up to 64x64, L = 10521
# name: (C, H, depth, pyramid, batch rows = 2 x images for classifier-free guidance, 2D RoPE)
WORKLOADS = {
    "VAR-d16": (1024, 16, 16, VAR_PN, 16, False),
    "VAR-d30": (1920, 30, 30, VAR_PN, 16, False),
    "Infinity-2B": (2048, 16, 32, INFINITY_PN, 2, True),
}
DTYPE = torch.bfloat16
COPY_OPS = (torch.ops.aten.cat.default, torch.ops.aten.copy_.default)


class CacheTraffic(TorchDispatchMode):
    """Bytes read + written by cat / copy_, and the peak of live bytes of the tensors
    allocated under it (an output that shares no storage with an input)."""

    def __init__(self):
        super().__init__()
        self.copied = self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func in COPY_OPS:
            read = inputs[1:] if func is torch.ops.aten.copy_.default else inputs
            self.copied += sum(t.nbytes for t in read) + sum(t.nbytes for t in outputs)
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        for t in outputs:
            if t.nbytes and t.untyped_storage().data_ptr() not in storages:
                self.live += t.nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, t.nbytes)
        return out


def cat_qkv(attn: FusedSelfAttention, x: torch.Tensor):
    """What VAR's attention does while caching: q, k, v, then the cache grows by cat."""
    q_scale, bias = _projection_params(attn)  # as the fused path: computed once per run
    first = 0 if attn.cached_k is None else attn.cached_k.shape[2]
    rope = dict(coords=attn.rope_coords[first:first + x.shape[1]], freqs=attn.rope_freqs) if attn.rope else {}
    q, k, v = pf.qkv_proj(x, attn.mat_qkv.weight, bias, num_heads=attn.num_heads, qk_l2norm=True, q_scale=q_scale,
                          backend=attn.backend, **rope)
    if attn.cached_k is not None:
        k = torch.cat((attn.cached_k, k), dim=2)
        v = torch.cat((attn.cached_v, v), dim=2)
    attn.cached_k, attn.cached_v = k, v
    return q, k, v


def fused_qkv(attn: FusedSelfAttention, x: torch.Tensor):
    first = 0 if attn.cached_k is None else attn.cached_k.shape[2]
    rope = dict(coords=attn.rope_coords[first:first + x.shape[1]], freqs=attn.rope_freqs) if attn.rope else {}
    return attention_qkv(attn, x, backend=attn.backend, **rope)


QKV = {"cat": cat_qkv, "fused": fused_qkv}


def layer_step(mode: str, attn: FusedSelfAttention, x: torch.Tensor) -> torch.Tensor:
    B, n, C = x.shape
    q, k, v = QKV[mode](attn, x)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(B, n, C))


def start_run(layers: List[FusedSelfAttention], L: int) -> None:
    for m in layers:
        m.kv_caching(True, max_len=L)


def count(layers, xs: List[torch.Tensor], L: int, mode: str) -> Dict[str, int]:
    """copied_bytes and peak_bytes of one pyramid through the k/v path of the layers."""
    for m in layers:
        _projection_params(m)  # the packed bias and q_scale, cached before counting: not cache handling
    traffic = CacheTraffic()
    with traffic:
        start_run(layers, L)
        for x in xs:
            for m in layers:
                QKV[mode](m, x)
        for m in layers:
            m.kv_caching(False)
    return {"copied_bytes": traffic.copied, "peak_bytes": traffic.peak}


def _time_ms(fn: Callable[[], object]) -> float:
    """A whole sampling run is long: fewer repeats than the per-op benchmarks."""
    return time_ms(fn, warmup=3, rep=10)


def gpu_measure(layers, xs, L: int) -> Dict[str, Dict[str, float]]:
    """ms and allocator peak per mode; fused+graphs captures one graph per scale."""
    res: Dict[str, Dict[str, float]] = {}
    for mode in ("cat", "fused"):
        def run(mode=mode):
            start_run(layers, L)
            for x in xs:
                for m in layers:
                    x = layer_step(mode, m, x)
            for m in layers:  # as VAR ends a run: frees the caches
                m.kv_caching(False)

        run()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        res[mode] = {"ms": _time_ms(run), "cuda_peak_bytes": torch.cuda.max_memory_allocated() - base}
    start_run(layers, L)  # rewind: the buffers stay where the graphs write them
    static = [x.clone() for x in xs]
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for s in static:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            h = s
            for m in layers:
                h = layer_step("fused", m, h)
        graphs.append(graph)

    def replay():
        for s, x, graph in zip(static, xs, graphs):
            s.copy_(x)  # a new scale's input, as sampling would provide it
            graph.replay()

    res["fused+graphs"] = {"ms": _time_ms(replay)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--max-gib", type=float, default=6.0, help="cap on one mode's caches (fewer layers above)")
    ap.add_argument("--json", help="append one JSON line per workload to this file")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    backend = "auto" if gpu else "triton"
    stub = contextlib.nullcontext
    if not gpu:
        from launch_stubs import stubbed_device_work

        stub = stubbed_device_work
    for name in args.workloads.split(","):
        C, H, depth, pyramid, rows, rope = WORKLOADS[name]
        L = sum(p * p for p in pyramid)
        cache_bytes = 2 * rows * L * C * torch.finfo(DTYPE).bits // 8  # k and v of one layer
        layers_n = max(1, min(depth, int(args.max_gib * 2 ** 30 // cache_bytes)))
        torch.manual_seed(0)
        layers = [FusedSelfAttention(C, H, rope=rope, rope_scales=pyramid if rope else None, backend=backend)
                  .to(device=device, dtype=DTYPE).eval() for _ in range(layers_n)]
        xs = [torch.randn(rows, p * p, C, device=device, dtype=DTYPE) for p in pyramid]
        row = {"bench": "kv_cache", "workload": name, "C": C, "H": H, "rope": rope, "depth": depth, "layers": layers_n,
               "rows": rows, "L": L, "dtype": str(DTYPE).replace("torch.", ""), "device": str(device),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
               "cache_bytes_per_layer": cache_bytes, "commit": git_commit(), "versions": versions()}
        with torch.no_grad(), stub():
            for mode in ("cat", "fused"):
                row[mode] = count(layers, xs, L, mode)
            if gpu:
                for mode, figures in gpu_measure(layers, xs, L).items():
                    row.setdefault(mode, {}).update(figures)
        cat, fused = row["cat"], row["fused"]
        print(f"{name}: {layers_n}/{depth} layers, {rows} rows, L={L}: copied {cat['copied_bytes'] / 2**20:.1f} MiB"
              f" (cat) vs {fused['copied_bytes'] / 2**20:.1f} MiB (fused); peak {cat['peak_bytes'] / 2**20:.1f} MiB"
              f" vs {fused['peak_bytes'] / 2**20:.1f} MiB; one layer's final cache {cache_bytes / 2**20:.1f} MiB")
        if gpu:
            print("  ms: " + ", ".join(f"{m} {row[m]['ms']:.3f}" for m in ("cat", "fused", "fused+graphs")))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
