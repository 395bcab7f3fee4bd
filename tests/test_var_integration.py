"""patch_var / unpatch_var on a VAR-shaped model (tests/var_model.py): the patched
model must give the unpatched model's logits, gradients and sampled tokens, keep its
state, and use the fused ops it claims to use."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import posenc_fast.nn.attention as attention_mod
from conftest import DEVICE, fast_backends
from posenc_fast.integrations import var as pvar
from posenc_fast.integrations.var import is_patched, patch_var, unpatch_var
from var_model import SelfAttention, build_var_shaped

BACKENDS = ["reference"] + fast_backends()  # the tests run on DEVICE: CUDA when there is one
# C = 96 (not a power of two) with VAR's default l2-norm attention; C = 64 with the
# 0.25 / sqrt(D) score scale.
CONFIGS = {
    "l2norm_C96_H3": dict(embed_dim=96, num_heads=3, attn_l2_norm=True),
    "plain_C64_H2": dict(embed_dim=64, num_heads=2, attn_l2_norm=False),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make_pair(backend="reference", device=DEVICE, **kw):
    """(unpatched, patched) copies of one random VAR-shaped model."""
    ref = build_var_shaped(device=device, **kw)
    fast = patch_var(copy.deepcopy(ref), backend=backend)
    return ref, fast


def teacher_inputs(model, B=3, seed=1, ed=None):
    g = torch.Generator().manual_seed(seed)
    ed = model.L if ed is None else ed
    device = model.pos_1LC.device
    label = torch.randint(0, model.num_classes, (B,), generator=g).to(device)
    x = torch.randn(B, ed - model.first_l, model.Cvae, generator=g).to(device)
    return label, x


def run_step(model, label, x, weight, seed=123):
    """Forward + backward of a fixed random linear loss; the seed fixes VAR's label dropout."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(label, x)
    (logits * weight).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def spies(monkeypatch):
    """Counts the fused-op calls and records their backend and input shapes."""
    calls = {"pyramid": [], "qkv": []}
    real_pyr, real_qkv = pvar.pyramid_pos_level_add, attention_mod.qkv_proj

    def pyr(x, *a, **kw):
        calls["pyramid"].append((tuple(x.shape), kw.get("backend")))
        return real_pyr(x, *a, **kw)

    def qkv(x, *a, **kw):
        calls["qkv"].append((tuple(x.shape), kw.get("backend")))
        return real_qkv(x, *a, **kw)

    monkeypatch.setattr(pvar, "pyramid_pos_level_add", pyr)
    monkeypatch.setattr(attention_mod, "qkv_proj", qkv)
    return calls


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_grads_match(backend, cfg, spies):
    ref, fast = make_pair(backend, cond_drop_rate=0.5, **CONFIGS[cfg])
    label, x = teacher_inputs(ref)
    weight = torch.randn(label.shape[0], ref.L, ref.V, device=DEVICE)
    out_ref, g_ref = run_step(ref, label, x, weight)
    out_fast, g_fast = run_step(fast, label, x, weight)
    assert rel_err(out_fast, out_ref) <= 1e-5
    assert g_ref.keys() == g_fast.keys()
    for name in g_ref:
        assert rel_err(g_fast[name], g_ref[name]) <= 1e-4, name
    # The patched model really ran the fused ops, with the backend it was given.
    assert spies["pyramid"] == [((3, ref.L, ref.C), backend)]
    assert spies["qkv"] == [((3, ref.L, ref.C), backend)] * ref.depth


@pytest.mark.parametrize("prog_si", [0, 1])
def test_progressive_training_matches(prog_si):
    ref, fast = make_pair(**CONFIGS["l2norm_C96_H3"])
    ref.prog_si = fast.prog_si = prog_si
    ed = ref.begin_ends[prog_si][1]
    label, x = teacher_inputs(ref, ed=max(ed, ref.first_l))
    weight = torch.randn(label.shape[0], ed, ref.V, device=DEVICE)
    out_ref, g_ref = run_step(ref, label, x, weight)
    out_fast, g_fast = run_step(fast, label, x, weight)
    assert out_fast.shape == (label.shape[0], ed, ref.V)
    assert rel_err(out_fast, out_ref) <= 1e-5
    for name in g_ref:
        assert rel_err(g_fast[name], g_ref[name]) <= 1e-4, name


