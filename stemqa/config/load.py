"""Load a `StemqaConfig` from a preset name or YAML file plus `a.b.c=value` overrides.

Errors name the YAML path of the offending field (`sft.lora.r: Input should be ...`) and the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import ValidationError

from stemqa.config.schema import StemqaConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file and the field path."""


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def find_config(source: str, relative_to: Optional[Path] = None) -> Path:
    """A preset name, a YAML path relative to `relative_to` (the file that names it), or one relative to the
    working directory, in that order."""
    path = Path(source).expanduser()
    if source in available_presets() and not path.exists():
        return PRESET_DIR / f"{source}.yaml"
    if relative_to is not None and not path.is_absolute() and (relative_to / path).exists():
        return relative_to / path
    if not path.exists():
        raise ConfigError(f"{source}: neither a config file nor a preset (presets: {', '.join(available_presets())})")
    return path


def _resolve(source: str, relative_to: Optional[Path] = None) -> tuple[dict, str]:
    """A preset name or a YAML path -> raw mapping; a file may say `base: <preset or file>` to extend one (a
    relative file is looked up beside the file naming it first)."""
    path = find_config(source, relative_to)
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        try:
            base_data, _ = _resolve(str(base), path.parent)
        except (ConfigError, RecursionError) as e:  # RecursionError: a file that extends itself
            raise ConfigError(f"{path}: base {str(base)[:80]!r}: {str(e)[:300] or 'extends itself'}") from None
        data = _deep_merge(base_data, data)
    return data, str(path)


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.path=value")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None


def _format(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid config"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown field (not in the schema)" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")  # a cross-field check (model_validator) names its fields itself
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate(data: dict, origin: str = "<config>") -> StemqaConfig:
    try:
        return StemqaConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, origin)) from None


def load_config(source: Optional[str] = "demo", overrides: Iterable[str] = (),
                relative_to: Optional[Path] = None) -> StemqaConfig:
    """Load a preset (`demo`, `qwen3-0.6b`) or a YAML file, then apply `a.b=value` overrides. A relative file
    name is looked up in `relative_to` first (a search space's directory for its `base:`)."""
    data, origin = _resolve(source, relative_to) if source else ({}, "<defaults>")
    for item in overrides:
        _apply_override(data, item)
    cfg = validate(data, origin)
    if cfg.preset is None and source in available_presets():
        cfg.preset = source
    return cfg


def to_yaml(cfg: StemqaConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def dump_schema(model: Any = StemqaConfig, prefix: str = "") -> list[str]:
    """Every field with its type, default and description, one line each (for `stemqa config --schema`)."""
    from pydantic import BaseModel

    lines = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            lines.append(f"{path}:  {field.description or sub.__doc__ or ''}".rstrip())
            lines += dump_schema(sub, path + ".")
        else:
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            tname = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
            lines.append(f"{path} ({tname}, default {default}): {field.description or ''}".rstrip())
    return lines
