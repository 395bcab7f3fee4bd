"""End-to-end benchmarks (SPEC §5): what ``patch_var`` and the fused attention module
give a whole model, patched vs unpatched, side by side in one run.

* VAR-shaped model (tests/var_model.py, VAR's attribute structure, SDPA attention =
  VAR without flash-attn / xformers) at d16 (C=1024, H=16) and d24 (C=1536, H=24),
  l2-norm attention, 10 scales (L=680), V=4096: a training step (forward + backward
  of the cross-entropy, bf16 autocast, B=32) and class-conditional sampling
  (``autoregressive_infer_cfg``, B=32, CFG, top-k 900; the stand-in VQ-VAE decoder is
  a 1x1 conv, so the time is the transformer's).
* Infinity-shaped stack: 4 pre-norm blocks of C=2048, H=16 (D=128), cosine attention
  with 2D RoPE, the 1:1 schedule up to 64x64 (L=10521), B=4, training step;
  ``FusedSelfAttention`` vs Infinity's eager attention on the same weights.

``eager_ms`` in the records is the unpatched model, ``speedup_vs_eager`` the gain.
On CPU: tiny models, reference backend, to keep the suite runnable.
"""

import copy
import functools
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import posenc_fast as pf
from harness import DEVICE, ON_GPU, measure_case
from posenc_fast.integrations.var import patch_var
from posenc_fast.nn.attention import FusedSelfAttention, block_causal_bias

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from var_model import FFN, build_var_shaped, infinity_rope_cache, infinity_style_attention  # noqa: E402

VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
INFINITY_PN = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
AMP = torch.bfloat16 if ON_GPU else None
BACKENDS = [b for b in ("cuda", "triton") if pf.available_backends(DEVICE)[b] == "available"] if ON_GPU \
    else ["reference"]

# name -> model config, batch, headline, target speedup
VAR_WORKLOADS = {
    "var-d16-b32": (dict(depth=16, embed_dim=1024, num_heads=16, patch_nums=VAR_PN), 32, True, 1.10),
    "var-d24-b32": (dict(depth=24, embed_dim=1536, num_heads=24, patch_nums=VAR_PN), 32, False, None),
} if ON_GPU else {
    "tiny-d2-b2": (dict(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3)), 2, False, None),
}
INFINITY_WORKLOADS = {
    "infinity-2b-4blocks-b4": (dict(depth=4, embed_dim=2048, num_heads=16, patch_nums=INFINITY_PN), 4),
} if ON_GPU else {
    "tiny-infinity-2blocks-b2": (dict(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3)), 2),
}


def amp():
    return torch.autocast(DEVICE.type, dtype=AMP, enabled=AMP is not None)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@functools.lru_cache(maxsize=1)
def var_pair(workload):
    """(unpatched, patched) copies of one model, with inputs; one workload held at a time."""
    cfg, B, _, _ = VAR_WORKLOADS[workload]
    ref = build_var_shaped(vocab_size=4096 if ON_GPU else 48, Cvae=32 if ON_GPU else 8, num_classes=1000,
                           mlp_ratio=4.0, attn_l2_norm=True, device=DEVICE, **cfg)
    fast = patch_var(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 1000, (B,), generator=g).to(DEVICE)
    x = torch.randn(B, ref.L - ref.first_l, ref.Cvae, generator=g).to(DEVICE)
    target = torch.randint(0, ref.V, (B, ref.L), generator=g).to(DEVICE)
    return ref, fast, (label, x, target)


def train_step(model, label, x, target):
    model.zero_grad(set_to_none=True)
    with amp():
        logits = model(label, x)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1))
    loss.backward()
    return loss


def check_close(ref_fn, fast_fn, tol):
    """The patched path is timed only once it gives the unpatched result."""
    torch.manual_seed(0)
    want = ref_fn()
    torch.manual_seed(0)
    got = fast_fn()
    err = rel_err(got, want)
    assert err <= tol, f"patched result differs from the unpatched one (relative error {err:.3g})"