def test_wrong_token_count_is_an_error():
    _, fast = make_pair(**CONFIGS["plain_C64_H2"])
    label, x = teacher_inputs(fast)
    with pytest.raises(ValueError, match="tokens"):
        fast(label, x[:, :-1])


def test_dropout_in_training_is_kept():
    """Same seed, same dropout masks: the patched model applies the model's own
    attention and projection dropout exactly where the original does."""
    ref, fast = make_pair(drop_rate=0.2, attn_drop_rate=0.3, **CONFIGS["l2norm_C96_H3"])
    ref.train(), fast.train()
    label, x = teacher_inputs(ref)
    weight = torch.randn(label.shape[0], ref.L, ref.V, device=DEVICE)
    out_ref, g_ref = run_step(ref, label, x, weight)
    out_fast, g_fast = run_step(fast, label, x, weight)
    assert rel_err(out_fast, out_ref) <= 1e-5
    for name in g_ref:
        assert rel_err(g_fast[name], g_ref[name]) <= 1e-4, name
    torch.manual_seed(5)
    out_other = fast(label, x)
    assert rel_err(out_other, out_fast) > 1e-3  # dropout is active: another seed differs


def sample_tokens(model, B=2, **kw):
    tokens = []
    hook = model.vae_quant_proxy[0].embedding.register_forward_hook(lambda m, inp, out: tokens.append(inp[0].clone()))
    try:
        img = model.autoregressive_infer_cfg(B, kw.pop("label_B", 3), **kw)
    finally:
        hook.remove()
    return tokens, img


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cached_sampling_same_tokens(backend, cfg, spies):
    ref, fast = make_pair(backend, **CONFIGS[cfg])
    ref.eval(), fast.eval()
    B = 2
    tok_ref, img_ref = sample_tokens(ref, B, g_seed=11, cfg=1.5, top_k=8)
    tok_fast, img_fast = sample_tokens(fast, B, g_seed=11, cfg=1.5, top_k=8)
    assert len(tok_ref) == len(ref.patch_nums)
    for a, b in zip(tok_ref, tok_fast):
        assert torch.equal(a, b)
    assert rel_err(img_fast, img_ref) <= 1e-5
    # Scale by scale: the CFG-doubled batch and only the current scale's tokens.
    expected = [((2 * B, pn * pn, ref.C), backend) for pn in ref.patch_nums for _ in range(ref.depth)]
    assert spies["qkv"] == expected
    for b in fast.blocks:
        assert not b.attn.caching and b.attn.cached_k is None and b.attn.cached_v is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_appends_to_one_cache_per_run_without_cat(backend, monkeypatch):
    """Patched sampling: each block's (B, H, L, D) cache pair is allocated at the first
    scale and written in place at every scale (cached_k / cached_v are its views, at
    the same addresses), no 4-D torch.cat runs (unpatched VAR runs 2 per block and
    scale after the first), and kv_caching(False) frees the cache."""
    ref, fast = make_pair(backend, **CONFIGS["l2norm_C96_H3"])
    ref.eval(), fast.eval()
    cats = []
    real_cat = torch.cat

    def cat(tensors, *a, **kw):
        cats.append(tuple(t.dim() for t in tensors))
        return real_cat(tensors, *a, **kw)

    monkeypatch.setattr(torch, "cat", cat)
    seen = []

    def hook(attn, inputs, out):
        kc, vc = attn.__dict__[attention_mod.KV_CACHE]
        seen.append((attn, kc, vc, attn.cached_k, attn.cached_v))

    hooks = [b.attn.register_forward_hook(hook) for b in fast.blocks]
    tok_fast, _ = sample_tokens(fast, 2, g_seed=5, cfg=1.5, top_k=8)
    for h in hooks:
        h.remove()
    assert not any(dims == (4, 4) for dims in cats), cats
    cats.clear()
    tok_ref, _ = sample_tokens(ref, 2, g_seed=5, cfg=1.5, top_k=8)
    S = len(ref.patch_nums)
    assert sum(dims == (4, 4) for dims in cats) == 2 * ref.depth * (S - 1)  # the spy sees VAR's cats
    assert all(torch.equal(a, b) for a, b in zip(tok_fast, tok_ref))
    ends = [sum(pn * pn for pn in ref.patch_nums[:i + 1]) for i in range(S)]
    for i, b in enumerate(fast.blocks):
        rows = [r for r in seen if r[0] is b.attn]
        assert len(rows) == S
        first_k, first_v = rows[0][1], rows[0][2]
        assert first_k.shape == (4, b.attn.num_heads, ref.L, b.attn.head_dim)
        for (_, kc, vc, k, v), end in zip(rows, ends):
            assert kc is first_k and vc is first_v  # allocated once per run
            assert k.data_ptr() == kc.data_ptr() and v.data_ptr() == vc.data_ptr() and k.shape[2] == end
        assert attention_mod.KV_CACHE not in b.attn.__dict__  # kv_caching(False) freed it


