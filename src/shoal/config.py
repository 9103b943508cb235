"""The run configuration: pydantic models for everything a training run needs.

Every field is validated before any process starts: unknown keys, wrong types
and impossible values raise :class:`ConfigError` naming the field and what is
allowed. The CLI turns that into one message and exit code 2.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from shoal.registry import CODECS, DATASETS, MODELS, PRIVACY, STRATEGIES, TASKS, Component, Registry, load_builtins


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field."""


def _component(registry: Registry[Any]) -> Any:
    def validate(value: Any) -> Component:
        load_builtins(registry)
        return registry.resolve(value)

    return Annotated[
        Component,
        BeforeValidator(validate),
        PlainSerializer(lambda c: c.to_config(), return_type=Any),
    ]


DatasetSpec = _component(DATASETS)
ModelSpec = _component(MODELS)
StrategySpec = _component(STRATEGIES)
CodecSpec = _component(CODECS)
TaskSpec = _component(TASKS)
PrivacySpec = _component(PRIVACY)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_default=True)


class DataConfig(_Strict):
    dataset: DatasetSpec = Field("mnist1d", description="registered dataset spec or 'pkg.mod:function'")
    batch_size: int = Field(32, ge=1, description="samples per worker per step")
    eval_batch_size: int = Field(1000, ge=1)


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)


class ScheduleConfig(_Strict):
    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    step_size: int = Field(1000, ge=1, description="steps between decays for 'step'")
    gamma: float = Field(0.1, gt=0, le=1)


class EarlyStoppingConfig(_Strict):
    """End the run when the task's main metric stops improving."""

    patience: int = Field(..., ge=1, description="evaluations in a row without an improvement of at least "
                          "min_delta that end the run")
    min_delta: float = Field(0.0, ge=0, description="the smallest change of the main metric that counts "
                             "as an improvement")


class TrainConfig(_Strict):
    steps: int | None = Field(None, ge=1, description="optimizer steps; or give epochs")
    epochs: float | None = Field(None, gt=0)
    eval_every: int = Field(100, ge=1, description="steps between test-set evaluations")
    target: float | None = Field(None, description="target of the task's main metric: reached at >= for a "
                                 "higher-is-better metric (accuracy), <= for a lower-is-better one (mse, perplexity)")
    target_accuracy: float | None = Field(None, gt=0, le=1, description="classification: the same as "
                                          "train.target")
    stop_at_target: bool = False
    keep_best: bool = Field(False, description="write OUT/best.pt whenever an evaluation improves the best main "
                            "metric so far")
    early_stopping: EarlyStoppingConfig | None = Field(None, description="stop when the main metric has not "
                                                       "improved for `patience` evaluations")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    init_from: str | None = Field(None, description="start from these weights: a run directory (its "
                                  "checkpoint.pt) or a checkpoint file of the same model (fine-tuning)")
    log_every: int = Field(1, ge=1, description="steps between metrics.jsonl lines")
    tensorboard: bool = Field(True, description="also write metrics.jsonl's scalars as TensorBoard event "
                              "files in OUT/tensorboard/")
    # shoal.engine.recipe: how a strategy's step makes its gradients and its update.
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="bf16: autocast forward and loss "
                                                       "(CPU and GPU); fp16: autocast with a gradient scaler "
                                                       "(CUDA only)")
    accumulate: int = Field(1, ge=1, description="micro-batches per step: the batch is split, gradients add up, "
                            "DDP communicates once")
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the gradient's global L2 norm to this "
                                         "before the optimizer step")

    @field_validator("init_from")
    @classmethod
    def _weights_exist(cls, value: str | None) -> str | None:
        if value is not None:
            path = Path(value)
            if not (path / "checkpoint.pt" if path.is_dir() else path).is_file():
                raise ValueError(f"{value}: no checkpoint there (a run directory with checkpoint.pt, "
                                 f"or a checkpoint file)")
        return value

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give train.steps or train.epochs, not both")
        if self.steps is None and self.epochs is None:
            self.steps = 1000
        if self.target is not None and self.target_accuracy is not None:
            raise ValueError("give train.target or train.target_accuracy, not both")
        return self

    @property
    def main_target(self) -> float | None:
        """The target of the task's main metric: ``target``, or ``target_accuracy`` (classification)."""
        return self.target if self.target is not None else self.target_accuracy


class FaultConfig(_Strict):
    """Injected failure, to test recovery: SIGKILL one worker at one step, first attempt only."""

    kill_rank: int | None = Field(None, ge=0, description="the worker to kill")
    kill_step: int = Field(1, ge=1, description="after this training step")
    target: Literal["worker", "server"] = Field(
        "worker", description="worker: the training process; server: the process serving its parameter shard "
        "(parameter-server strategies)")


