"""A float64, loop-per-window reference of shifted-window attention, written from the papers' definitions
(Swin sec. 3.2; Swin V2 sec. 3.2-3.3), independent of the library's index tables, masks and layouts."""

from __future__ import annotations

import math

import torch


def _region(p: int, size: int, window: int, shift: int) -> int:
    if shift == 0:
        return 0
    return 0 if p < size - window else (1 if p < size - shift else 2)


def _log_coord(delta: int, divisor: int) -> float:
    t = delta / max(divisor, 1) * 8.0
    return math.copysign(math.log2(1 + abs(t)) / 3.0, t) if t else 0.0


def reference_window_attention(block, x: torch.Tensor) -> torch.Tensor:
    """What ``block.window_attention(x)`` must return, computed in float64: x ``(B, H, W, C)``."""
    attn = block.attn
    (wh, ww), (sh, sw) = block.window, block.shift
    B, H, W, C = x.shape
    heads, d = attn.num_heads, C // attn.num_heads
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    padded = torch.zeros(B, Hp, Wp, C, dtype=torch.float64)
    padded[:, :H, :W] = x.double()
    rolled = torch.roll(padded, shifts=(-sh, -sw), dims=(1, 2))
    wq = attn.qkv.weight.double()
    if block.version == "v2":
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias]).double()
        scale = torch.exp(torch.clamp(attn.logit_scale.double().view(heads), max=math.log(100.0)))
        fc1, fc2 = attn.cpb_mlp[0], attn.cpb_mlp[2]
        ref_h, ref_w = attn.pretrained_window or (wh, ww)
    else:
        bias = attn.qkv.bias.double()
    out = torch.zeros_like(rolled)
    for r0 in range(0, Hp, wh):
        for c0 in range(0, Wp, ww):
            pos = [(r0 + i, c0 + j) for i in range(wh) for j in range(ww)]
            feats = torch.stack([rolled[:, r, c] for r, c in pos], dim=1)  # (B, N, C)
            q, k, v = (feats @ wq.t() + bias).split(C, dim=-1)
            head_out = []
            for h in range(heads):
                qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
                logits = torch.zeros(B, len(pos), len(pos), dtype=torch.float64)
                for a, (qr, qc) in enumerate(pos):
                    for b, (kr, kc) in enumerate(pos):
                        dy, dx = qr - kr, qc - kc
                        if block.version == "v2":
                            # a zero-padded token has k = 0 (no k bias): its cosine is taken as 0, as with
                            # x / max(|x|, eps)
                            qa, kb = qh[:, a], kh[:, b]
                            norms = qa.norm(dim=-1).clamp_min(1e-12) * kb.norm(dim=-1).clamp_min(1e-12)
                            cos = (qa * kb).sum(-1) / norms
                            coord = [_log_coord(dy, ref_h - 1), _log_coord(dx, ref_w - 1)]
                            coord = torch.tensor(coord, dtype=torch.float64)
                            hidden = torch.relu(coord @ fc1.weight.double().t() + fc1.bias.double())
                            pos_bias = 16 * torch.sigmoid(hidden @ fc2.weight.double()[h])
                            logits[:, a, b] = cos * scale[h] + pos_bias
                        else:
                            row = (dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)
                            table = attn.relative_position_bias_table.double()
                            logits[:, a, b] = (qh[:, a] * kh[:, b]).sum(-1) / math.sqrt(d) + table[row, h]
                        if _region(qr, Hp, wh, sh) != _region(kr, Hp, wh, sh) or _region(qc, Wp, ww, sw) != _region(
                            kc, Wp, ww, sw
                        ):
                            logits[:, a, b] -= 100.0
                head_out.append(logits.softmax(-1) @ vh)
            y = torch.cat(head_out, dim=-1) @ attn.proj.weight.double().t() + attn.proj.bias.double()
            for n, (r, c) in enumerate(pos):
                out[:, r, c] = y[:, n]
    return torch.roll(out, shifts=(sh, sw), dims=(1, 2))[:, :H, :W]
