"""A small VAR-shaped model for the integration tests and the end-to-end benchmark.

The tests must not import FoundationVision/VAR, so this file re-states its model from
SPEC §2.1-2.2 with the same attribute names, shapes and call conventions as the public
``VAR`` class (``class_emb``, ``pos_start``, ``pos_1LC``, ``lvl_embed``, ``lvl_1L``,
``attn_bias_for_masking``, adaLN blocks whose ``.attn`` holds ``mat_qkv``, ``q_bias``,
``v_bias``, ``zero_k_bias``, ``scale_mul_1H11``, ``proj``, and a KV cache), so that
``patch_var`` recognises it and must reproduce it exactly. Attention is the eager
path VAR takes without flash-attn / xformers: (B, H, L, D) tensors and
``scaled_dot_product_attention`` with the block-causal additive mask.

``infinity_rope_cache`` / ``infinity_style_attention`` are the eager attention of the
text-conditional descendants (Infinity: l2 norm, per-head scale, then an interleaved
axial 2D rotation from a precomputed fp32 cos/sin table), the baseline of the fused
module with RoPE.

The VQ-VAE is a stand-in: a codebook, VAR's residual pyramid update (upsample the
sampled codes to the final grid, accumulate, resample for the next scale) and a
1x1-conv "decoder". It has no parameters that the tests compare.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

PATCH_NUMS = (1, 2, 3)


class TinyQuantizer(nn.Module):
    """Codebook plus the scale-by-scale accumulation of VAR's VectorQuantizer2."""

    def __init__(self, vocab_size: int, Cvae: int, patch_nums: Sequence[int]):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.v_patch_nums = tuple(patch_nums)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor):
        final = self.v_patch_nums[-1]
        if si == SN - 1:
            f_hat.add_(h_BChw)
            return f_hat, f_hat
        f_hat.add_(F.interpolate(h_BChw, size=(final, final), mode="bilinear", align_corners=False))
        nxt = self.v_patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")


class TinyVQVAE(nn.Module):
    def __init__(self, vocab_size: int = 48, Cvae: int = 8, patch_nums: Sequence[int] = PATCH_NUMS):
        super().__init__()
        self.Cvae, self.vocab_size = Cvae, vocab_size
        self.quantize = TinyQuantizer(vocab_size, Cvae, patch_nums)
        self.decoder = nn.Conv2d(Cvae, 3, kernel_size=1)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(f_hat).clamp_(-1, 1)


