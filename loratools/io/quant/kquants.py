"""llama.cpp's k-quant quantizers Q4_K, Q5_K and Q6_K, vectorised in numpy over blocks.

The ``gguf`` package dequantizes k-quants but cannot quantize them; these follow llama.cpp's
reference quantizers (``quantize_row_q4_K_ref``, ``…q5_K_ref``, ``…q6_K_ref`` in
ggml-quants.c, without an importance matrix) step for step:

- Q4_K / Q5_K: 256-weight super-blocks of 8 sub-blocks of 32. Each sub-block gets a scale and a
  min from ``make_qkx2_quants`` (a weighted least-squares search over candidate scales, weights
  ``rms(x) + |x|``); the 8 scales and mins are quantized to 6 bits against the super-block's
  largest (``d = max_scale/63``, ``dmin = max_min/63``, f16), then ``q = round((x + dmin·m)/(d·sc))``
  clamped to [0, 15] (Q4_K) or [0, 31] (Q5_K).  ``x ≈ d·sc·q − dmin·m``.
- Q6_K: 16 sub-blocks of 16, each scale from ``make_qx_quants`` (rmse weights x², 19 candidate
  scales), scales as int8 against ``d = −max_scale/128`` (f16), ``q = round(x/(d·sc)) + 32`` in
  [0, 63]. ``x ≈ d·sc·(q − 32)``.

Rounding is numpy's round-half-to-even, as llama.cpp's ``nearest_int``. The float operations
follow the C code's formulas, not its exact order, so a rare weight may round the other way;
the tests check that the result reads back through ``gguf.quants.dequantize`` with llama.cpp's
own error.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def quantize(values: np.ndarray, kind: str) -> np.ndarray:
    """float32 (rows, columns), columns a multiple of 256 → uint8 (rows, bytes per row)."""
    rows, cols = values.shape
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, QK_K)
    blocks = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[kind](x)
    return blocks.reshape(rows, cols // QK_K * BLOCK_BYTES[kind])


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """``make_qkx2_quants`` on each row of ``x`` (B, n): (scale (B,), the_min (B,), L (B, n))."""
    lo, hi = np.minimum(x.min(axis=1), 0.0), x.max(axis=1)
    flat = hi == lo
    span = np.where(flat, 1.0, hi - lo).astype(np.float32)
    sum_w, sum_x = w.sum(axis=1), (w * x).sum(axis=1)
    iscale = nmax / span
    scale = 1.0 / iscale
    levels = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    best = (w * np.square(scale[:, None] * levels + lo[:, None] - x)).sum(axis=1)
    low = lo.copy()
    for step in range(nstep + 1):
        trial = np.clip(np.rint(((rmin + rdelta * step + nmax) / span)[:, None] * (x - lo[:, None])), 0, nmax)
        sum_l, sum_l2, sum_xl = (
            (w * trial).sum(axis=1),
            (w * trial * trial).sum(axis=1),
            (w * trial * x).sum(axis=1),
        )
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        this_min = np.where(positive, 0.0, this_min)
        error = (w * np.square(this_scale[:, None] * trial + this_min[:, None] - x)).sum(axis=1)
        better = ok & (error < best)
        levels = np.where(better[:, None], trial, levels)
        best, scale, low = (
            np.where(better, error, best),
            np.where(better, this_scale, scale),
            np.where(better, this_min, low),
        )
    return (
        np.where(flat, 0.0, scale).astype(np.float32),
        (-low).astype(np.float32),
        np.where(flat[:, None], 0, levels),
    )


def _scales_mins(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Per super-block: f16 d and dmin, the 6-bit scale/min codes (nb, 8), and levels (nb, 256)."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    weights = np.sqrt(np.square(sub).sum(axis=1) / 32)[:, None] + np.abs(sub)
    scales, mins, levels = _qkx2(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins, levels = scales.reshape(nb, 8), mins.reshape(nb, 8), levels.reshape(nb, QK_K)
    max_scale, max_min = np.maximum(scales.max(axis=1), 0), np.maximum(mins.max(axis=1), 0)
    inv_scale = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1), 0.0)
    ls = np.minimum(63, np.rint(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, np.rint(inv_min[:, None] * mins)).astype(np.uint8)
    d, dmin = _f16(max_scale / 63.0), _f16(max_min / 63.0)
    step = d.astype(np.float32)[:, None] * ls  # (nb, 8)
    shift = dmin.astype(np.float32)[:, None] * lm
    fresh = np.clip(
        np.rint((x.reshape(nb, 8, 32) + shift[..., None]) / np.where(step > 0, step, 1)[..., None]), 0, nmax
    )
    levels = np.where((step > 0)[..., None], fresh, levels.reshape(nb, 8, 32)).reshape(nb, QK_K)
    return d, dmin, _pack_scales(ls, lm), levels.astype(np.uint8)


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of a Q4_K/Q5_K super-block from 8 six-bit scales and mins."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4], out[:, 4:8] = ls[:, :4], lm[:, :4]
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return out


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _scales_mins(x, 15, -1.0, 20)
    groups = levels.reshape(-1, 4, 2, 32)  # 64-weight chunks: low nibble = first 32, high = next 32
    qs = (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1
    )


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _scales_mins(x, 31, -0.5, 15)
    groups = levels.reshape(-1, 4, 2, 32)
    low = groups & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (groups >> 4).astype(np.uint8)  # (nb, 4, 2, 32): bit 2n / 2n+1 of qh for chunk n
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # (4, 2)
    qh = np.bitwise_or.reduce((high << shifts[None, :, :, None]).reshape(-1, 8, 32), axis=1).astype(np.uint8)
    return np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qh, qs], axis=1
    )


def _qx(x: np.ndarray, nmax: int) -> np.ndarray:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1)`` on each row of ``x`` (B, n): the scales (B,)."""
    amax_at = np.abs(x).argmax(axis=1)
    top = x[np.arange(x.shape[0]), amax_at]
    tiny = np.abs(top) < 1e-15  # GROUP_MAX_EPS
    top = np.where(tiny, 1.0, top)
    w = np.square(x)

    def fit(iscale: np.ndarray):
        q = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return (w * x * q).sum(axis=1), (w * q * q).sum(axis=1)

    sum_lx, sum_l2 = fit(-nmax / top)
    scale = np.where(sum_l2 > 0, sum_lx / np.where(sum_l2 > 0, sum_l2, 1), 0.0)
    best = scale * sum_lx
    for step in [s for s in range(-9, 10) if s]:
        lx, l2 = fit(-(nmax + 0.1 * step) / top)
        better = (l2 > 0) & (lx * lx > best * l2)
        scale = np.where(better, lx / np.where(l2 > 0, l2, 1), scale)
        best = np.where(better, scale * lx, best)
    return np.where(tiny, 0.0, scale).astype(np.float32)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales = _qx(sub, 32).reshape(nb, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), pick]
    empty = np.abs(max_scale) < 1e-15
    iscale = np.where(empty, 0.0, -128.0 / np.where(empty, 1.0, max_scale))
    d = _f16(np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, iscale)))
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc  # (nb, 16)
    q = np.clip(np.rint(sub.reshape(nb, 16, 16) / np.where(step != 0, step, 1)[..., None]), -32, 31)
    levels = np.where((step != 0)[..., None], q + 32, 32).reshape(nb, 2, 4, 32).astype(np.uint8)  # 128-chunks
    ql = np.concatenate([(levels[:, :, 0] & 0xF) | ((levels[:, :, 2] & 0xF) << 4),
                         (levels[:, :, 1] & 0xF) | ((levels[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)  # fmt: skip
    qh = ((levels[:, :, 0] >> 4) | ((levels[:, :, 1] >> 4) << 2) | ((levels[:, :, 2] >> 4) << 4)
          | ((levels[:, :, 3] >> 4) << 6)).reshape(nb, 64)  # fmt: skip
    return np.concatenate(
        [ql, qh.astype(np.uint8), sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1
    )