def test_sampling_with_a_gradient_is_refused():
    """The cache has no backward: caching with grad mode on and trainable weights is
    a clear error, not a silently detached graph."""
    _, fast = make_pair(**CONFIGS["l2norm_C96_H3"])
    attn = fast.blocks[0].attn
    attn.kv_caching(True)
    with pytest.raises(RuntimeError, match="kv_cache is for sampling and has no backward"):
        attn(torch.randn(2, 1, fast.C, device=DEVICE), None)
    attn.kv_caching(False)


def test_caching_without_a_cache_length_is_a_clear_error():
    """self_attention_forward on a VAR attention that patch_var did not set up has no
    cache length to allocate: a ValueError that says how to get one."""
    model = build_var_shaped(**CONFIGS["plain_C64_H2"])
    attn = model.blocks[0].attn
    attn.kv_caching(True)
    with torch.no_grad(), pytest.raises(ValueError, match="needs the cache length: patch the model with patch_var"):
        attention_mod.self_attention_forward(attn, torch.randn(2, 1, model.C), None)


def test_sampling_with_random_labels_and_other_seed_differs():
    ref, fast = make_pair(**CONFIGS["l2norm_C96_H3"])
    ref.eval(), fast.eval()
    tok_ref, _ = sample_tokens(ref, 3, label_B=None, g_seed=4)
    tok_fast, _ = sample_tokens(fast, 3, label_B=None, g_seed=4)
    assert all(torch.equal(a, b) for a, b in zip(tok_ref, tok_fast))
    tok_other, _ = sample_tokens(fast, 3, label_B=None, g_seed=5)
    assert not all(torch.equal(a, b) for a, b in zip(tok_fast, tok_other))


def test_state_is_untouched():
    model = build_var_shaped(**CONFIGS["l2norm_C96_H3"], drop_rate=0.1, attn_drop_rate=0.2)
    model.eval()
    sd_before = model.state_dict()
    params_before = dict(model.named_parameters())
    buffers_before = dict(model.named_buffers())
    modules_before = dict(model.named_modules())
    drops = [(b.attn.attn_drop, b.attn.proj_drop) for b in model.blocks]
    patch_var(model)
    sd_after = model.state_dict()
    assert list(sd_after) == list(sd_before)
    for k in sd_before:
        assert sd_after[k].data_ptr() == sd_before[k].data_ptr() and torch.equal(sd_after[k], sd_before[k])
    assert dict(model.named_parameters()) == params_before
    assert dict(model.named_buffers()) == buffers_before
    assert dict(model.named_modules()) == modules_before
    assert [(b.attn.attn_drop, b.attn.proj_drop) for b in model.blocks] == drops
    assert not model.training and not any(m.training for m in model.modules())
    assert type(model).__name__ == "VARShaped" and type(model.blocks[0].attn) is SelfAttention
    # A checkpoint of another (unpatched) model loads strictly and drives the outputs.
    other = build_var_shaped(**CONFIGS["l2norm_C96_H3"], seed=9)
    model.load_state_dict(other.state_dict())
    label, x = teacher_inputs(model)
    other.eval()
    torch.manual_seed(0)
    want = other(label, x)
    torch.manual_seed(0)
    assert rel_err(model(label, x), want) <= 1e-5
    model.train()
    assert all(m.training for m in model.modules())


def test_unpatch_restores_original_methods():
    ref, fast = make_pair(**CONFIGS["l2norm_C96_H3"])
    assert is_patched(fast) and not is_patched(ref)
    assert "forward" in fast.__dict__ and all("forward" in b.attn.__dict__ for b in fast.blocks)
    assert unpatch_var(fast) is fast
    assert not is_patched(fast)
    assert "forward" not in fast.__dict__ and not any("forward" in b.attn.__dict__ for b in fast.blocks)
    assert not any(k in b.attn.__dict__ for b in fast.blocks
                   for k in ("kv_caching", attention_mod.KV_CACHE, attention_mod.KV_LEN))
    label, x = teacher_inputs(ref)
    torch.manual_seed(0)
    want = ref(label, x)
    torch.manual_seed(0)
    assert torch.equal(fast(label, x), want)  # bit-equal: the original code runs again
    with pytest.raises(ValueError, match="not patched"):
        unpatch_var(fast)