class SelfAttention(nn.Module):
    """VAR attention (SPEC §2.2): q/v bias, zero k bias, optional l2 norm of q and k
    with a clamped per-head scale, block-causal mask in training, KV cache in sampling."""

    def __init__(self, block_idx: int, embed_dim: int, num_heads: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_l2_norm: bool = False):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100)).item()
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop, inplace=True) if proj_drop > 0 else nn.Identity()
        self.attn_drop: float = attn_drop
        self.using_flash = self.using_xform = False
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool):
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
        if self.attn_l2_norm:
            gain = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1) * gain
            k = F.normalize(k, dim=-1)
        if self.caching:  # sampling: this scale's queries see every cached (coarser) key
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        p = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, C)
        self.drop = nn.Dropout(drop, inplace=True) if drop > 0 else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gates come from the class condition."""

    def __init__(self, block_idx: int, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float,
                 drop: float, attn_drop: float, attn_l2_norm: bool, norm_eps: float):
        super().__init__()
        self.block_idx, self.C, self.D = block_idx, embed_dim, cond_dim
        self.drop_path = nn.Identity()
        self.attn = SelfAttention(block_idx, embed_dim, num_heads, attn_drop=attn_drop, proj_drop=drop,
                                  attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = False
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))
        self.fused_add_norm_fn = None

    def forward(self, x, cond_BD, attn_bias):
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add_(b1), attn_bias=attn_bias).mul_(g1))
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add_(b2)).mul(g2))
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class VARShaped(nn.Module):
    """Class-conditional VAR (SPEC §2.1) with VAR's attribute names and methods."""

    def __init__(self, vae: TinyVQVAE, num_classes: int = 10, depth: int = 2, embed_dim: int = 96,
                 num_heads: int = 3, mlp_ratio: float = 2.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, norm_eps: float = 1e-6, cond_drop_rate: float = 0.1,
                 attn_l2_norm: bool = True, patch_nums: Sequence[int] = PATCH_NUMS):
        super().__init__()
        self.Cvae, self.V = vae.Cvae, vae.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.cond_drop_rate = cond_drop_rate
        self.prog_si = -1
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        end = 0
        for pn in self.patch_nums:
            self.begin_ends.append((end, end + pn * pn))
            end += pn * pn
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        # Tuples keep the VAE out of the module tree (and out of state_dict), as VAR does.
        self.vae_proxy = (vae,)
        self.vae_quant_proxy = (vae.quantize,)

        init_std = math.sqrt(1 / embed_dim / 3)
        self.word_embed = nn.Linear(self.Cvae, embed_dim)
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)  # the last row is the CFG "no class"
        self.pos_start = nn.Parameter(torch.randn(1, self.first_l, embed_dim) * init_std)
        self.pos_1LC = nn.Parameter(torch.randn(1, self.L, embed_dim) * init_std)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), embed_dim)
        self.shared_ada_lin = nn.Identity()
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(i, embed_dim, self.D, num_heads, mlp_ratio, drop_rate, attn_drop_rate, attn_l2_norm, norm_eps)
            for i in range(depth)
        ])
        level = torch.cat([torch.full((pn * pn,), s) for s, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        self.register_buffer("lvl_1L", level[:, :, 0].contiguous())
        mask = torch.where(level >= level.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())
        self.head_nm = AdaLNBeforeHead(embed_dim, self.D, norm_eps)
        self.head = nn.Linear(embed_dim, self.V)

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        bg, ed = self.begin_ends[self.prog_si] if self.prog_si >= 0 else (0, self.L)
        B = x_BLCv_wo_first_l.shape[0]
        with torch.autocast("cuda", enabled=False):  # embeddings stay fp32 under AMP
            label_B = torch.where(torch.rand(B, device=label_B.device) < self.cond_drop_rate, self.num_classes, label_B)
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            if self.prog_si == 0:
                x_BLC = sos
            else:
                x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC += self.lvl_embed(self.lvl_1L[:, :ed].expand(B, -1)) + self.pos_1LC[:, :ed]
        attn_bias = self.attn_bias_for_masking[:, :, :ed, :ed]
        cond = self.shared_ada_lin(cond_BD)
        probe = x_BLC.new_ones(8, 8)
        main_type = torch.matmul(probe, probe).dtype  # the autocast dtype, if any
        x_BLC, cond, attn_bias = x_BLC.to(main_type), cond.to(main_type), attn_bias.to(main_type)
        for b in self.blocks:
            x_BLC = b(x=x_BLC, cond_BD=cond, attn_bias=attn_bias)
        logits = self.get_logits(x_BLC.float(), cond_BD)
        if self.prog_si == 0:  # keep word_embed in the graph when only the first scale trains
            logits[0, 0, 0] += self.word_embed.weight[0, 0] * 0 + self.word_embed.bias[0] * 0
        return logits

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B: int, label_B: Optional[Union[int, torch.LongTensor]],
                                 g_seed: Optional[int] = None, cfg: float = 1.5, top_k: int = 0,
                                 top_p: float = 0.0, more_smooth: bool = False) -> torch.Tensor:
        """Scale-by-scale sampling with a KV cache and classifier-free guidance (the batch
        is doubled: conditional rows first, then the "no class" rows)."""
        device = self.lvl_1L.device
        rng = None
        if g_seed is not None:
            rng = torch.Generator(device=device)
            rng.manual_seed(g_seed)
        if label_B is None:
            label_B = torch.randint(0, self.num_classes, (B,), device=device, generator=rng)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B, device=device)
        sos = cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        next_map = (sos.unsqueeze(1).expand(2 * B, self.first_l, -1)
                    + self.pos_start.expand(2 * B, self.first_l, -1) + lvl_pos[:, :self.first_l])
        quant = self.vae_quant_proxy[0]
        f_hat = sos.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        cur_L = 0
        for b in self.blocks:
            b.attn.kv_caching(True)
        for si, pn in enumerate(self.patch_nums):
            ratio = si / self.num_stages_minus_1
            cur_L += pn * pn
            cond = self.shared_ada_lin(cond_BD)
            x = next_map
            for b in self.blocks:
                x = b(x=x, cond_BD=cond, attn_bias=None)
            logits = self.get_logits(x, cond_BD)
            t = cfg * ratio
            logits = (1 + t) * logits[:B] - t * logits[B:]
            if top_k > 0:
                kth = logits.topk(top_k, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, -torch.inf)
            idx_Bl = torch.multinomial(logits.softmax(-1).view(-1, self.V), 1, generator=rng).view(B, pn * pn)
            h_BChw = quant.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, next_map = quant.get_next_autoregressive_input(si, len(self.patch_nums), f_hat, h_BChw)
            if si != self.num_stages_minus_1:
                next_map = next_map.view(B, self.Cvae, -1).transpose(1, 2)
                next_map = self.word_embed(next_map) + lvl_pos[:, cur_L:cur_L + self.patch_nums[si + 1] ** 2]
                next_map = next_map.repeat(2, 1, 1)
        for b in self.blocks:
            b.attn.kv_caching(False)
        return self.vae_proxy[0].fhat_to_img(f_hat).add_(1).mul_(0.5)


