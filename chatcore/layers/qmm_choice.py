"""Which kernel multiplies a packed weight on a GPU, by the number of activation rows: the fused GEMV
(:mod:`chatcore.layers.triton_qgemv`, one row, with the RMSNorm prologue), the fused dequant-GEMM
(:mod:`chatcore.layers.triton_qmm`, a few rows: batched decode, short chunks), or dequantize-then-cuBLAS
(:func:`chatcore.quant.weight.dense` + ``F.linear``, long prompt chunks, where the dequantization is paid once
for many rows). :func:`chatcore.layers.linear.linear` asks.

The thresholds are a table to tune from GPU measurements (``bench/quant_kernels.py --parts qmm``): rows in
``QMM_ROWS[bits]`` (inclusive) take the GEMM. Setting a range's low end to 1 sends one-row products to the GEMM
too (its norm then runs as its own kernel); an empty range (low > high) keeps the older paths only.
"""

from __future__ import annotations

from typing import Literal

from chatcore.quant.packed import QuantFormat

# code bits -> (fewest, most) activation rows that take the fused dequant-GEMM. From the H200 (session 15,
# bench/quant_kernels.py --parts qmm, 8B linears of a layer): 8-bit codes (q8_0) 230-234 us at 1-16 rows
# against 352 us for dequantize + cuBLAS, so 2..16 rows (one row stays on the GEMV); 4-bit codes (q4_k)
# 300-320 us at 1-16 rows, no better than dequantize + cuBLAS (~300 us), and 516 us at 64, so none. 5- and
# 6-bit codes were not measured and unpack with more work a code than 4-bit: none too.
QMM_ROWS: dict[int, tuple[int, int]] = {4: (2, 1), 5: (2, 1), 6: (2, 1), 8: (2, 16)}

Kernel = Literal["qgemv", "qmm", "dense"]


def packed_kernel(rows: int, fmt: QuantFormat) -> Kernel:
    """The kernel for ``rows`` activation rows (half precision, on a GPU) times a packed weight of ``fmt``."""
    lo, hi = QMM_ROWS.get(fmt.bits, (2, 1))
    if lo <= rows <= hi:
        return "qmm"
    return "qgemv" if rows == 1 else "dense"