def test_unpatch_restores_a_previous_instance_override():
    model = build_var_shaped(**CONFIGS["plain_C64_H2"])
    attn = model.blocks[0].attn
    custom = attn.forward  # e.g. another tool's wrapper bound on the instance
    attn.forward = custom
    patch_var(model)
    assert attn.forward is not custom
    unpatch_var(model)
    assert attn.__dict__["forward"] is custom


def test_repatch_changes_backend_only(spies):
    ref, fast = make_pair("reference", **CONFIGS["plain_C64_H2"])
    patch_var(fast, backend="auto")
    label, x = teacher_inputs(ref)
    fast(label, x)
    assert {b for _, b in spies["pyramid"] + spies["qkv"]} == {"auto"}
    unpatch_var(fast)  # one unpatch undoes both patches
    assert "forward" not in fast.__dict__


def test_deepcopy_of_patched_model_is_patched_independently():
    _, fast = make_pair(**CONFIGS["l2norm_C96_H3"])
    twin = copy.deepcopy(fast)
    assert twin.forward.__self__ is twin
    assert all(b.attn.forward.__self__ is b.attn for b in twin.blocks)
    unpatch_var(twin)
    assert is_patched(fast) and "forward" not in twin.blocks[0].attn.__dict__


def test_rejects_models_it_does_not_recognise():
    with pytest.raises(TypeError, match="not an nn.Module"):
        patch_var(object())
    with pytest.raises(TypeError, match="missing attribute"):
        patch_var(nn.Linear(4, 4))
    model = build_var_shaped(**CONFIGS["plain_C64_H2"])
    model.blocks[1].attn = nn.Identity()
    with pytest.raises(TypeError, match=r"blocks\[1\]\.attn is missing attribute\(s\) mat_qkv"):
        patch_var(model)
    assert not is_patched(model) and "forward" not in model.__dict__  # nothing half-patched
    model = build_var_shaped(**CONFIGS["l2norm_C96_H3"])
    del model.blocks[0].attn.scale_mul_1H11
    with pytest.raises(TypeError, match="scale_mul_1H11"):
        patch_var(model)
    model = build_var_shaped(**CONFIGS["plain_C64_H2"])
    model.lvl_embed = nn.Embedding(len(model.patch_nums) + 1, model.C)
    with pytest.raises(TypeError, match="lvl_embed.weight"):
        patch_var(model)
    with pytest.raises(ValueError, match="backend"):
        patch_var(build_var_shaped(**CONFIGS["plain_C64_H2"]), backend="fastest")