def build_var_shaped(*, depth: int = 2, embed_dim: int = 96, num_heads: int = 3, attn_l2_norm: bool = True,
                     patch_nums: Sequence[int] = PATCH_NUMS, num_classes: int = 10, vocab_size: int = 48,
                     Cvae: int = 8, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                     cond_drop_rate: float = 0.1, mlp_ratio: float = 2.0, seed: int = 0,
                     device: Union[str, torch.device] = "cpu") -> VARShaped:
    """A VARShaped model whose every parameter is random (no zero biases, adaLN gates
    of order 1), so that each parameter reaches the loss with a non-trivial gradient.
    With l2 norm, the last head's scale_mul lies above ln 100 to exercise the clamp."""
    gen = torch.Generator().manual_seed(seed)
    vae = TinyVQVAE(vocab_size, Cvae, patch_nums)
    model = VARShaped(vae, num_classes=num_classes, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                      mlp_ratio=mlp_ratio, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                      cond_drop_rate=cond_drop_rate, attn_l2_norm=attn_l2_norm, patch_nums=patch_nums)
    with torch.no_grad():
        for module in (model, vae):
            for name, p in module.named_parameters():
                fan_in = p.shape[-1] if p.dim() > 1 else embed_dim
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        for b in model.blocks:
            if attn_l2_norm:
                h = num_heads
                b.attn.scale_mul_1H11.copy_(torch.linspace(0.5, 5.0, h).view(1, h, 1, 1))
    return model.to(device)


def infinity_rope_cache(head_dim: int, patch_nums: Sequence[int], base: float = 10000.0):
    """fp32 (cos, sin), each (L, D/2): pairs [0, D/4) rotate with the row, [D/4, D/2)
    with the column; coordinates of coarse scales are mapped onto the finest grid
    with ``round(r * fp32(final / pn))`` (Infinity's shipped mode)."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2).float() / half))  # D/4 values, base^(-4j/D)
    final = patch_nums[-1]
    coords = []
    for pn in patch_nums:
        r = torch.round(torch.arange(pn).float() * torch.tensor(final / pn, dtype=torch.float32))
        coords.append(torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 2))
    coords = torch.cat(coords)
    angles = torch.cat([coords[:, :1] * inv_freq, coords[:, 1:] * inv_freq], dim=-1)
    return angles.cos(), angles.sin()


def infinity_style_attention(attn: nn.Module, x: torch.Tensor, attn_bias: Optional[torch.Tensor],
                             cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eager cosine attention with 2D RoPE using the parameters of ``attn`` (VAR names)."""
    B, n, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    qkv = F.linear(x, attn.mat_qkv.weight, torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias)))
    q, k, v = qkv.view(B, n, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    q = F.normalize(q, dim=-1) * attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp()
    k = F.normalize(k, dim=-1)
    with torch.autocast(x.device.type, enabled=False):
        def rotate(t):
            t0, t1 = t.float()[..., 0::2], t.float()[..., 1::2]
            return torch.stack([t0 * cos - t1 * sin, t0 * sin + t1 * cos], dim=-1).flatten(-2)

        q, k = rotate(q), rotate(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=attn.scale)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, n, C)))
