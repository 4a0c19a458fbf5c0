"""Tolerances per dtype, stated once. Use with ``torch.testing.assert_close(..., **TOL[dtype])``.

- float64: reference math.
- float32: products/SVDs of small matrices agree to ~1e-5 relative.
- bfloat16: 8 bits of mantissa → one rounding is 2⁻⁸ ≈ 4e-3 relative.
- float16: 11 bits → 2⁻¹¹ ≈ 5e-4 relative.
"""

import torch

TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
}

# One rounding to the dtype moves a value by at most half an ulp: |x - round(x)| <= EPS/2 * |x|.
EPS: dict[torch.dtype, float] = {
    torch.float32: 2.0**-23,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}

# Logits of a float32 model computed two ways (merged W0 + sBA vs W0·x + s·B·(A·x)): the same math in
# a different summation order through a few layers, so a little looser than a single op.
LOGITS_FP32 = {"rtol": 1e-4, "atol": 1e-5}
