"""Search spaces for `stemqa sweep`: the `SweepConfig` schema, loading (the spaces shipped in stemqa/tune/spaces,
or a file), and trial configs.

A space names config fields by dotted path (`sft.lr`, `dpo.beta`, `quant.group_size`) into the one config tree
(`stemqa.config.schema.StemqaConfig`). Loading checks every path against that schema and every value a trial
could get (each grid/choice entry, both ends of a range, each paired entry) by building the trial's config, so a
typo or an out-of-range value fails before Ray starts, naming the YAML path (`params.sft.grad_accum.choice[2]`).

Three ways to combine values (as Axolotl's sweeps): `grid` (every combination), random draws (`choice`,
`uniform`, `loguniform`, `randint`; `num_samples` draws, each crossed with the grid), and `paired` lists whose
entries set several fields together (e.g. LoRA with its own learning rate), crossed with the rest.
"""
from __future__ import annotations

import copy
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stemqa.config.load import ConfigError, load_config, validate
from stemqa.config.schema import StemqaConfig

SPACE_DIR = Path(__file__).resolve().parent / "spaces"  # package data: found wherever stemqa is installed
TRIAL_PREFIX = "trial."  # per-trial switches that are not config fields (fault injection)
TRIAL_KEYS = {"trial.fail_at_step": "rank 0 of the trial's Ray Train run (or, trial_mode local, the trial process) "
                                    "exits at this optimizer step, and the trial fails (fault injection, to show a "
                                    "crashing trial is recorded)"}
PAIRED_KEY = "_paired"  # key of the paired entries in the Tune param_space