TOL = 5e-2 if ON_GPU else 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", list(VAR_WORKLOADS))
def test_bench_var_train_step(benchmark, workload, backend):
    ref, fast, (label, x, target) = var_pair(workload)
    _, B, headline, target_speedup = VAR_WORKLOADS[workload]
    patch_var(fast, backend=backend)
    ref.train(), fast.train()
    check_close(lambda: train_step(ref, label, x, target), lambda: train_step(fast, label, x, target), TOL)
    measure_case(
        benchmark, op="var_train_step", direction="fwd+bwd", workload=workload, dtype=AMP or torch.float32,
        backend=backend, fn=lambda: train_step(fast, label, x, target), baseline_key=("var_train", workload),
        eager=lambda: train_step(ref, label, x, target), compiled=None, headline=headline,
        baseline="unpatched VAR-shaped model (SDPA attention)", target_speedup=target_speedup,
        B=B, C=ref.C, depth=ref.depth, L=ref.L)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", list(VAR_WORKLOADS))
def test_bench_var_sampling(benchmark, workload, backend):
    ref, fast, (label, _, _) = var_pair(workload)
    _, B, _, _ = VAR_WORKLOADS[workload]
    patch_var(fast, backend=backend)
    ref.eval(), fast.eval()

    def sample(model):
        with amp():
            return model.autoregressive_infer_cfg(B, label, g_seed=0, cfg=4.0, top_k=900 if ON_GPU else 8)

    if ON_GPU:  # in bf16 another token may win a close draw: check the run, not the pixels
        img = sample(fast)
        assert img.shape == (B, 3, VAR_PN[-1], VAR_PN[-1]) and torch.isfinite(img).all()
    else:
        check_close(lambda: sample(ref), lambda: sample(fast), TOL)
    measure_case(
        benchmark, op="var_sampling", direction="fwd", workload=workload, dtype=AMP or torch.float32,
        backend=backend, fn=lambda: sample(fast), baseline_key=("var_sampling", workload),
        eager=lambda: sample(ref), compiled=None, baseline="unpatched VAR-shaped model (SDPA attention, KV cache)",
        B=B, C=ref.C, depth=ref.depth, L=ref.L)


class InfinityBlock(nn.Module):
    def __init__(self, C, H, patch_nums, backend):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = FusedSelfAttention(C, H, rope=True, rope_scales=patch_nums, backend=backend)
        self.ffn = FFN(C, 4 * C)

    def forward(self, x, mask, rope_cache=None):
        h = self.ln1(x)
        a = self.attn(h, mask) if rope_cache is None else infinity_style_attention(self.attn, h, mask, *rope_cache)
        x = x + a
        return x + self.ffn(self.ln2(x))


@functools.lru_cache(maxsize=1)
def infinity_stack(workload):
    cfg, B = INFINITY_WORKLOADS[workload]
    C, H, pn = cfg["embed_dim"], cfg["num_heads"], cfg["patch_nums"]
    torch.manual_seed(0)
    blocks = nn.ModuleList([InfinityBlock(C, H, pn, None) for _ in range(cfg["depth"])]).to(DEVICE)
    with torch.no_grad():
        for b in blocks:
            b.attn.q_bias.normal_(0, 0.02), b.attn.v_bias.normal_(0, 0.02)
    L = sum(p * p for p in pn)
    mask = block_causal_bias(pn, dtype=AMP or torch.float32, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in infinity_rope_cache(C // H, pn))
    x = torch.randn(B, L, C, device=DEVICE)
    return blocks, mask, (cos, sin), x


def infinity_step(blocks, x, mask, rope_cache):
    blocks.zero_grad(set_to_none=True)
    with amp():
        h = x
        for b in blocks:
            h = b(h, mask, rope_cache)
    loss = h.float().square().mean()
    loss.backward()
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", list(INFINITY_WORKLOADS))
def test_bench_infinity_rope_blocks(benchmark, workload, backend):
    blocks, mask, rope_cache, x = infinity_stack(workload)
    for b in blocks:
        b.attn.backend = backend
    check_close(lambda: infinity_step(blocks, x, mask, rope_cache), lambda: infinity_step(blocks, x, mask, None), TOL)
    cfg, B = INFINITY_WORKLOADS[workload]
    measure_case(
        benchmark, op="infinity_rope_blocks_train_step", direction="fwd+bwd", workload=workload,
        dtype=AMP or torch.float32, backend=backend, fn=lambda: infinity_step(blocks, x, mask, None),
        baseline_key=("infinity_blocks", workload), eager=lambda: infinity_step(blocks, x, mask, rope_cache),
        compiled=None, baseline="Infinity-style eager attention (fp32 rotation) on the same weights",
        B=B, C=cfg["embed_dim"], depth=cfg["depth"], L=x.shape[1])
