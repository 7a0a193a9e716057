"""Transformer over latent tokens: the stage-1 prior and the stage-2 base model.

    out = LatentTransformer(cfg, C)(z (B, C, T', H', W'), logsnr (B,), *, text_emb, text_mask,
                                    label, context, context_mask)          -> (B, C, T', H', W')

Tokens are the T'*H'*W' latent positions in (t, h, w) order (no patching: "patching is
detrimental to the base model", PAPER.md §1). One level is a plain ViT (the prior, 8 x 1024 at
size L); two levels are the paper's 2-stage ViT (base model, [512, 1024] x [6, 16]): half of a
level's blocks run before 2x2 token merging to the next level, half after splitting back, with a
skip connection across. Conditioning: adaLN-Zero (DiT, Peebles & Xie 2023) on an embedding of
logSNR plus a class embedding (null class = index `num_classes`, label -1); text by cross-attention
with a key-padding mask; context frames as extra input channels (context * mask, mask).
All attention goes through `ulvideo.attention.attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ulvideo.attention import (attention, block_causal_mask, check_window, key_padding_mask,
                               trailing_frames_attention)
from ulvideo.config import BaseConfig
from ulvideo.nets.layers import CausalCache, LogSNREmbedding, batch_logsnr, sincos_3d
from ulvideo.nets.sizes import resolve_transformer


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rms(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm with its weight cast to x's dtype (bf16 activations under autocast keep the fused kernel)."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RMS-normalised queries and keys (QK-norm keeps the logits
    bounded in bf16 at large width, as in ViT-22B / SD3)."""

    def __init__(self, dim: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v, each (B, nh, N, hd), queries and keys RMS-normalised."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, N, hd)
        return rms(self.q_norm, q), rms(self.k_norm, k), v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """Attention output (B, nh, N, hd) -> (B, N, D)."""
        B, _, N, _ = o.shape
        return self.dropout(self.proj(o.transpose(1, 2).reshape(B, N, -1)))

    def forward(self, x: torch.Tensor, causal: bool = False, causal_block: int = 1) -> torch.Tensor:
        q, k, v = self.project(x)
        return self.output(attention(q, k, v, causal=causal, causal_block=causal_block))


class CrossAttention(nn.Module):
    """Queries from the tokens, keys/values from the (projected) text; `mask` (B, 1, 1, L) True = valid."""

    def __init__(self, dim: int, context_dim: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        L = context.shape[1]
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        k, v = self.kv(context).view(B, L, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, L, hd)
        o = attention(rms(self.q_norm, q), rms(self.k_norm, k), v, mask=mask)
        return self.dropout(self.proj(o.transpose(1, 2).reshape(B, N, D)))


# Banded attention runs its queries in blocks of at least this many tokens (and at least a window
# of frames): few calls for short clips, and for long ones a mask and a score block per call that
# do not grow with the clip.
BAND_QUERY_TOKENS = 1024


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_tokens: int, window: int,
                     query_frames: int | None = None) -> torch.Tensor:
    """Self-attention over frames (runs of `frame_tokens` tokens), q, k, v (B, nh, N, hd), under
    `attention.block_causal_mask(N // frame_tokens, frame_tokens, window=window)`: frame f attends
    frames f - W + 1 .. f. The queries go in blocks of `query_frames` frames (default: enough for
    `BAND_QUERY_TOKENS` tokens, at least W), each against the keys of its frames and the W - 1
    before them (the tail of that mask, `frame_causal_mask`): memory and compute linear in N."""
    frames = q.shape[2] // frame_tokens
    if query_frames is None:
        query_frames = max(window, -(-BAND_QUERY_TOKENS // frame_tokens))
    if query_frames >= frames:
        return attention(q, k, v, mask=block_causal_mask(frames, frame_tokens, q.device, window=window))
    outs = []
    for a in range(0, frames, query_frames):
        b, k0 = min(frames, a + query_frames), max(0, a - window + 1)
        keys = slice(k0 * frame_tokens, b * frame_tokens)
        outs.append(trailing_frames_attention(q[:, :, a * frame_tokens:b * frame_tokens], k[:, :, keys], v[:, :, keys],
                                              frame_tokens, window))
    return torch.cat(outs, dim=2)


class TransformerBlock(nn.Module):
    """adaLN-Zero block over tokens (B, N, D) laid out as a (T, H, W) grid.

    `factorized=False`: one attention over all tokens, block-causal in time when `temporal_causal`
    (frame i attends frames <= i). `factorized=True`: attention within each frame, then across
    frames at the same spatial position (causal when `temporal_causal`). Optional cross-attention
    to text, then an MLP. `temporal_window` W (temporal_causal blocks only; None = unlimited)
    narrows the time-mixing attention to a band: frame i attends frames i - W + 1 .. i only
    (`attention.block_causal_mask(..., window=W)`; within a frame nothing changes).

    Streaming in time (`layers.streaming`, temporal_causal blocks only): each call carries the next
    frames of a clip. The block appends the keys and values of its time-mixing attention (the one
    attention when full, the temporal one when factorized) to its cache entry, (2, B', nh, N, hd),
    and attends from the call's queries to all of them under the block-causal (banded) mask: each
    chunk computes only its own tokens, and the result equals one pass. Without a window N grows
    by the call's tokens; with a window the entry keeps only the last W - 1 frames (no later query
    can reach an older one), so it stops growing after W - 1 frames.
    """

    stream: CausalCache | None = None  # set by layers.streaming; keys and values of earlier frames

    def __init__(self, dim: int, cond_dim: int, head_dim: int = 64, *, factorized: bool = False,
                 temporal_causal: bool = False, temporal_window: int | None = None, context_dim: int = 0,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.factorized, self.temporal_causal = factorized, temporal_causal
        self.temporal_window = check_window(temporal_window, "temporal_window")
        if temporal_window is not None and not temporal_causal:
            raise ValueError("a temporal_window needs temporal_causal attention")
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, head_dim, dropout)
        if factorized:
            self.norm_t = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.attn_t = SelfAttention(dim, head_dim, dropout)
        if context_dim:
            self.norm_x = nn.LayerNorm(dim, eps=1e-6)
            self.cross = CrossAttention(dim, context_dim, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))
        # adaLN-Zero: the conditioning vector gives (shift, scale, gate) for every residual branch.
        self.n_mod = 9 if factorized else 6
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, self.n_mod * dim))
        # Zero weight and bias: every shift and scale start at 0 (the LayerNorms act unmodulated)...
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)
        # ...and every gate starts at 0, so each self-attention and MLP branch adds exactly nothing:
        # the block is the identity at init, the deep stack starts as a shallow, well-conditioned
        # network, and the gates still get gradient (their input, the branch output, is non-zero).

    def forward(self, x: torch.Tensor, cond: torch.Tensor, grid: tuple[int, int, int],
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        T, H, W = grid
        mods = self.ada(cond)[:, None].chunk(self.n_mod, dim=-1)  # each (B, 1, D)
        if self.factorized:
            B, N, D = x.shape
            h = modulate(self.norm1(x), mods[0], mods[1]).reshape(B * T, H * W, D)  # one sequence per frame
            x = x + mods[2] * self.attn(h).reshape(B, N, D)
            h = modulate(self.norm_t(x), mods[6], mods[7])
            h = rearrange(h, "b (t s) d -> (b s) t d", t=T)  # one sequence per spatial position
            h = self._over_time(self.attn_t, h, 1)
            x = x + mods[8] * rearrange(h, "(b s) t d -> b (t s) d", b=B)
        else:
            h = modulate(self.norm1(x), mods[0], mods[1])
            # block-causal in time without a dense mask: token j is visible to token i iff
            # frame(j) <= frame(i), frames being consecutive runs of H*W tokens
            x = x + mods[2] * self._over_time(self.attn, h, H * W)
        if text is not None:
            x = x + self.cross(self.norm_x(x), text, text_mask)
        return x + mods[5] * self.mlp(modulate(self.norm2(x), mods[3], mods[4]))

    def _over_time(self, attn: SelfAttention, h: torch.Tensor, frame_tokens: int) -> torch.Tensor:
        """attn(h) across frames (runs of `frame_tokens` tokens), causal when `temporal_causal` and
        banded by `temporal_window`; under streaming also over the cached keys and values of the
        earlier frames still in reach."""
        window = self.temporal_window
        if self.stream is None:
            frames = h.shape[1] // frame_tokens
            if window is None or window >= frames:  # the band excludes nothing
                return attn(h, causal=self.temporal_causal, causal_block=frame_tokens)
            q, k, v = attn.project(h)
            return attn.output(banded_attention(q, k, v, frame_tokens, window))
        if not self.temporal_causal:
            raise RuntimeError("streaming in time needs temporal_causal attention")
        q, k, v = attn.project(h)
        kv = torch.stack([k, v])  # (2, B', nh, N, hd), a copy: a view would keep the whole qkv alive
        past = self.stream.get(self)
        if past is not None:
            kv = torch.cat([past, kv], dim=3)
        keep = kv
        if window is not None and kv.shape[3] > (window - 1) * frame_tokens:
            # later frames reach back W - 1 frames at most: evict the older ones (a copy, so that
            # the evicted part is freed with this call's kv)
            keep = kv[:, :, :, kv.shape[3] - (window - 1) * frame_tokens:].clone()
        self.stream.put(self, keep)
        return attn.output(trailing_frames_attention(q, kv[0], kv[1], frame_tokens, window))


class LatentTransformer(nn.Module):
    """The stage-1 prior (`PriorConfig`, no conditioning) and the stage-2 base model (`BaseConfig`).

    `text_dim` > 0 adds cross-attention to text embeddings of that width; `num_classes` and
    `use_context` default to the config's `num_classes` and `context_frames > 0` (0 / False for
    the prior). Transformer blocks are the entries of `self.blocks`, in execution order.
    """

    def __init__(self, cfg, latent_channels: int, *, text_dim: int = 0, num_classes: int | None = None,
                 use_context: bool | None = None):
        super().__init__()
        family = "base" if isinstance(cfg, BaseConfig) else "prior"
        size = resolve_transformer(cfg, family)
        self.size = size
        self.latent_channels = latent_channels
        self.num_classes = getattr(cfg, "num_classes", 0) if num_classes is None else num_classes
        self.use_context = getattr(cfg, "context_frames", 0) > 0 if use_context is None else use_context
        self.text_dim = text_dim
        factorized = getattr(cfg, "attention", "full") == "factorized"
        temporal_causal = getattr(cfg, "temporal_causal", False)
        widths, depths = size.widths, size.depths
        self.levels = len(widths)
        cond_dim = widths[0]

        in_channels = latent_channels + (latent_channels + 1 if self.use_context else 0)
        self.proj_in = nn.Linear(in_channels, widths[0])
        self.logsnr_emb = LogSNREmbedding(cond_dim)
        if self.num_classes:
            self.label_emb = nn.Embedding(self.num_classes + 1, cond_dim)  # last row = null class
        if text_dim:
            self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, cond_dim))
            # A learned token every query can always attend: an empty or fully-masked prompt (the
            # CFG null condition) is then well defined instead of a softmax over no keys.
            self.text_null = nn.Parameter(torch.randn(1, 1, cond_dim) * 0.02)

        def block(level: int) -> TransformerBlock:
            return TransformerBlock(widths[level], cond_dim, size.head_dim, factorized=factorized,
                                    temporal_causal=temporal_causal, context_dim=cond_dim if text_dim else 0,
                                    mlp_ratio=size.mlp_ratio, dropout=size.dropout)

        # Execution plan: level l < last runs depth//2 blocks, merges 2x2 tokens down, ...; the last
        # level runs all its blocks; on the way up each level splits tokens back, fuses the skip
        # (concatenation + linear) and runs its remaining blocks.
        blocks, self.plan = [], []
        for level in range(self.levels):
            n = depths[level] // 2 if level < self.levels - 1 else depths[level]
            self.plan += [("block", level, len(blocks) + i) for i in range(n)]
            blocks += [block(level) for _ in range(n)]
            if level < self.levels - 1:
                self.plan.append(("down", level, None))
        for level in reversed(range(self.levels - 1)):
            n = depths[level] - depths[level] // 2
            self.plan.append(("up", level, None))
            self.plan += [("block", level, len(blocks) + i) for i in range(n)]
            blocks += [block(level) for _ in range(n)]
        self.blocks = nn.ModuleList(blocks)
        self.merge = nn.ModuleList(nn.Linear(4 * widths[l], widths[l + 1]) for l in range(self.levels - 1))
        self.split = nn.ModuleList(nn.Linear(widths[l + 1], 4 * widths[l]) for l in range(self.levels - 1))
        self.fuse = nn.ModuleList(nn.Linear(2 * widths[l], widths[l]) for l in range(self.levels - 1))

        # DiT's final layer: LayerNorm modulated by (shift, scale) from the conditioning, then a
        # linear map to the latent channels.
        self.norm_out = nn.LayerNorm(widths[0], elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * widths[0]))
        self.proj_out = nn.Linear(widths[0], latent_channels)
        # Zero modulation: the final norm starts unmodulated.
        nn.init.zeros_(self.ada_out[1].weight)
        nn.init.zeros_(self.ada_out[1].bias)
        # Zero output projection: the network outputs exactly 0 at init, i.e. an x-prediction of 0
        # (the prior mean) or an eps-/v-prediction of 0 -- a finite, input-independent start whose
        # loss is the same for every noise level, so no logSNR range dominates the first steps.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _condition(self, logsnr, label, text_emb, text_mask, batch, device):
        cond = self.logsnr_emb(logsnr)
        if self.num_classes:
            if label is None:
                label = torch.full((batch,), -1, dtype=torch.long, device=device)
            if label.shape != (batch,):
                raise ValueError(f"label must have shape ({batch},), got {tuple(label.shape)}")
            # a host sync; compiled graphs skip it (the embedding lookup still rejects a bad index)
            if not torch.compiler.is_compiling() and ((label < -1) | (label >= self.num_classes)).any():
                raise ValueError(f"labels must lie in [-1, {self.num_classes - 1}] (-1 = no label)")
            cond = cond + self.label_emb(torch.where(label < 0, self.num_classes, label))
        elif label is not None:
            raise ValueError("label given but the model was built with num_classes = 0")
        text = mask = None
        if self.text_dim:
            null = self.text_null.expand(batch, -1, -1)
            if text_emb is None:
                text = null
            else:
                if text_emb.ndim != 3 or text_emb.shape[0] != batch or text_emb.shape[2] != self.text_dim:
                    raise ValueError(f"text_emb must be ({batch}, L, {self.text_dim}), got {tuple(text_emb.shape)}")
                proj = self.text_proj(text_emb)
                text = torch.cat([null.to(proj.dtype), proj], dim=1)
                if text_mask is not None:
                    if text_mask.shape != text_emb.shape[:2] or text_mask.dtype != torch.bool:
                        raise ValueError(f"text_mask must be bool {tuple(text_emb.shape[:2])}, got "
                                         f"{text_mask.dtype} {tuple(text_mask.shape)}")
                    valid = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask], dim=1)
                    mask = key_padding_mask(valid)
        elif text_emb is not None:
            raise ValueError("text_emb given but the model was built with text_dim = 0")
        return cond, text, mask

    def _inputs(self, z, context, context_mask):
        if not self.use_context:
            if context is not None or context_mask is not None:
                raise ValueError("context given but the model was built without context frames")
            return z
        B, C, T = z.shape[:3]
        if context is None:
            context, context_mask = torch.zeros_like(z), torch.zeros(B, T, dtype=torch.bool, device=z.device)
        if context_mask is None or context.shape != z.shape or context_mask.shape != (B, T):
            raise ValueError(f"context must match z {tuple(z.shape)} and context_mask must be ({B}, {T}) bool")
        m = context_mask.to(z.dtype)[:, None, :, None, None].expand(B, 1, *z.shape[2:])
        return torch.cat([z, context * m, m], dim=1)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, *, text_emb=None, text_mask=None, label=None,
                context=None, context_mask=None) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected z (B, {self.latent_channels}, T', H', W'), got {tuple(z.shape)}")
        B, C, T, H, W = z.shape
        f = 2 ** (self.levels - 1)
        if H % f or W % f:
            raise ValueError(f"latent {H}x{W} must be divisible by {f} for {self.levels} transformer levels")
        logsnr = batch_logsnr(logsnr, B, z.device)
        cond, text, text_mask = self._condition(logsnr, label, text_emb, text_mask, B, z.device)

        x = rearrange(self._inputs(z, context, context_mask), "b c t h w -> b (t h w) c")
        x = self.proj_in(x) + sincos_3d(T, H, W, self.proj_in.out_features, z.device).to(x.dtype)
        skips, grid = [], (T, H, W)
        for kind, level, i in self.plan:
            if kind == "block":
                x = self.blocks[i](x, cond, grid, text, text_mask)
            elif kind == "down":
                skips.append(x)
                x = rearrange(x, "b (t h p w q) d -> b (t h w) (p q d)", t=T, h=grid[1] // 2, p=2, q=2)
                x = self.merge[level](x)
                grid = (T, grid[1] // 2, grid[2] // 2)
            else:
                grid = (T, grid[1] * 2, grid[2] * 2)
                x = rearrange(self.split[level](x), "b (t h w) (p q d) -> b (t h p w q) d",
                              t=T, h=grid[1] // 2, p=2, q=2)
                x = self.fuse[level](torch.cat([x, skips.pop()], dim=-1))
        shift, scale = self.ada_out(cond)[:, None].chunk(2, dim=-1)
        out = self.proj_out(modulate(self.norm_out(x), shift, scale))
        return rearrange(out, "b (t h w) c -> b c t h w", t=T, h=H)
