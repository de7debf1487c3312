"""Quantization stage: GPTQ, SmoothQuant+GPTQ (llm-compressor), int8 weight-only, bitsandbytes 8/4-bit, QAT
(torchao fake quantizers with learned scales, exported to compressed-tensors; stemqa.quant.qat).
The trade-off table + figure is stemqa.quant.report (`stemqa quant report`).

`quantize(qcfg, model_dir, calib_records, out_dir)` writes a directory that plain transformers
`from_pretrained` (via `stemqa.models.load_causal_lm`) loads on CPU; lm_head stays full precision.
"""
from stemqa.quant.errors import GroupSizeError, QuantError, UnsupportedMethodError
from stemqa.quant.methods import METHODS, check_group_size, missing_requirements
from stemqa.quant import qat
from stemqa.quant.remote import quantize_remote
from stemqa.quant.run import quantize

__all__ = ["GroupSizeError", "METHODS", "QuantError", "UnsupportedMethodError", "check_group_size",
           "missing_requirements", "qat", "quantize", "quantize_remote"]
