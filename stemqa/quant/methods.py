"""The method table: one small function per quantization method, plus what each needs to run.

Every method function loads the full-precision model from `model_dir`, quantizes it with the library made
for the job, saves a `from_pretrained`-loadable directory to `out_dir` and returns the in-memory quantized
model (used to check the reload); lm_head is always left out.
- gptq, smoothquant-gptq, int8-weight: llm-compressor (`oneshot` with GPTQ / SmoothQuant / RTN modifiers),
  saved in compressed-tensors format, which transformers reloads (decompressed) on CPU.
- bnb-8bit, bnb-4bit: transformers' BitsAndBytesConfig at load time (LLM.int8 / NF4), saved serialized.
- qat: torchao fake quantizers with learned scales, trained on the calibration (SFT) texts, exported to the
  same compressed-tensors pack-quantized format as gptq (stemqa/quant/qat.py).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from stemqa.config.schema import QUANT_BITS, QuantConfig
from stemqa.quant.calibration import calibration_dataset
from stemqa.quant.errors import GroupSizeError, QuantError, UnsupportedMethodError

KEEP = ["lm_head"]  # modules never quantized (full-precision output head, as the issue asks)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_group_size(model, group_size: int, ignore: Sequence[str] = KEEP) -> None:
    """Raise GroupSizeError naming every Linear whose input width `group_size` does not divide.

    llm-compressor checks this too, but only after loading its pipeline; we check first so the message
    names our config field and the layers, before any calibration time is spent.
    """
    import torch

    bad = [(name, m.in_features) for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in ignore and m.in_features % group_size]
    if bad:
        widths = sorted({w for _, w in bad})
        shown = ", ".join(f"{n} (in_features={w})" for n, w in bad[:4])
        shown += f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise GroupSizeError(
            f"quant.group_size={group_size} does not divide the input width of {len(bad)} linear layer(s): {shown}. "
            f"Pick a group size that divides {', '.join(map(str, widths))}."
        )


# ---- llm-compressor methods -------------------------------------------------------------------------

def _weight_args(bits: int, group_size: Optional[int]):
    from compressed_tensors.quantization import QuantizationArgs

    if group_size is None:  # one scale per output channel
        return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)


def _act_args(bits: int):
    from compressed_tensors.quantization import QuantizationArgs

    # Dynamic per-token activation quantization, as in llm-compressor's W8A8 / W4A8 presets.
    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="token", dynamic=True)


def _scheme(weights, acts=None):
    from compressed_tensors.quantization import QuantizationScheme

    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)}


def _oneshot_and_save(model_dir: Path, out_dir: Path, texts: Sequence[str], qcfg: QuantConfig, recipe_fn,
                      group_size: Optional[int]):
    from llmcompressor import oneshot

    from stemqa.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(model_dir))
    tok = load_tokenizer(str(model_dir))
    if group_size is not None:
        check_group_size(model, group_size)
    dataset = calibration_dataset(texts, tok, qcfg.max_seq_len) if texts else None
    oneshot(model=model, tokenizer=tok, dataset=dataset, recipe=recipe_fn(), max_seq_length=qcfg.max_seq_len,
            num_calibration_samples=max(1, len(texts)), shuffle_calibration_samples=False)
    model.save_pretrained(out_dir, save_compressed=True)  # compressed-tensors packed format
    tok.save_pretrained(out_dir)
    return model


def gptq(qcfg: QuantConfig, model_dir: Path, texts: Sequence[str], out_dir: Path):
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = _weight_args(qcfg.bits, qcfg.group_size)
    recipe = lambda: [GPTQModifier(config_groups=_scheme(weights), ignore=KEEP)]  # noqa: E731
    return _oneshot_and_save(model_dir, out_dir, texts, qcfg, recipe, qcfg.group_size)


def smoothquant_gptq(qcfg: QuantConfig, model_dir: Path, texts: Sequence[str], out_dir: Path):
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    # W8A8 uses per-channel weight scales (the int8 kernels' layout); W4A8 uses groups like W4A16.
    group = None if qcfg.bits == 8 else qcfg.group_size
    scheme = _scheme(_weight_args(qcfg.bits, group), _act_args(qcfg.act_bits or 8))
    recipe = lambda: [SmoothQuantModifier(smoothing_strength=qcfg.smoothing_alpha),  # noqa: E731
                      GPTQModifier(config_groups=scheme, ignore=KEEP)]
    return _oneshot_and_save(model_dir, out_dir, texts, qcfg, recipe, group)


def int8_weight(qcfg: QuantConfig, model_dir: Path, texts: Sequence[str], out_dir: Path):
    """Round-to-nearest int8 per-channel weights (torchao's int8 weight-only recipe), no calibration data.

    Done with llm-compressor's QuantizationModifier rather than torchao so the output is the same
    compressed-tensors format as GPTQ and needs no extra dependency to reload.
    """
    from llmcompressor.modifiers.quantization import QuantizationModifier

    recipe = lambda: [QuantizationModifier(config_groups=_scheme(_weight_args(8, None)), ignore=KEEP)]  # noqa: E731
    return _oneshot_and_save(model_dir, out_dir, (), qcfg, recipe, None)


# ---- bitsandbytes methods ---------------------------------------------------------------------------

def _bnb(bits: int, model_dir: Path, out_dir: Path):
    import torch
    from transformers import BitsAndBytesConfig

    from stemqa.models import load_causal_lm, load_tokenizer

    device = _device()
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    qconf = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP) if bits == 8 else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                llm_int8_skip_modules=KEEP))
    model = load_causal_lm(str(model_dir), quantization_config=qconf, device_map={"": device})
    # Save before any forward pass: bitsandbytes' CPU backend repacks 4-bit weights in place on the first
    # forward (measured: [2048, 1] -> [64, 32] for a 64x64 layer), and a model saved after that reloads wrong.
    model.save_pretrained(out_dir)
    load_tokenizer(str(model_dir)).save_pretrained(out_dir)
    return model


def bnb_8bit(qcfg, model_dir, texts, out_dir):
    return _bnb(8, model_dir, out_dir)


def bnb_4bit(qcfg, model_dir, texts, out_dir):
    return _bnb(4, model_dir, out_dir)


# ---- quantization-aware training ---------------------------------------------------------------------

def qat(qcfg: QuantConfig, model_dir: Path, texts: Sequence[str], out_dir: Path):
    from stemqa.models import load_causal_lm, load_tokenizer
    from stemqa.quant import qat as qat_lib

    model = load_causal_lm(str(model_dir))
    tok = load_tokenizer(str(model_dir))
    check_group_size(model, qcfg.group_size)
    qat_lib.prepare(model, qcfg.bits, qcfg.group_size, tok(texts[0], return_tensors="pt").input_ids)
    qat_lib.train(model, tok, texts, qcfg)
    qat_lib.export(model, qcfg, out_dir, tok)
    return model


# ---- what each method needs -------------------------------------------------------------------------

def _modules(*names: str) -> Callable[[], list[str]]:
    def check() -> list[str]:
        missing = []
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError as e:
                missing.append(f"the Python package '{name}' ({e})")
        return missing
    return check


def _bnb_backend() -> list[str]:
    """bitsandbytes >= 0.46 has a CPU backend; probe it with a real 4-bit quantize on this device."""
    missing = _modules("bitsandbytes")()
    if missing:
        return missing
    import bitsandbytes as bnb
    import torch

    device = _device()
    try:
        bnb.functional.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
    except Exception as e:  # noqa: BLE001 - any failure here means the backend is unusable
        return [f"a bitsandbytes {bnb.__version__} backend for {device} ({type(e).__name__}: {e}); "
                "bitsandbytes needs a CUDA GPU or a build with a CPU backend (>= 0.46)"]
    return []


@dataclass(frozen=True)
class Method:
    run: Callable[[QuantConfig, Path, Sequence[str], Path], Any]
    needs: Callable[[], list[str]]
    calibrated: bool  # uses calibration samples
    bits: Callable[[QuantConfig], int]
    act_bits: Callable[[QuantConfig], Optional[int]]
    group_size: Callable[[QuantConfig], Optional[int]]
    allowed_bits: tuple[int, ...]


_LLMC = _modules("llmcompressor", "compressed_tensors")
METHODS: dict[str, Method] = {
    "gptq": Method(gptq, _LLMC, True, lambda q: q.bits, lambda q: None, lambda q: q.group_size, QUANT_BITS["gptq"]),
    "smoothquant-gptq": Method(smoothquant_gptq, _LLMC, True, lambda q: q.bits, lambda q: q.act_bits or 8,
                               lambda q: None if q.bits == 8 else q.group_size, QUANT_BITS["smoothquant-gptq"]),
    "int8-weight": Method(int8_weight, _LLMC, False, lambda q: 8, lambda q: None, lambda q: None, (8,)),
    "bnb-8bit": Method(bnb_8bit, _bnb_backend, False, lambda q: 8, lambda q: None, lambda q: None, (8,)),
    "bnb-4bit": Method(bnb_4bit, _bnb_backend, False, lambda q: 4, lambda q: None, lambda q: None, (4,)),
    "qat": Method(qat, _modules("torchao", "llmcompressor", "compressed_tensors"), True, lambda q: q.bits,
                  lambda q: None, lambda q: q.group_size, QUANT_BITS["qat"]),
}


def get_method(qcfg: QuantConfig) -> Method:
    """The table entry for `qcfg.method`, after checking the settings and that this machine can run it."""
    if qcfg.method not in METHODS:
        raise UnsupportedMethodError(
            f"quant.method={qcfg.method!r} is not available in this build of stemqa "
            f"(available: {', '.join(METHODS)})")
    method = METHODS[qcfg.method]
    if method.bits(qcfg) not in method.allowed_bits:  # the config checks this at load; a constructed one may not
        raise QuantError(f"quant.bits={qcfg.bits} is not supported by {qcfg.method} (supported: {method.allowed_bits})")
    missing = method.needs()
    if missing:
        raise UnsupportedMethodError(f"quant.method={qcfg.method!r} cannot run on this machine; missing: "
                                     + "; ".join(missing))
    return method


def missing_requirements(method: str) -> list[str]:
    """What this machine lacks to run `method` (empty when it can run it); for reports that list every row."""
    if method not in METHODS:
        return [f"an implementation of '{method}' in stemqa.quant"]
    return METHODS[method].needs()
