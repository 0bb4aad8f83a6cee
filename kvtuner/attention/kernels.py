"""Attention scores and value mixes straight on packed codes: no dequantized copy of the history.

Codes are packed in planes along head_dim (`kvtuner.quant.packing`): plane p of a row of width m
holds channels `[p*m, (p+1)*m)`, so each plane meets its own contiguous slice of the query.

Per-token groups (scale s and zero z per token and group of channels), query q `[g, d]`:

    q . k_t = sum_groups s_tG (q_G . c_tG) + z_tG sum(q_G)

Per-channel blocks (KIVI keys; s, z per block and channel): fold the block's scales into the query,

    q . k_t = (q * s_b) . c_t + q . z_b          (b = the block of token t)

Values (per token), weights p `[g, n]`:

    sum_t p_t v_t = sum_t (p_t s_tG) c_tG + sum_t p_t z_tG        (per group G of channels)

Every function takes float32 queries or weights and returns float32. Under `torch.compile` each is
one fused loop nest over the packed bytes (the token axis is dynamic, so a growing context does not
recompile); run eagerly, the codes of at most `EAGER_CHUNK` tokens are materialized at a time.

On the CPU, `native.cpp` computes `decode_layer` in C++ (tests/attention/test_native.py checks the
two agree); these functions are the reference and the path on CUDA.
"""

from __future__ import annotations

import math

import torch

EAGER_CHUNK = 1024  # tokens whose float codes an eager call holds at once


