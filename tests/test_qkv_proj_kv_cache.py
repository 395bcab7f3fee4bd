"""qkv_proj with ``kv_cache=(k_cache, v_cache)``: scale-by-scale sampling appends k
and v to caller-provided caches inside the kernel. Every backend against its own
cat path (the plain call whose k, v are concatenated scale by scale), rows outside
the window untouched (NaN poison), caches of other layouts, tracing (the mutating
custom op), bad inputs. The CUDA kernels' window stores are checked under host
emulation (tests/test_cuda_emulation.py)."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import posenc_fast as pf
from posenc_fast.ops import qkv_proj as qkv_ops
from posenc_fast.reference.rope import axial_rope_freqs, pyramid_coords
from conftest import DEVICE, fast_backends

BACKENDS = ["reference"] + fast_backends()
PN = (1, 2, 3)  # L = 14
L = sum(p * p for p in PN)

CONFIGS = {  # H, D, qkv_proj keywords
    "var": (3, 64, dict(qk_l2norm=True, q_scale=True)),
    "infinity": (1, 128, dict(qk_l2norm=True, rope="interleaved")),
    "half_no_norm": (2, 32, dict(rope="half")),
}


def _inputs(B, H, D, cfg, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    C = H * D
    x = torch.randn(B, L, C, generator=g).to(DEVICE, dtype)
    w = (torch.randn(3 * C, C, generator=g) * C ** -0.5).to(DEVICE, dtype)
    b = (torch.randn(3 * C, generator=g) * 0.5).to(DEVICE, dtype)
    kw = dict(num_heads=H, qk_l2norm=cfg.get("qk_l2norm", False))
    if cfg.get("q_scale"):
        kw["q_scale"] = (torch.rand(H, generator=g) * 3 + 0.5).to(DEVICE)
    rope = cfg.get("rope")
    if rope:
        kw["coords"] = pyramid_coords(PN, mode="round").to(DEVICE)
        kw["freqs"] = axial_rope_freqs(D).to(DEVICE)
        kw["pairing"] = rope
    return x, w, b, kw


def _scale_kw(kw, begin, n):
    out = dict(kw)
    if "coords" in kw:
        out["coords"] = kw["coords"][begin:begin + n]
    return out


def _poisoned_caches(B, H, D, L_max, dtype, layout):
    def one():
        if layout == "BLHD":  # (B, L_max, H, D) memory, as (B, H, L_max, D)
            return torch.full((B, L_max, H, D), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
        if layout == "packed":  # k and v of one (2, B, H, L_max, D) buffer
            return None
        return torch.full((B, H, L_max, D), float("nan"), dtype=dtype, device=DEVICE)

    if layout == "packed":
        kv = torch.full((2, B, H, L_max, D), float("nan"), dtype=dtype, device=DEVICE)
        return kv[0], kv[1]
    return one(), one()


@pytest.mark.parametrize("layout", ["BHLD", "BLHD", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_append_equals_the_cat_path(backend, config, B, dtype, layout):
    H, D, cfg = CONFIGS[config]
    x, w, b, kw = _inputs(B, H, D, cfg, dtype, seed=B + len(config))
    L_max = L + 3  # spare rows after the pyramid must stay untouched too
    kc, vc = _poisoned_caches(B, H, D, L_max, dtype, layout)
    addresses = (kc.data_ptr(), vc.data_ptr())
    cat_k = cat_v = None
    begin = 0
    with torch.no_grad():
        for pn in PN:
            n = pn * pn
            xs = x[:, begin:begin + n]
            skw = _scale_kw(kw, begin, n)
            q0, k0, v0 = pf.qkv_proj(xs, w, b, backend=backend, **skw)
            cat_k = k0 if cat_k is None else torch.cat((cat_k, k0), dim=2)
            cat_v = v0 if cat_v is None else torch.cat((cat_v, v0), dim=2)
            before_k, before_v = kc[:, :, :begin].clone(), vc[:, :, :begin].clone()
            q, k, v = pf.qkv_proj(xs, w, b, kv_cache=(kc, vc), cache_start=begin, backend=backend, **skw)
            begin += n
            # The same kernels with another store address: bit-equal to the cat path.
            assert torch.equal(q, q0)
            assert torch.equal(k, cat_k) and torch.equal(v, cat_v)
            assert k.shape == v.shape == (B, H, begin, D)
            assert (k.data_ptr(), v.data_ptr()) == addresses  # views of the caches, no copies
            assert torch.equal(kc[:, :, :begin - n], before_k) and torch.equal(vc[:, :, :begin - n], before_v)
            assert kc[:, :, begin:].isnan().all() and vc[:, :, begin:].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_writes_the_autocast_dtype(backend):
    H, D, cfg = CONFIGS["var"]
    x, w, b, kw = _inputs(2, H, D, cfg, torch.float32, seed=5)
    kc = torch.full((2, H, L, D), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    vc = kc.clone()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        q0, k0, v0 = pf.qkv_proj(x[:, :5], w, b, backend=backend, **kw)
        q, k, v = pf.qkv_proj(x[:, :5], w, b, kv_cache=(kc, vc), cache_start=0, backend=backend, **kw)
    assert q.dtype == k.dtype == torch.bfloat16
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tracing_sees_the_mutating_op(backend):
    """make_fx / torch.compile trace the cached call as posenc_fast::qkv_proj_cached,
    which mutates the caches; compiled and eager give the same caches."""
    H, D, cfg = CONFIGS["half_no_norm"]
    x, w, b, kw = _inputs(2, H, D, cfg, torch.float32, seed=7)
    xs, skw = x[:, 1:5], _scale_kw(kw, 1, 4)
    coords, freqs = skw.pop("coords"), skw.pop("freqs")

    def f(xs, w, b, coords, freqs, kc, vc):
        q, k, v = pf.qkv_proj(xs, w, b, coords=coords, freqs=freqs, kv_cache=(kc, vc), cache_start=1,
                              backend=backend, **skw)
        return q * 2, k.sum(), v.sum()

    caches = [torch.zeros(2, H, L, D, device=DEVICE) for _ in range(6)]
    args = (xs, w, b, coords, freqs)
    with torch.no_grad():
        want = f(*args, caches[0], caches[1])
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args, caches[2], caches[3])
        gm = make_fx(f, tracing_mode="fake")(*args, caches[4], caches[5])
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_)
    torch.testing.assert_close(caches[2], caches[0])
    torch.testing.assert_close(caches[3], caches[1])
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    if backend == "reference":
        assert "posenc_fast.qkv_proj_cached.default" not in targets
    else:
        assert "posenc_fast.qkv_proj_cached.default" in targets, targets


def _ok():
    H, D, cfg = CONFIGS["var"]
    x, w, b, kw = _inputs(2, H, D, cfg, torch.float32, seed=9)
    kc, vc = torch.zeros(2, H, L, D, device=DEVICE), torch.zeros(2, H, L, D, device=DEVICE)
    return x[:, :4], w, b, kw, kc, vc


@pytest.mark.parametrize("change,exc,msg", [
    (lambda a: a.update(kv_cache=a["kv_cache"][0]), TypeError, r"kv_cache must be a \(k_cache, v_cache\) pair"),
    (lambda a: a.update(kv_cache=(a["kv_cache"][0], None)), TypeError, "v_cache must be a tensor"),
    (lambda a: a.update(kv_cache=(a["kv_cache"][0], a["kv_cache"][1].half())), TypeError,
     "v_cache has dtype float16 but the outputs are float32"),
    (lambda a: a.update(kv_cache=(a["kv_cache"][0][0], a["kv_cache"][1])), ValueError,
     "k_cache must have 4 dimensions"),
    (lambda a: a.update(kv_cache=(a["kv_cache"][0][:1], a["kv_cache"][1])), ValueError,
     r"k_cache must have shape \(B, H, L_max, D\) = \(2, 3, L_max, 64\)"),
    (lambda a: a.update(kv_cache=(a["kv_cache"][0], a["kv_cache"][1][..., :32])), ValueError,
     r"v_cache must have shape \(B, H, L_max, D\)"),
    (lambda a: a.update(cache_start=11), ValueError, r"L_max = 14 rows, but cache_start \+ n = 11 \+ 4 = 15"),
    (lambda a: a.update(cache_start=-1), ValueError, "cache_start must be >= 0"),
    (lambda a: a.update(cache_start=1.0), TypeError, "cache_start must be an int"),
    (lambda a: a.update(kv_cache=None, cache_start=3), ValueError, "cache_start = 3 is given without kv_cache"),
    (lambda a: a.update(kv_cache=(a["kv_cache"][0].transpose(2, 3).contiguous().transpose(2, 3),
                                  a["kv_cache"][1])), ValueError, r"k_cache must have contiguous head rows"),
    (lambda a: a.update(kv_cache=(a["kv_cache"][0].transpose(1, 2).contiguous().transpose(1, 2),
                                  a["kv_cache"][1])), ValueError, "k_cache and v_cache must have the same strides"),
    (lambda a: a.update(kv_cache=(a["kv_cache"][0][:, :1].expand(2, 3, 14, 64), a["kv_cache"][1])), ValueError,
     "k_cache is written in place but more than one of its elements"),
    (lambda a: a.update(kv_cache=(a["kv_cache"][0], a["kv_cache"][0])), ValueError,
     "k_cache and kv_cache v_cache are the same tensor"),
    (lambda a: a.update(kv_cache=(a["kv_cache"][0], a["kv_cache"][1].to("meta"))), ValueError,
     "v_cache is on meta but x is on"),
], ids=["not-a-pair", "none", "dtype", "ndim", "batch", "head-dim", "overflow", "negative-start", "float-start",
        "start-without-cache", "strided-rows", "different-layouts", "expanded", "same-tensor", "device"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_caches_raise_clear_errors(backend, change, exc, msg):
    x, w, b, kw, kc, vc = _ok()
    args = dict(kw, kv_cache=(kc, vc), cache_start=0, backend=backend)
    change(args)
    with torch.no_grad(), pytest.raises(exc, match=msg):
        pf.qkv_proj(x, w, b, **args)
    assert not kc.any() and not vc.any()  # nothing was written


@pytest.mark.parametrize("needs_grad", ["x", "weight", "q_scale", "k_cache"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_through_the_cache_is_refused(backend, needs_grad):
    x, w, b, kw, kc, vc = _ok()
    tensors = dict(x=x, weight=w, q_scale=kw["q_scale"], k_cache=kc)
    tensors[needs_grad] = tensors[needs_grad].clone().requires_grad_()
    kw = dict(kw, q_scale=tensors["q_scale"])
    call = lambda: pf.qkv_proj(tensors["x"], tensors["weight"], b, kv_cache=(tensors["k_cache"], vc),  # noqa: E731
                               backend=backend, **kw)
    with pytest.raises(RuntimeError, match=f"kv_cache is for sampling and has no backward, but .*{needs_grad}"):
        call()
    with torch.no_grad():  # sampling: fine
        call()


def test_the_plan_cache_does_not_hide_a_bad_window_or_overlap():
    """cache_start and strides are part of the cached signature; addresses and grad
    mode are checked on every call."""
    x, w, b, kw, kc, vc = _ok()
    with torch.no_grad():
        pf.qkv_proj(x, w, b, kv_cache=(kc, vc), cache_start=10, **kw)  # 10 + 4 = 14 rows: fits
        with pytest.raises(ValueError, match="exceeds it"):
            pf.qkv_proj(x, w, b, kv_cache=(kc, vc), cache_start=11, **kw)
        with pytest.raises(ValueError, match="same tensor"):
            pf.qkv_proj(x, w, b, kv_cache=(kc, kc), cache_start=10, **kw)
    with pytest.raises(RuntimeError, match="no backward"):
        pf.qkv_proj(x.requires_grad_(), w, b, kv_cache=(kc, vc), cache_start=10, **kw)


def test_the_fast_path_skips_the_custom_op(monkeypatch):
    backend = fast_backends()[0] if fast_backends() else pytest.skip("no fast backend runs here")
    x, w, b, kw, kc, vc = _ok()
    with torch.no_grad():
        want = pf.qkv_proj(x, w, b, kv_cache=(kc.clone(), vc.clone()), backend=backend, **kw)

        def boom(*a, **k):
            raise AssertionError("the eager fast path went through the torch.library custom op")

        monkeypatch.setattr(qkv_ops, "_cached_op", boom)
        got = pf.qkv_proj(x, w, b, kv_cache=(kc, vc), backend=backend, **kw)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)


def test_the_benchmark_counts_the_cat_copies_exactly():
    """bench/kv_cache.py's counter on a tiny pyramid: the cat path reads the old cache
    and the new rows and writes the new cache, for k and v, at every scale after the
    first; the fused path copies nothing and peaks lower."""
    pytest.importorskip("triton")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import kv_cache as bench
    from launch_stubs import stubbed_device_work

    C, H, rows, depth = 64, 2, 3, 2
    ends = [sum(p * p for p in PN[:i + 1]) for i in range(len(PN))]
    layers = [bench.FusedSelfAttention(C, H, backend="triton").to(torch.bfloat16).eval() for _ in range(depth)]
    xs = [torch.randn(rows, p * p, C, dtype=torch.bfloat16) for p in PN]
    with torch.no_grad(), stubbed_device_work():
        cat = bench.count(layers, xs, L, "cat")
        fused = bench.count(layers, xs, L, "fused")
    row_bytes = rows * C * 2  # one token of k (or v) over all heads, bf16
    want = depth * 2 * sum(2 * e for e in ends[1:]) * row_bytes  # read (old + new) + write (old + new)
    assert cat["copied_bytes"] == want
    assert fused["copied_bytes"] == 0
    assert fused["peak_bytes"] < cat["peak_bytes"]
    assert fused["peak_bytes"] >= depth * 2 * L * row_bytes  # the caches themselves
