"""What a user submits to ``shoal serve``: a job spec, checked before anything is queued.

A spec is engine-neutral: it names what to run (``kind: train``, a shoal run config, inline or a
path; or ``kind: command``, any command line), how many workers (fixed, or elastic between
``min_workers`` and ``max_workers``), what each worker needs and where the job counts (user, queue,
priority). The service reads the user from the caller's token, never from the spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Resources(BaseModel):
    """What one worker needs; a job's gang is ``workers`` times this."""

    model_config = ConfigDict(extra="forbid")
    cpus: int = Field(1, ge=1, le=4096, description="CPU cores per worker (its cgroup's CPU set)")
    memory_mb: int = Field(1024, ge=16, le=16 * 1024 * 1024, description="memory per worker in MiB "
                           "(the job's cgroup limit is the sum; over it the kernel kills the job)")
    gpus: int = Field(0, ge=0, le=64, description="GPUs per worker (through CUDA_VISIBLE_DEVICES)")


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("job", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="a label for the job (letters, digits, '_', '.', '-')")
    kind: Literal["train", "command"] = Field(description="train: a shoal run config; command: any command line")
    config: str | dict[str, Any] | None = Field(None, description="kind=train: a run config's path (read when "
                                                "submitted) or the config itself")
    set: list[str] = Field([], max_length=64, description="kind=train: overrides, as shoal train --set KEY=VALUE")
    command: list[str] | None = Field(None, min_length=1, max_length=256, description="kind=command: the argv")
    workdir: str | None = Field(None, description="kind=command: the directory it runs in (default: its job "
                                "directory)")
    workers: int | None = Field(None, ge=1, le=1024, description="workers, all started together (a gang)")
    min_workers: int | None = Field(None, ge=1, le=1024, description="elastic: fewest workers it runs on")
    max_workers: int | None = Field(None, ge=1, le=1024, description="elastic: most workers it grows to")
    resources: Resources = Field(default_factory=Resources)
    priority: int = Field(0, ge=-100, le=100, description="higher runs first under the priority policy")
    queue: str = Field("default", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                       description="the queue whose share and quota it counts in")

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if self.kind == "train" and self.config is None:
            raise ValueError("config: kind=train needs a run config (a path or a mapping)")
        if self.kind == "command":
            if self.command is None:
                raise ValueError("command: kind=command needs a command line (a list of arguments)")
            if self.config is not None or self.set:
                raise ValueError("config: only kind=train takes a run config")
        elif self.command is not None:
            raise ValueError("command: only kind=command takes a command line")
        elastic = self.min_workers is not None or self.max_workers is not None
        if elastic and self.workers is not None:
            raise ValueError("workers: give either workers or min_workers/max_workers, not both")
        if elastic:
            if self.kind != "train":
                raise ValueError("min_workers: only kind=train jobs are elastic (they resume from checkpoints)")
            low, high = self.min_workers or 1, self.max_workers or self.min_workers or 1
            if low > high:
                raise ValueError(f"min_workers: {low} exceeds max_workers={high}")
            self.min_workers, self.max_workers = low, high
        elif self.workers is None:
            self.workers = 1
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None

    @property
    def fewest(self) -> int:
        return self.min_workers if self.elastic else self.workers  # type: ignore[return-value]

    @property
    def most(self) -> int:
        return self.max_workers if self.elastic else self.workers  # type: ignore[return-value]


def inline_config(spec: JobSpec, base: Path | None = None) -> JobSpec:
    """A train spec whose config is a path gets the file's contents (a job must not change when the file
    does); raises ``ValueError`` naming the path when it cannot be read or parsed."""
    if spec.kind != "train" or not isinstance(spec.config, str):
        return spec
    import yaml

    path = Path(spec.config)
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"config: cannot read {path}: {err}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config: {path} is not a mapping of config keys")
    return spec.model_copy(update={"config": loaded})


def check_run_config(spec: JobSpec) -> None:
    """A train spec's config and overrides must be a valid shoal run config (``ConfigError`` otherwise)."""
    if spec.kind != "train":
        return
    from shoal.config import load_config

    load_config(spec.config, list(spec.set), workers=spec.fewest)  # type: ignore[arg-type]