class SlowdownConfig(_Strict):
    """Emulated unequal hardware (see shoal.netem.slowdown)."""

    factors: dict[int, float] = Field(default_factory=dict, description="global rank -> compute slowdown >= 1")
    method: Literal["auto", "cgroup", "busy"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "SlowdownConfig":
        for rank, factor in self.factors.items():
            if rank < 0:
                raise ValueError(f"factors: rank {rank} must be >= 0")
            if not 1 <= factor <= 100:
                raise ValueError(f"factors: rank {rank}'s factor {factor} must be in [1, 100]")
        return self


class PruneConfig(_Strict):
    """Sparse training with global magnitude masks (shoal.engine.sparsity)."""

    sparsity: float = Field(..., gt=0, lt=1, description="share of the prunable weights set to zero at the end")
    schedule: Literal["oneshot", "gradual"] = Field("gradual", description="oneshot: all at begin_step; "
                                                    "gradual: Zhu & Gupta's cubic ramp to end_step")
    begin_step: int = Field(0, ge=0, description="first pruning step (0: before the first step)")
    end_step: int | None = Field(None, ge=1, description="gradual: sparsity reached here (default: 3/4 of the run)")
    every: int = Field(10, ge=1, description="gradual: steps between mask updates")

    @model_validator(mode="after")
    def _ordered(self) -> "PruneConfig":
        if self.end_step is not None and self.end_step <= self.begin_step:
            raise ValueError(f"end_step {self.end_step} must come after begin_step {self.begin_step}")
        return self


class RunConfig(_Strict):
    """One training run."""

    seed: int = 0
    workers: int = Field(1, ge=1, le=1024, description="processes on this node")
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = "cnn1d"
    task: TaskSpec = Field("classification", description="what is minimised and measured: classification, "
                           "regression, language_model (options loss=, metrics=: 'pkg.mod:function')")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    strategy: StrategySpec = "sync"
    codec: CodecSpec = "none"
    train: TrainConfig = Field(default_factory=TrainConfig)
    slowdown: SlowdownConfig = Field(default_factory=SlowdownConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)
    prune: PruneConfig | None = Field(None, description="sparse training: global magnitude masks "
                                      "(shoal.engine.sparsity)")
    privacy: PrivacySpec | None = Field(None, description="sample-level differential privacy: "
                                        "dp_sgd:noise_multiplier=...,clip=... or dp_sgd:target_epsilon=...")
    out: str = "runs/latest"

    @model_validator(mode="after")
    def _privacy_fits_the_run(self) -> "RunConfig":
        if self.privacy is None:
            return self
        strategy = self.strategy
        if not getattr(strategy.target, "dp_sgd", False) or getattr(strategy.options, "backup", 0) \
                or getattr(strategy.options, "balance", "none") != "none":
            raise ValueError(f"privacy: dp_sgd runs under strategy sync (plain, without backup or balance), not "
                             f"{strategy.spec()!r}")
        if self.codec.name != "none":
            raise ValueError(f"codec: {self.codec.spec()!r} with privacy: dp_sgd all-reduces the noised gradient "
                             "as it is (allowed: none)")
        if self.train.precision != "fp32":
            raise ValueError("train.precision: privacy: dp_sgd computes per-example gradients in fp32 "
                             "(allowed: fp32)")
        if self.train.clip_grad_norm is not None:
            raise ValueError("train.clip_grad_norm: privacy: dp_sgd clips each example's gradient to its own clip= "
                             "(leave train.clip_grad_norm unset)")
        return self

    @model_validator(mode="after")
    def _codec_fits_strategy(self) -> "RunConfig":
        if self.codec.name != "none" and not getattr(self.strategy.target, "accepts_codec", True):
            raise ValueError(f"codec: strategy {self.strategy.name!r} takes no codec (allowed: none)")
        return self

    @model_validator(mode="after")
    def _target_fits_task(self) -> "RunConfig":
        task = self.task.target  # the class: its main metric is declared there
        if self.train.target_accuracy is not None and task.main_metric != "accuracy":
            raise ValueError(f"train.target_accuracy: task {self.task.name!r} measures no accuracy; give "
                             f"train.target for its main metric, {task.main_metric} "
                             f"({'higher' if task.higher_is_better else 'lower'} is better)")
        if self.train.target is not None:
            try:
                task.check_target(self.train.target)
            except ValueError as err:
                raise ValueError(f"train.target: {err} (the main metric of task {self.task.name!r})") from None
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def check_job(cfg: RunConfig, world_size: int) -> None:
    """Checks that need the job's size (workers x nodes) or this machine: a strategy's
    options may define ``check_job(world_size, batch_size)``, and the strategy must honour
    the train recipe (precision, accumulation, clipping). :class:`ConfigError` if one fails."""
    check_train_recipe(cfg)
    check = getattr(cfg.strategy.options, "check_job", None)
    if check is not None:
        try:
            check(world_size, cfg.data.batch_size)
        except ValueError as err:
            raise ConfigError(f"strategy: {err}") from None


def check_train_recipe(cfg: RunConfig) -> None:
    """:class:`ConfigError` when the run's strategy or codec cannot honour train.precision /
    accumulate / clip_grad_norm (any number of nodes: it needs no world size)."""
    if (cfg.train.precision, cfg.train.accumulate, cfg.train.clip_grad_norm) == ("fp32", 1, None):
        return
    try:
        check_recipe(cfg.train, cfg.strategy.target)
        residual = getattr(cfg.codec.options, "memory", None) == "ef" or cfg.codec.name == "powersgd"
        if cfg.train.precision == "fp16" and residual:
            # The scaler's first overflows would put inf into the residual, and every later
            # gradient with it: the scaler would skip every step from then on.
            raise ValueError(f"train.precision: fp16 with codec {cfg.codec.spec()!r} keeps scaled gradients in "
                             "a residual that an overflow poisons for good; use bf16 or a codec without one")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_recipe(train: Any, strategy: Any, *, cuda: bool | None = None) -> None:
    """ValueError naming the field when ``strategy`` (a registered class) cannot honour ``train``'s recipe."""
    support = getattr(strategy, "recipe_support", frozenset())
    name = getattr(strategy, "__name__", str(strategy))
    asked = {"precision": train.precision != "fp32", "accumulate": train.accumulate > 1,
             "clip_grad_norm": train.clip_grad_norm is not None}
    for field, used in asked.items():
        if used and field not in support:
            allowed = ", ".join(sorted(support)) or "none of precision, accumulate, clip_grad_norm"
            raise ValueError(f"train.{field}: {name} cannot honour it (it honours: {allowed})")
    if train.precision == "fp16":
        if "fp16" not in getattr(strategy, "precisions", ("bf16", "fp16")):
            raise ValueError(f"train.precision: fp16 needs an optimizer step in the worker, which {name} "
                             "does not take (its servers update); use bf16")
        if cuda is None:
            import torch  # here only: the config module itself stays free of torch

            cuda = torch.cuda.is_available()
        if not cuda:
            raise ValueError("train.precision: fp16 (a gradient scaler) needs CUDA, and this machine has no "
                             "GPU; bf16 runs on CPU and GPU")


def format_error(err: ValidationError) -> str:
    """One line per problem: ``field.path: what is wrong``."""
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        elif item["type"] == "literal_error":
            msg = msg.replace("Input should be", "allowed:")
        lines.append(f"{where}: {msg}" if where else msg)  # whole-config checks name their field
    return "; ".join(lines)


def set_dotted(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value read as YAML) to a nested mapping."""
    key, eq, raw = assignment.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.steps=500")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else {"name": child}
            node[part] = child
        node = child
    value = yaml.safe_load(raw) if raw.strip() else ""
    node[parts[-1]] = value


def load_config(
    source: str | Path | dict[str, Any] | RunConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **fields: Any,
) -> RunConfig:
    """Read a YAML path (or take a mapping / config), apply ``--set`` overrides
    and non-None ``fields``, and validate.

    Raises :class:`ConfigError` with a message naming each bad field.
    """
    return validate_config(gather(source, overrides, fields))


def gather(source: str | Path | dict[str, Any] | BaseModel | None, overrides: list[str] | tuple[str, ...],
           fields: dict[str, Any]) -> dict[str, Any]:
    """The raw mapping a config is validated from: a YAML path, a mapping or a
    validated config, then ``--set`` overrides, then non-None ``fields``."""
    if isinstance(source, BaseModel):
        data = source.model_dump(mode="json")
    elif isinstance(source, dict):
        data = copy.deepcopy(source)
    elif source is None:
        data = {}
    else:
        data = _read_yaml(Path(source))
    for item in overrides:
        set_dotted(data, item)
    for key, value in fields.items():
        if value is not None:
            data[key] = value
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return loaded or {}


def validate_config(data: dict[str, Any] | RunConfig) -> RunConfig:
    if isinstance(data, RunConfig):
        data = data.model_dump(mode="json")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_error(err)) from None
