"""Quantized weights kept packed in memory: the planar layout (:mod:`chatcore.quant.packed`) every GGUF type
and ``--quantize`` mode maps onto."""
