"""Quantization stage: GPTQ, SmoothQuant+GPTQ (llm-compressor), int8 weight-only, bitsandbytes 8/4-bit.

`quantize(qcfg, model_dir, calib_records, out_dir)` writes a directory that plain transformers
`from_pretrained` (via `stemqa.models.load_causal_lm`) loads on CPU; lm_head stays full precision.
"""
from stemqa.quant.errors import GroupSizeError, QuantError, UnsupportedMethodError
from stemqa.quant.methods import METHODS, check_group_size, missing_requirements
from stemqa.quant.remote import quantize_remote
from stemqa.quant.run import quantize

__all__ = ["GroupSizeError", "METHODS", "QuantError", "UnsupportedMethodError", "check_group_size",
           "missing_requirements", "quantize", "quantize_remote"]