def sweepable_stage(name: str):
    """The stage a space sweeps: one that says what its trials report (`Stage.Report`)."""
    from stemqa.stages import get, names

    stage = get(name) if name in names() else None
    if stage is None or stage.Report is None:
        able = [n for n in names() if get(n).Report is not None]
        raise ValueError(f"stage {name!r} cannot be swept (stages with sweeps: {', '.join(able)})")
    return stage


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Strict):
    """One swept field: exactly one of the keys below. A bare YAML list is short for `grid`."""

    grid: Optional[list[Any]] = Field(None, description="Every value is tried (crossed with other grids).")
    choice: Optional[list[Any]] = Field(None, description="Each draw picks one value at random.")
    uniform: Optional[tuple[float, float]] = Field(None, description="[low, high]: a float drawn uniformly.")
    loguniform: Optional[tuple[float, float]] = Field(None, description="[low, high], both > 0: a float drawn "
                                                      "uniformly in log space (learning rates).")
    randint: Optional[tuple[int, int]] = Field(None, description="[low, high]: an integer, high inclusive.")

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {kinds or 'none'})")
        values = getattr(self, kinds[0])
        if kinds[0] in ("grid", "choice") and not values:
            raise ValueError(f"{kinds[0]}: needs at least one value")
        if kinds[0] in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{kinds[0]}: low must be below high, got {list(values)}")
        if kinds[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {values[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values a trial could get that are checked at load time: every listed value; both ends and an
        interior point of a range (the interior one catches a float range on an integer field)."""
        v = getattr(self, self.kind)
        if self.kind in ("grid", "choice"):
            return list(v)
        if self.kind == "loguniform":
            return [v[0], math.sqrt(v[0] * v[1]), v[1]]
        if self.kind == "uniform":
            return [v[0], (v[0] + v[1]) / 2, v[1]]
        return [v[0], v[1]]

    def tune_domain(self):
        from ray import tune

        v = getattr(self, self.kind)
        return {"grid": lambda: tune.grid_search(list(v)), "choice": lambda: tune.choice(list(v)),
                "uniform": lambda: tune.uniform(*v), "loguniform": lambda: tune.loguniform(*v),
                "randint": lambda: tune.randint(v[0], v[1] + 1)}[self.kind]()


class SchedulerSpec(_Strict):
    type: Literal["asha", "fifo"] = Field("asha", description="asha: stop trials behind at each rung "
                                          "(AsyncHyperBand); fifo: run every trial to the end.")
    time_attr: str = Field("step", description="Reported counter ASHA measures progress in (optimizer steps).")
    grace_period: int = Field(2, ge=1, description="ASHA: no trial is stopped before this many time units.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung.")
    max_t: Optional[int] = Field(None, ge=1, description="ASHA: the longest a trial runs; default: the stage's "
                                 "max_steps of the base config.")


class SweepResources(_Strict):
    trial_cpus: float = Field(0.1, gt=0, description="CPUs the Tune trial itself holds (it only waits on its Ray "
                              "Train run; 0.1 so trial + Train workers fit on 2 CPUs, see ray-on-small-machines).")
    max_concurrent_trials: int = Field(2, ge=1, description="Trials running at once; with the stage's "
                                       "resources.num_workers x cpus_per_worker each, they must fit the cluster.")
    trial_mode: Literal["auto", "train", "local"] = Field(
        "auto", description="How a training trial (sft, dpo) trains. train: a Ray Train run per trial (TorchTrainer: "
        "controller, placement group, worker processes; 27 s of overhead a tiny trial on 2 CPUs, BENCHMARKS.md). local: the "
        "same training loop in the Tune trial process itself, which then holds the CPUs its one worker would have "
        "held (trial_cpus + cpus_per_worker); reports go to Tune at every validation and checkpoints where a Train "
        "run keeps them, so ASHA and resuming work alike; one CPU rank only (num_workers: 1, no GPU, not dpo), "
        "else rejected at load. auto: local when every trial the space can make trains one worker on CPU (and "
        "the stage allows it), else train.")


class SweepConfig(_Strict):
    """A Ray Tune sweep over one stage (tune_spaces/*.yaml)."""

    stage: str = Field(description="What each trial runs: sft or dpo (a Ray Train run), quant (quantize + "
                       "evaluate): the stage's own `run`.")
    base: str = Field("demo", description="Config every trial starts from: a preset or a YAML file "
                      "(`stemqa sweep --config` replaces it).")
    fixed: dict[str, Any] = Field(default_factory=dict, description="dotted.path: value set for every trial "
                                  "(e.g. model.name, sft.max_steps).")
    params: dict[str, Any] = Field(default_factory=dict, description="dotted.path: what to "
                                                           "sweep (grid / choice / uniform / loguniform / randint).")
    paired: list[dict[str, Any]] = Field(default_factory=list, description="Entries that each set several paths "
                                         "together; one trial per entry, crossed with the grid and the draws.")
    num_samples: int = Field(1, ge=1, description="Random draws; each is crossed with every grid/paired combination.")
    metric: Optional[str] = Field(None, description="Reported metric to optimise, a field of the stage's report "
                                  "(stemqa.stages.<stage>.Report); default per stage: eval_loss (sft), "
                                  "val_reward_accuracy_best (dpo), accuracy (quant).")
    mode: Optional[Literal["min", "max"]] = Field(None, description="Minimise or maximise `metric` (default per stage).")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: SweepResources = Field(default_factory=SweepResources)
    seed: int = Field(0, description="Seed of the random draws, so a sweep is repeatable.")
    keep_models: bool = Field(False, description="Keep every trial's model; by default only metrics are kept "
                              "(re-train the best with best.yaml).")
    time_budget_s: Optional[float] = Field(None, gt=0, description="Stop the whole sweep after this many seconds.")
    eval_limit: int = Field(40, ge=1, description="quant: questions per eval set scored for each trial.")

    @model_validator(mode="after")
    def _defaults(self):
        stage = sweepable_stage(self.stage)
        reported = list(stage.Report.model_fields)  # Tune rejects a report without the scheduler's metric
        if self.metric is not None and self.metric not in reported:
            raise ValueError(f"metric {self.metric!r} is not reported by every {self.stage} trial report; "
                             f"one of {', '.join(reported)}")
        metric, mode = stage.default_metric
        self.metric = self.metric or metric
        self.mode = self.mode or mode
        return self

    @field_validator("params", mode="before")
    @classmethod
    def _specs(cls, params):
        """A bare list is a grid; anything else must be one ParamSpec (errors name the swept path)."""
        if not isinstance(params, dict):
            raise ValueError("params must map dotted.path -> spec")
        out = {}
        for key, spec in params.items():
            try:
                out[key] = spec if isinstance(spec, ParamSpec) else ParamSpec.model_validate(
                    {"grid": spec} if isinstance(spec, list) else spec)
            except ValidationError as e:
                msgs = "; ".join((f"{'.'.join(map(str, x['loc']))}: " if x["loc"] else "") + x["msg"]
                                 for x in e.errors())
                raise ValueError(f"{key}: {msgs}") from None
        return out


# ---------------------------------------------------------------- dotted paths into the config tree
def _model_of(annotation) -> Optional[type]:
    """The pydantic model a field holds (also through Optional[...]), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def check_path(path: str) -> None:
    """Raise ValueError unless `path` names a field of StemqaConfig (or a trial.* switch)."""
    if path.startswith(TRIAL_PREFIX):
        if path not in TRIAL_KEYS:
            raise ValueError(f"unknown trial switch (known: {', '.join(TRIAL_KEYS)})")
        return
    model: Optional[type] = StemqaConfig
    for i, part in enumerate(path.split(".")):
        if model is None or part not in model.model_fields:
            where = ".".join(path.split(".")[:i]) or "the config root"
            raise ValueError(f"unknown config field {part!r} under {where}")
        model = _model_of(model.model_fields[part].annotation)


def set_path(data: dict, path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):  # a null section (sft.lora: null) gets a mapping
            node[part] = {}
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)


def flat_params(params: dict) -> dict[str, Any]:
    """A trial's Tune config ({path: value, '_paired': {path: value}}) as one {path: value} mapping."""
    out = {k: v for k, v in params.items() if k != PAIRED_KEY}
    out.update(params.get(PAIRED_KEY) or {})
    return out


def split_trial(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """{path: value} -> (config fields, trial.* switches)."""
    cfg = {k: v for k, v in values.items() if not k.startswith(TRIAL_PREFIX)}
    return cfg, {k[len(TRIAL_PREFIX):]: v for k, v in values.items() if k.startswith(TRIAL_PREFIX)}


def apply_values(base: StemqaConfig, values: dict[str, Any], origin: str = "<sweep>") -> StemqaConfig:
    """A trial's config: `base` with {dotted.path: value} set (trial.* switches ignored), validated."""
    data = base.model_dump(mode="json")
    for path, value in values.items():
        if not path.startswith(TRIAL_PREFIX):
            set_path(data, path, value)
    return validate(data, origin)


# ---------------------------------------------------------------- loading
@dataclass
class Space:
    """A loaded sweep: its settings, the base config of every trial, and where it came from."""

    sweep: SweepConfig
    base: StemqaConfig
    path: str
    trial_mode: Literal["train", "local"] = "train"  # sweep.resources.trial_mode resolved at load (`load_space`)

    def trial_config(self, params: dict) -> StemqaConfig:
        return apply_values(self.base, split_trial(flat_params(params))[0], f"{self.path} (trial)")

    def param_space(self) -> dict:
        """The Tune param_space: one entry per swept path, plus the paired entries as one grid."""
        from ray import tune

        space = {path: spec.tune_domain() for path, spec in self.sweep.params.items()}
        if self.sweep.paired:
            space[PAIRED_KEY] = tune.grid_search([dict(e) for e in self.sweep.paired])
        return space

    def swept_paths(self) -> list[str]:
        paths = list(self.sweep.params)
        for entry in self.sweep.paired:
            paths += [p for p in entry if p not in paths]
        return paths

    def max_t(self) -> int:
        """ASHA's horizon: scheduler.max_t, else just past the stage's max_steps (or no horizon without one)."""
        if self.sweep.scheduler.max_t:
            return self.sweep.scheduler.max_t
        # +1: ASHA stops a trial whose time reaches max_t, which must not cut a trial's own last report
        stage_cfg = getattr(self.base, self.sweep.stage)
        return (getattr(stage_cfg, "max_steps", None) or 10**6) + 1


def _pydantic_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key (not in the sweep schema)" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.replace("Value error, ", "")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _check_values(base: StemqaConfig, fixed: dict, path: str, values: list, where: str, origin: str,
                  indexed: bool = True, seen: Optional[list] = None) -> None:
    """Each value's trial config must validate; `seen` gets (YAML path, config) of each."""
    for i, value in enumerate(values):
        at = f"{where}[{i}]" if indexed else where
        if path.startswith(TRIAL_PREFIX):
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{origin}: {at} = {value!r}: {path} must be a step >= 1 or null")
            continue
        try:
            cfg = apply_values(base, {**fixed, path: value}, origin)
        except ConfigError as e:
            detail = str(e).split("\n", 1)[-1].strip()
            raise ConfigError(f"{origin}: {at} = {value!r} is not a valid {path}: {detail}") from None
        if seen is not None:
            seen.append((f"{at} = {value!r}", cfg))


def resolve_trial_mode(stage, sweep: SweepConfig, trial_cfgs: list[tuple[str, StemqaConfig]], origin: str) -> str:
    """resources.trial_mode as 'train' or 'local' for the whole sweep (one Tune setting, reuse of trial actors,
    follows from it): `trial_cfgs` are (where, config) of the base config and of every value a trial could get."""
    wanted = sweep.resources.trial_mode
    if wanted == "train":
        return "train"
    problems = [(where, p) for where, cfg in trial_cfgs for p in [stage.in_process_problem(cfg)] if p]
    if not problems:
        return "local"
    if wanted == "local":
        where, problem = problems[0]
        raise ConfigError(f"{origin}: resources.trial_mode: local trains each trial in its own Tune trial process, "
                          f"one rank on CPU, but {where}: {problem}; use trial_mode: train (or auto)")
    return "train"


def resolve_space_path(source: str) -> Path:
    """A space file, or the name of one shipped with stemqa (`sft` -> stemqa/tune/spaces/sft.yaml)."""
    path = Path(source)
    if not path.exists() and (SPACE_DIR / f"{source}.yaml").exists():
        path = SPACE_DIR / f"{source}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
        raise ConfigError(f"{source}: no such search space file (built-in spaces: {known})")
    return path


def load_space(source: str, base: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Space:
    """Load and check a space file: schema, dotted paths, and every value a trial could get.

    `base` (a preset or config file) replaces the space's own `base`; `overrides` (`a.b=v`) apply to it, as for
    every stage. Errors are ConfigError naming the file and the YAML path of the bad entry.
    """
    path = resolve_space_path(source)
    origin = str(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{origin}: invalid search space\n{_pydantic_errors(e)}") from None
    # a relative `base:` file is looked up beside the space file first (`--config` is the caller's own path)
    base_cfg = load_config(base or sweep.base, overrides, relative_to=None if base else path.parent)
    for key in list(sweep.fixed) + list(sweep.params) + [k for e in sweep.paired for k in e]:
        where = (f"fixed.{key}" if key in sweep.fixed else f"params.{key}" if key in sweep.params else f"paired: {key}")
        try:
            check_path(key)
        except ValueError as e:
            raise ConfigError(f"{origin}: {where}: {e}") from None
    fixed_cfg, _ = split_trial(sweep.fixed)
    try:
        base_cfg = apply_values(base_cfg, fixed_cfg, origin)
    except ConfigError as e:
        raise ConfigError(f"{origin}: fixed: {str(e).split(chr(10), 1)[-1].strip()}") from None
    trial_cfgs = [("the base config with `fixed`", base_cfg)]
    for key, spec in sweep.params.items():
        _check_values(base_cfg, {}, key, spec.probe_values(), f"params.{key}.{spec.kind}", origin, seen=trial_cfgs)
    for i, entry in enumerate(sweep.paired):
        for key, value in entry.items():
            _check_values(base_cfg, {k: v for k, v in entry.items() if k != key and not k.startswith(TRIAL_PREFIX)},
                          key, [value], f"paired[{i}].{key}", origin, indexed=False, seen=trial_cfgs)
    overlap = set(sweep.params) & {k for e in sweep.paired for k in e}
    if overlap:
        raise ConfigError(f"{origin}: {sorted(overlap)} both in params and paired; give each path once")
    stage = sweepable_stage(sweep.stage)
    problem = stage.sweep_problem(base_cfg, sweep)
    if problem:
        raise ConfigError(f"{origin}: {problem}")
    uses_fault = any(k.startswith(TRIAL_PREFIX) for k in [*sweep.fixed, *sweep.params, *(k for e in sweep.paired for k in e)])
    if uses_fault and not stage.fault_injection:
        raise ConfigError(f"{origin}: trial.fail_at_step needs a training stage (sft or dpo), not {sweep.stage}")
    return Space(sweep=sweep, base=base_cfg, path=origin,
                 trial_mode=resolve_trial_mode(stage, sweep, trial_cfgs, origin))