def _planes(packed: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """The code planes of packed uint8 `[..., m]` as float32 `[..., m]` each (see packing)."""
    per = 8 // bits
    if per == 1:
        return [packed.float()]
    mask = (1 << bits) - 1
    return [((packed >> (p * bits)) & mask).float() for p in range(per)]


def _segment(width: int, group: int) -> int:
    """Channels per segment: segments never straddle a plane or a group."""
    return math.gcd(width, group)


def token_key_scores(
    q: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: int,
) -> torch.Tensor:
    """Scores `[b, h, g, n]` of queries `[b, h, g, d]` against per-token packed keys.

    packed `[b, h, n, m]`, scale/zero `[b, h, n, d / group]`.
    """
    b, h, n, m = packed.shape
    g, d = q.shape[-2], q.shape[-1]
    per = 8 // bits
    u = _segment(m, group)
    if per * m != d:  # padding codes at the end of the row: pad the query with zeros
        q = torch.nn.functional.pad(q, (0, per * m - d))
    parts = []
    for p, plane in enumerate(_planes(packed, bits)):
        qp = q[..., p * m : (p + 1) * m].reshape(b, h, g, 1, m // u, u)
        parts.append((plane.reshape(b, h, 1, n, m // u, u) * qp).sum(-1))  # [b, h, g, n, m/u]
    segments = torch.cat(parts, -1)[..., : d // u]  # [b, h, g, n, d/u]
    dots = segments.reshape(b, h, g, n, d // group, group // u).sum(-1)  # [b, h, g, n, G]
    qsum = q[..., :d].reshape(b, h, g, 1, d // group, group).sum(-1)  # [b, h, g, 1, G]
    s, z = scale.float().unsqueeze(2), zero.float().unsqueeze(2)  # [b, h, 1, n, G]
    return (dots * s + qsum * z).sum(-1)


def channel_key_scores(
    q: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    block: int,
) -> torch.Tensor:
    """Scores `[b, h, g, n]` of queries `[b, h, g, d]` against KIVI keys: per channel, blocks of
    `block` tokens. packed `[b, h, n, m]` (n whole blocks), scale/zero `[b, h, n / block, d]`."""
    b, h, n, m = packed.shape
    g, d = q.shape[-2], q.shape[-1]
    blocks = n // block
    per = 8 // bits
    s, z = scale.float().unsqueeze(2), zero.float().unsqueeze(2)  # [b, h, 1, nb, d]
    folded = q.unsqueeze(3) * s  # [b, h, g, nb, d]
    if per * m != d:
        folded = torch.nn.functional.pad(folded, (0, per * m - d))
    dots = None
    for p, plane in enumerate(_planes(packed, bits)):
        part = (
            plane.reshape(b, h, 1, blocks, block, m)
            * folded[..., p * m : (p + 1) * m].unsqueeze(-2)
        ).sum(-1)  # [b, h, g, nb, block]
        dots = part if dots is None else dots + part
    shift = (q.unsqueeze(3) * z).sum(-1, keepdim=True)  # [b, h, g, nb, 1]
    return (dots + shift).reshape(b, h, g, n)


def token_value_mix(
    p: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: int,
    d: int,
) -> torch.Tensor:
    """`sum_t p_t v_t`: weights `[b, h, g, n]` over per-token packed values -> `[b, h, g, d]`."""
    b, h, n, m = packed.shape
    g = p.shape[2]
    per = 8 // bits
    u = _segment(m, group)
    ps = p.unsqueeze(-1) * scale.float().unsqueeze(2)  # [b, h, g, n, G]
    shift = (p.unsqueeze(-1) * zero.float().unsqueeze(2)).sum(3)  # [b, h, g, G]
    # the weight of each segment of channels: its group's p * s
    seg = ps.repeat_interleave(group // u, dim=-1)  # [b, h, g, n, d/u]
    if per * m != d:
        seg = torch.nn.functional.pad(seg, (0, (per * m - d) // u))
    parts = []
    for index, plane in enumerate(_planes(packed, bits)):
        w = seg[..., index * (m // u) : (index + 1) * (m // u)].unsqueeze(-1)  # [b,h,g,n,m/u,1]
        mixed = (plane.reshape(b, h, 1, n, m // u, u) * w).sum(3)  # [b, h, g, m/u, u]
        parts.append(mixed.reshape(b, h, g, m))
    out = torch.cat(parts, -1)[..., :d]
    return out + shift.repeat_interleave(group, dim=-1)


# -- compiled and chunked entry points --------------------------------------------------------------
def chunked_scores(fn, q, packed, scale, zero, bits, group, *, per_channel: bool) -> torch.Tensor:
    """`fn` eagerly over chunks of about EAGER_CHUNK tokens (whole blocks for per-channel keys)."""
    n = packed.shape[-2]
    step = max(EAGER_CHUNK // group, 1) * group if per_channel else EAGER_CHUNK
    if n <= step:
        return fn(q, packed, scale, zero, bits, group)
    out = []
    for first in range(0, n, step):
        rows = (
            slice(first // group, (first + step) // group)
            if per_channel
            else slice(first, first + step)
        )
        out.append(
            fn(
                q,
                packed[..., first : first + step, :],
                scale[..., rows, :],
                zero[..., rows, :],
                bits,
                group,
            )
        )
    return torch.cat(out, -1)


def chunked_value_mix(p, packed, scale, zero, bits, group, d) -> torch.Tensor:
    """`token_value_mix` eagerly over chunks of EAGER_CHUNK tokens, summed."""
    n = packed.shape[-2]
    if n <= EAGER_CHUNK:
        return token_value_mix(p, packed, scale, zero, bits, group, d)
    out = None
    for first in range(0, n, EAGER_CHUNK):
        rows = slice(first, first + EAGER_CHUNK)
        part = token_value_mix(
            p[..., rows],
            packed[..., rows, :],
            scale[..., rows, :],
            zero[..., rows, :],
            bits,
            group,
            d,
        )
        out = part if out is None else out + part
    return out


# -- one whole decode step of a layer (one compiled graph) ---------------------------------------------
def decode_layer(
    q: torch.Tensor,
    sink: torch.Tensor,
    res: torch.Tensor,
    kpacked: torch.Tensor,
    kscale: torch.Tensor,
    kzero: torch.Tensor,
    kcs: torch.Tensor | None,
    vpacked: torch.Tensor,
    vscale: torch.Tensor,
    vzero: torch.Tensor,
    vcs: torch.Tensor | None,
    bias: torch.Tensor | None,
    kbits: int,
    kgroup: int,
    vbits: int,
    vgroup: int,
    per_channel_keys: bool,
) -> torch.Tensor:
    """Attention of queries `[b, h, g, d]` (scaled) over sinks, packed stores and residual, all
    smoothed from their first token (or not at all) -> float32 `[b, h, g, d]`.

    sink, res: `[2, b, h, n, d]` full precision; k*/v*: the stores as `PackedView` holds them
    (kcs/vcs the channel scales `[b, h, 1, d]` or None); bias: additive float32
    `[b, 1, 1, n_all]` (mask, window) over the held tokens, oldest first, or None. The arguments
    of kvtuner's CPU kernel (`native`); this eager entry splits them (`split_parts`) and runs
    `decode_parts`, the function that is compiled.
    """
    sink, res, bias = split_parts(sink, res, bias)
    return decode_parts(q, sink, res, kpacked, kscale, kzero, kcs, vpacked, vscale, vzero, vcs,
                        bias, kbits, kgroup, vbits, vgroup, per_channel_keys)  # fmt: skip


def split_parts(sink: torch.Tensor, res: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """(sink or None, res or None, bias parts or None): empty parts become None, and the bias over
    the held tokens (sinks, stored, residual) becomes views of its three parts (None if empty)."""
    ns, nr = sink.shape[-2], res.shape[-2]
    if bias is not None:
        end = bias.shape[-1] - nr
        parts = (bias[..., :ns], bias[..., end:], bias[..., ns:end])
        bias = tuple(part if part.shape[-1] else None for part in parts)
    return (sink if ns else None), (res if nr else None), bias


def decode_parts(
    q: torch.Tensor,
    sink: torch.Tensor | None,
    res: torch.Tensor | None,
    kpacked: torch.Tensor,
    kscale: torch.Tensor,
    kzero: torch.Tensor,
    kcs: torch.Tensor | None,
    vpacked: torch.Tensor,
    vscale: torch.Tensor,
    vzero: torch.Tensor,
    vcs: torch.Tensor | None,
    bias: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None,
    kbits: int,
    kgroup: int,
    vbits: int,
    vgroup: int,
    per_channel_keys: bool,
) -> torch.Tensor:
    """`decode_layer` on its split arguments: sink and res None where the layer holds no such
    token, bias None or the additive `[b, 1, 1, n_part]` of the sinks, the residual and the
    stored tokens (each None where that part is empty).

    The softmax runs part by part (one max and one sum over all three), so the graph never
    concatenates the scores or slices them at an offset that depends on the stored tokens'
    (unbacked) count: torch 2.11's inductor cannot lower such a slice.
    """
    d = q.shape[-1]
    sink_bias, res_bias, stored_bias = (None, None, None) if bias is None else bias
    kq = q if kcs is None else q * kcs.float()
    torch._check(kpacked.shape[-2] >= 1)
    if per_channel_keys:
        stored = channel_key_scores(kq, kpacked, kscale, kzero, kbits, kgroup)
    else:
        stored = token_key_scores(kq, kpacked, kscale, kzero, kbits, kgroup)
    if stored_bias is not None:
        torch._check(stored_bias.shape[-1] == stored.shape[-1])
        stored = stored + stored_bias
    exact = []  # (scores, values) of the full-precision parts
    for held, part_bias in ((sink, sink_bias), (res, res_bias)):
        if held is not None:
            scores = q @ held[0].float().transpose(-1, -2)
            exact.append((scores if part_bias is None else scores + part_bias, held[1]))
    top = stored.amax(-1, keepdim=True)
    for scores, _ in exact:
        top = torch.maximum(top, scores.amax(-1, keepdim=True))
    weights = torch.exp(stored - top)
    total = weights.sum(-1, keepdim=True)
    out = token_value_mix(weights, vpacked, vscale, vzero, vbits, vgroup, d)
    if vcs is not None:
        out = out * vcs.float()
    for scores, values in exact:
        weights = torch.exp(scores - top)
        total = total + weights.sum(-1, keepdim=True)
        out = out + weights @ values.float()
    return out / total
