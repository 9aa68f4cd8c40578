"""The search space of `visionflow tune`: a YAML file naming PipelineParams fields and their ranges,
validated against PipelineParams before any trial starts, and turned into Optuna distributions.

    study: digits-lr               # optional: the study's name (resume = the same name)
    pruner: median                 # median | successive_halving | none
    warmup_epochs: 1               # epochs every trial trains before it may be pruned
    startup_trials: 3              # trials TPE samples at random (and the median pruner waits for)
    seed: 0
    params:
      train.lr: {low: 0.0005, high: 0.05, log: true}
      train.batch_size: {low: 16, high: 64, step: 16}
      train.optimizer: {choices: [sgd, adam]}

A range with integer bounds (and integer step) is an int range; anything with `choices` is categorical.
The objective is the trial's best validation accuracy (`best_val_acc`), maximized; the pruner sees
`val/acc` after every epoch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.config import ParamsError, load_params, params_to_flat_dict
from components.errors import VisionflowError

OBJECTIVE_METRIC = "best_val_acc"  # logged once by the train task: the best epoch's val/acc (val/map: multi-label)
EPOCH_METRIC = "val/acc"  # fed to the pruner every epoch (a multi-label trial reports val/map, as its checkpoint)


class SpaceError(VisionflowError):
    """The search space cannot be used (unknown field, impossible range, another study's space)."""


class ParamRange(BaseModel):
    """One searched parameter: a numeric range (low..high, optional step, log scale) or a list of choices."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["int", "float", "categorical"] | None = None  # default: the field's type in PipelineParams
    low: int | float | None = None
    high: int | float | None = None
    step: int | float | None = None
    log: bool = False
    choices: list[Any] | None = None

    def kind(self) -> Literal["int", "float", "categorical"]:
        if self.choices is not None:
            return "categorical"
        if self.type is not None:
            return self.type
        whole = [v for v in (self.low, self.high, self.step) if v is not None]
        return "int" if all(isinstance(v, int) for v in whole) else "float"


class SearchSpace(BaseModel):
    """A validated search space (see the module docstring for the file format)."""

    model_config = ConfigDict(extra="forbid")

    study: str | None = None
    pruner: Literal["median", "successive_halving", "none"] = "median"
    warmup_epochs: int = Field(1, ge=0)
    startup_trials: int = Field(3, ge=0)
    seed: int | None = 0
    params: dict[str, ParamRange] = Field(min_length=1)

    def fingerprint(self) -> str:
        """What makes two spaces the same search: the ranges (not the study name, pruner or seed)."""
        ranges = {k: v.model_dump() for k, v in sorted(self.params.items())}
        return hashlib.sha256(json.dumps(ranges, sort_keys=True).encode()).hexdigest()[:16]


def _range_problem(name: str, spec: ParamRange) -> str | None:
    if spec.choices is not None:
        if spec.low is not None or spec.high is not None or spec.step is not None or spec.log:
            return f"{name}: give either choices or low/high, not both"
        return None if spec.choices else f"{name}: choices is empty"
    if spec.low is None or spec.high is None:
        return f"{name}: a range needs low and high (or choices)"
    if spec.low >= spec.high:
        return f"{name}: impossible range, low {spec.low:g} is not below high {spec.high:g}"
    if spec.log and spec.low <= 0:
        return f"{name}: a log range needs low > 0 (got {spec.low:g})"
    if spec.log and spec.step is not None:
        return f"{name}: a log range takes no step"
    if spec.step is not None and not 0 < spec.step <= spec.high - spec.low:
        return f"{name}: step {spec.step:g} does not fit in {spec.low:g}..{spec.high:g}"
    return None


def _values_to_check(spec: ParamRange) -> list[Any]:
    if spec.choices is not None:
        return list(spec.choices)
    bounds = [spec.low, spec.high]
    return [int(v) for v in bounds] if spec.kind() == "int" else bounds


def scalar(value: Any) -> str:
    """A value as an override's text that reads back as the same value (1e-05 → 1.0e-05, which YAML reads
    as a float)."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def overrides_for(values: dict[str, Any]) -> list[str]:
    """`key=value` overrides (load_params' --set syntax) for one trial's sampled values."""
    return [f"{key}={scalar(value)}" for key, value in values.items()]


def parse_space(raw: Any, source: str) -> SearchSpace:
    """Validate a search space's structure and ranges (not yet against PipelineParams)."""
    if not isinstance(raw, dict):
        raise SpaceError(f"invalid search space {source}: the top level must be a mapping with params:")
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise SpaceError(f"invalid search space {source}: {where}: {message}") from None
    for name, spec in space.params.items():
        problem = _range_problem(name, spec)
        if problem:
            raise SpaceError(f"invalid search space {source}: {problem}")
    return space


def load_space(path: str | Path, params_file: str | None = None, sets: list[str] | None = None) -> SearchSpace:
    """Read and validate a search space file; every searched value must make valid PipelineParams on top of
    `params_file` and `sets` (an unknown field or an out-of-range bound fails here, before any trial).

    Raises SpaceError with one line naming the file and the parameter.
    """
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"invalid YAML in search space {path}: {getattr(err, 'problem', err)}") from None
    space = parse_space(raw, str(path))
    base = params_to_flat_dict(load_params(params_file, sets))
    for name, spec in space.params.items():
        if spec.type is None and spec.choices is None and isinstance(base.get(name), float):
            spec.type = "float"  # a float field searched with whole-number bounds (dropout 0..1) stays a float
        if spec.kind() == "int" and not all(float(v).is_integer() for v in (spec.low, spec.high, spec.step or 1)):
            raise SpaceError(f"invalid search space {path}: {name} is an int range with fractional bounds")
        for value in _values_to_check(spec):
            try:
                load_params(params_file, [*(sets or []), f"{name}={scalar(value)}"])
            except ParamsError as err:
                raise SpaceError(f"invalid search space {path}: {name}={value!r} gives {err}") from None
    return space
