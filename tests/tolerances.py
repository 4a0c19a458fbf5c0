"""Named tolerances for the tests, each with where its number comes from.

Use as ``torch.testing.assert_close(a, b, **F32_MATMUL)`` or ``pytest.approx(x, rel=F32_MATMUL["rtol"])``.
A tolerance in a test is either one of these or a number with a comment that says why that number
(tests/test_tolerances.py checks it). Never compare computed floats bit-for-bit: another CPU, BLAS or
thread count sums in another order.

Unit roundoff u (half an ulp, relative; p significand bits give u = 2⁻ᵖ): float32 2⁻²⁴ ≈ 6.0e-8,
bfloat16 2⁻⁸ ≈ 3.9e-3, float16 2⁻¹¹ ≈ 4.9e-4, float64 2⁻⁵³ ≈ 1.1e-16. A sum of k terms in a floating
type is off by at most about k·u·Σ|terms| (worst case) and typically √k·u·Σ|terms| (independent
roundings).
"""

import torch

# -- per dtype ------------------------------------------------------------------------------------

# One value computed in each dtype from the same inputs, by the same math in another order:
# - float64: reference math; sums of ≤ 10⁴ terms are off by ≤ 10⁴·u ≈ 1e-12, so 1e-10 is slack
#   without hiding a float32-sized (1e-7) slip.
# - float32: products/SVDs of small matrices (k ≤ a few hundred terms): √k·u ≈ 1e-6, so 1e-5.
# - bfloat16: 8 significand bits, one rounding is ≤ 2⁻⁸ ≈ 3.9e-3 relative; two values rounded from
#   slightly different float32 results may land one ulp (2⁻⁷ ≈ 7.8e-3) apart; 1.6e-2 ≈ two ulps.
# - float16: 11 bits, one ulp is 2⁻¹⁰ ≈ 1e-3 relative.
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
}

# One ulp relative (2u). One rounding to the dtype moves a value by at most half of it:
# |x - round(x)| <= EPS/2 * |x|.
EPS: dict[torch.dtype, float] = {
    torch.float32: 2.0**-23,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}

# -- by what is compared ----------------------------------------------------------------------------

# float32 compute of O(1) values through a product or sum of k ≲ 1000 terms, against the same math in
# another order or against a float64 reference on the same float32 inputs. Typical error √k·u ≤ 2e-6
# relative; rtol = 1e-5 ≈ 170·u also covers the worst case k·u for k ≤ 170. atol 1e-6 for entries that
# cancel to ~0 out of O(1) terms. A wrong scale, sign, transpose or missed term moves values by ≥ 1e-2.
F32_MATMUL = {"rtol": 1e-5, "atol": 1e-6}

# A float32 weight W0 + s·B·A (|W| ~ 1) against the same sum formed another way (merge then unmerge,
# swap vs direct, a float32 SVD of the delta): several roundings of O(1) values, each ≤ u·|W|, plus the
# product's √k·u; atol 1e-5 ≈ 170·u of |W| ~ 1, for entries where W0 and the delta cancel.
F32_WEIGHTS = {"rtol": 1e-5, "atol": 1e-5}

# Results of a float32 SVD (or eigen/QR step) and what is rebuilt from it: U·diag(s)·Vᵀ, a layer's
# output through merged vs separate weights. The factorisation's backward error is ~ n·u·‖M‖ (n ≤ 256
# here: 1.5e-5·‖M‖ worst case), more than one product's, hence 10× F32_MATMUL.
F32_SVD = {"rtol": 1e-4, "atol": 1e-5}

# Logits of a float32 model computed two ways (merged W0 + sBA vs W0·x + s·B·(A·x)): the same math in
# a different summation order through a few layers, so a little looser than a single op: F32_SVD's
# numbers, by another error source.
LOGITS_FP32 = {"rtol": 1e-4, "atol": 1e-5}

# float64 math against float64 math (a closed form, another order, the naive formula): sums of
# ≤ 10⁶ terms are off by ≤ 10⁶·2⁻⁵³ ≈ 1e-10 relative; 1e-9 stays 100× below a float32 slip (1e-7).
F64_MATH = {"rtol": 1e-9, "atol": 1e-9}

# Randomized (subspace-iteration) SVD against the exact one on a matrix with a spectral gap at the kept
# rank. linalg.randomized_svd sketches r + 8 columns, does ≥ 1 power iteration and stops once one more
# improves the rank-r residual by < 1e-3 of itself; the kept subspace's error shrinks like
# (σ_{r+9}/σ_r)^(2q+1) per iteration, so with a gap it lands well inside 1e-3 relative, while float32
# alone gives ~1e-6. Without a gap the truncation is not unique: do not use this there. A wrong rank, a
# lost power iteration on a slow spectrum or a mis-scaled factor misses by ≥ 1e-2.
RANDOMIZED_SVD = {"rtol": 1e-3, "atol": 1e-5}

# A bfloat16 output against the float32 value it rounds (the reference computed in float32, possibly
# in another order): one round-to-nearest is ≤ half a bf16 ulp ≤ 2⁻⁸·|x|, and the output's float32
# source may sit up to 16 float32 ulps (16·2⁻²⁴ = 2⁻²⁰) from the reference, which can tip a rounding
# to the other neighbour but never beyond 2⁻⁸ + 2⁻²⁰. Truncating instead of rounding, or rounding
# twice, errs by up to a full ulp (2⁻⁷) and fails. Compare against the float32 reference, not its
# bf16 rounding: two roundings of nearby values may land a full ulp apart.
BF16_ROUNDING = {"rtol": 2.0**-8 + 2.0**-20, "atol": 0.0}
