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

# code bits -> (fewest, most) activation rows that take the fused dequant-GEMM; a first guess before GPU numbers
QMM_ROWS: dict[int, tuple[int, int]] = {4: (2, 256), 5: (2, 256), 6: (2, 256), 8: (2, 256)}

Kernel = Literal["qgemv", "qmm", "dense"]


def packed_kernel(rows: int, fmt: QuantFormat) -> Kernel:
    """The kernel for ``rows`` activation rows (half precision, on a GPU) times a packed weight of ``fmt``."""
    lo, hi = QMM_ROWS.get(fmt.bits, (2, 256))
    if lo <= rows <= hi:
        return "qmm"
    return "qgemv" if rows == 1 else "dense"