@pytest.mark.parametrize("l2", [True, False])
def test_test_model_attention_is_spec_2_2(l2):
    """The model the patch is compared with computes SPEC §2.2 (checked in float64)."""
    torch.manual_seed(0)
    attn = SelfAttention(0, 48, 3, attn_l2_norm=l2).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if l2:
            attn.scale_mul_1H11.copy_(torch.tensor([0.3, 2.0, 6.0]).view(1, 3, 1, 1))
    model = build_var_shaped()
    mask = model.attn_bias_for_masking.double()
    x = torch.randn(2, model.L, 48, dtype=torch.float64)
    W = attn.mat_qkv.weight
    qkv = x @ W.T + torch.cat((attn.q_bias, torch.zeros(48, dtype=torch.float64), attn.v_bias))
    q, k, v = (t.view(2, model.L, 3, 16).transpose(1, 2) for t in qkv.split(48, dim=-1))
    if l2:
        gain = torch.exp(torch.clamp(attn.scale_mul_1H11.view(3, 1, 1), max=torch.log(torch.tensor(100.0)).item()))
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12) * gain
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        s = q @ k.transpose(-1, -2)
    else:
        s = q @ k.transpose(-1, -2) * (0.25 / 16 ** 0.5)
    o = torch.softmax(s + mask[0], dim=-1) @ v
    want = F.linear(o.transpose(1, 2).reshape(2, model.L, 48), attn.proj.weight, attn.proj.bias)
    assert torch.allclose(attn(x, mask), want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_patched_model_matches(backend):
    ref, fast = make_pair(backend, **CONFIGS["plain_C64_H2"])
    ref.eval(), fast.eval()
    label, x = teacher_inputs(ref)
    compiled = torch.compile(fast, backend="aot_eager")
    torch.manual_seed(0)
    want = ref(label, x)
    torch.manual_seed(0)
    assert rel_err(compiled(label, x), want) <= 1e-5


def norm_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_autocast_on_gpu_is_as_accurate_as_unpatched(dtype, cfg):
    """Under autocast both models round differently; measured against the fp32 run,
    the patched model's error must be of the unpatched model's own size. (The
    gradients of l2-norm attention are noisy in bf16 for both: e.g. scale_mul_1H11
    has a few cancelling entries, hence the absolute slack.)"""
    ref, fast = make_pair("auto", device="cuda", **CONFIGS[cfg])
    label, x = teacher_inputs(ref, B=4)
    weight = torch.randn(4, ref.L, ref.V, device="cuda")
    out_32, g_32 = run_step(ref, label, x, weight)
    with torch.autocast("cuda", dtype=dtype):
        out_ref, g_ref = run_step(ref, label, x, weight)
        out_fast, g_fast = run_step(fast, label, x, weight)
    assert out_fast.dtype == out_ref.dtype == torch.float32
    assert norm_err(out_fast, out_32) <= 1.5 * norm_err(out_ref, out_32) + 1e-3
    for name in g_ref:
        assert g_fast[name].dtype == g_ref[name].dtype
        assert norm_err(g_fast[name], g_32[name]) <= 2.5 * norm_err(g_ref[name], g_32[name]) + 0.1, name
    ref.eval(), fast.eval()
    with torch.autocast("cuda", dtype=dtype):
        tok_ref, img_ref = sample_tokens(ref, 2, g_seed=3)
        tok_fast, img_fast = sample_tokens(fast, 2, g_seed=3)
    assert [t.shape for t in tok_fast] == [t.shape for t in tok_ref] and img_fast.shape == img_ref.shape
    assert torch.isfinite(img_fast).all()


def _capture_scales(blocks, static_inputs, cond):
    """The CUDA-graph recipe (README, "Sampling with CUDA graphs"): after an eager
    warm-up run, rewind the caches (kv_caching(True) keeps the buffers) and capture
    one graph per scale of the block stack; replays write the same cache rows."""
    for b in blocks:
        b.attn.kv_caching(True)
    pool = torch.cuda.graph_pool_handle()
    graphs, outs = [], []
    for x in static_inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            h = x
            for b in blocks:
                h = b(x=h, cond_BD=cond, attn_bias=None)
            outs.append(h)
        graphs.append(g)
    return graphs, outs


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_sampling_scales_equal_eager(backend):
    """Patched VAR-shaped blocks captured per scale and replayed over the pyramid on
    new inputs give what eager sampling (patched, and unpatched VAR with its cat
    cache) gives for the same inputs: same logits, hence the same sampled tokens."""
    ref, fast = make_pair(backend, device="cuda", **CONFIGS["l2norm_C96_H3"])
    ref.eval(), fast.eval()
    B = 3
    g = torch.Generator(device="cuda").manual_seed(0)
    cond_BD = torch.randn(B, ref.D, device="cuda", generator=g)

    def inputs():
        return [torch.randn(B, pn * pn, ref.C, device="cuda", generator=g) for pn in ref.patch_nums]

    def eager(model, xs):
        cond = model.shared_ada_lin(cond_BD)
        for b in model.blocks:
            b.attn.kv_caching(True)
        outs = []
        for x in xs:
            for b in model.blocks:
                x = b(x=x, cond_BD=cond, attn_bias=None)
            outs.append(model.get_logits(x, cond_BD))
        return outs

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: autotuning, cuBLAS, the cached q_scale / bias
            eager(fast, inputs())
        torch.cuda.current_stream().wait_stream(side)
        static = [torch.zeros_like(x) for x in inputs()]
        cond = fast.shared_ada_lin(cond_BD)
        graphs, outs = _capture_scales(fast.blocks, static, cond)
        for _ in range(2):  # replays reuse the cache rows run after run
            xs = inputs()
            got = []
            for x, s, graph, out in zip(xs, static, graphs, outs):
                s.copy_(x)
                graph.replay()
                got.append(fast.get_logits(out, cond_BD))
            want_fast, want_ref = eager(fast, xs), eager(ref, xs)
            for a, w, r in zip(got, want_fast, want_ref):
                torch.testing.assert_close(a, w)
                assert rel_err(a, r) <= 1e-4
