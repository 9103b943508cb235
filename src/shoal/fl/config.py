"""The federated run configuration: one YAML file for ``shoal fl simulate``,
``shoal fl server`` and ``shoal fl client``.

It shares ``data``, ``model``, ``task`` and ``optimizer`` (the clients' local
optimiser) with ``shoal train``'s config and adds ``fl`` (the federation:
clients, rounds, partition, strategy, uplink codec, fleet conditions) and
``server`` (address, state database, certificates, limits). Bad values are a
:class:`~shoal.config.ConfigError` naming the field, as for ``shoal train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import ByteSize, Field, ValidationError, field_validator, model_validator

from shoal.config import (
    CodecSpec,
    ConfigError,
    DataConfig,
    ModelSpec,
    OptimizerConfig,
    PrivacySpec,
    TaskSpec,
    _component,
    _Strict,
    format_error,
    gather,
)
from shoal.registry import FED_STRATEGIES, PARTITIONS, SECURE

FedStrategySpec = _component(FED_STRATEGIES)
PartitionSpec = _component(PARTITIONS)
SecureSpec = _component(SECURE)
SECURE_STAGES = ("keys", "shares", "masked", "unmask")  # shoal.fl.secure.secagg.STAGES



def uplink_codecs() -> list[str]:
    """Codecs whose payload a server can decode alone (``Capabilities.standalone``)."""
    from shoal.comm.codecs.base import codecs_that

    return codecs_that("standalone")


class FleetConfig(_Strict):
    """The messy conditions of a real fleet, emulated."""

    dropout: float = Field(0.0, ge=0, lt=1, description="chance that a selected client never answers a round")
    slow_fraction: float = Field(0.0, ge=0, le=1, description="share of clients that are slow (fixed by the seed)")
    slow_factor: float = Field(1.0, ge=1, le=1000, description="how many times slower a slow client computes")
    local_epochs_max: int | None = Field(None, ge=1, description="if set, each client's local epochs are drawn "
                                         "once from [fl.local_epochs, this]")
    drop_stage: Literal["train", "keys", "shares", "masked", "unmask"] = Field(
        "train", description="under fl.secure: the protocol stage at which a client that drops out stops "
        "answering (train: before it starts; keys, shares, masked, unmask: from that stage on; under ckks "
        "any stage before unmask means no upload)")


class PrivacyConfig(_Strict):
    """Client-level differential privacy (``shoal.fl.privacy.dp_fedavg``): clip each update, noise the mean."""

    mechanism: Literal["dp_fedavg"] = Field("dp_fedavg", description="DP-FedAvg (McMahan et al. 2018)")
    noise_multiplier: Optional[float] = Field(None, description="Gaussian noise std as a multiple of the clip "
                                              "norm (on the sum of clipped updates), in [0.3, 1000]; none: "
                                              "calibrated to target_epsilon over fl.rounds")
    clip: float = Field(1.0, gt=0, description="L2 clip norm of one client's update (adaptive: the initial one)")
    adaptive: bool = Field(False, description="move the clip norm towards target_quantile of the update norms "
                           "(Andrew et al. 2021)")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: share of updates meant to be within "
                                   "the clip norm")
    clip_lr: float = Field(0.2, gt=0, description="adaptive: geometric learning rate of the clip norm")
    count_noise: Optional[float] = Field(None, gt=0, description="adaptive: noise std on the count of updates "
                                         "within the clip norm (none: clients_per_round / 20)")
    target_epsilon: Optional[float] = Field(None, gt=0, description="the privacy budget, a hard limit: no round "
                                            "starts that would spend more (none: account, do not stop)")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of the (epsilon, delta) guarantee")
    reproducible_noise: bool = Field(False, description="draw the noise from the run's seed (tests, research); "
                                     "default: from the operating system's entropy, so nobody who knows the "
                                     "config can subtract it")
    where: Literal["server", "client"] = Field("server", description="who clips: the server (trusted) or each "
                                               "client before its update leaves")

    @field_validator("noise_multiplier")
    @classmethod
    def _noise_in_range(cls, value: float | None) -> float | None:
        # Below the accountant's range PLD takes tens of seconds a figure (and epsilon is in the
        # hundreds for any useful run); above it the noise swamps any update.
        from shoal.privacy.accountant import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER

        if value is not None and not MIN_NOISE_MULTIPLIER <= value <= MAX_NOISE_MULTIPLIER:
            raise ValueError(f"must be in [{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}], got {value:g}")
        return value

    @model_validator(mode="after")
    def _noise_or_target(self) -> "PrivacyConfig":
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("noise_multiplier: give fl.privacy.noise_multiplier, or fl.privacy.target_epsilon "
                             "for shoal to calibrate it")
        return self


class FederationConfig(_Strict):
    clients: int = Field(100, ge=1, le=100_000, description="clients in the federation")
    clients_per_round: int = Field(10, ge=1, description="clients selected each round")
    min_clients: int = Field(1, ge=1, description="fewest results a round aggregates; fewer leave the model as is")
    rounds: int = Field(100, ge=1)
    local_epochs: int = Field(1, ge=1, le=1000)
    partition: PartitionSpec = "iid"
    strategy: FedStrategySpec = "fedavg"
    codec: CodecSpec = Field("none", description="uplink compression of each client's update: a codec the "
                             "server decodes alone (fp16, int8, qsgd, topk, ...); memory=ef keeps error feedback "
                             "per client")
    eval_every: int = Field(1, ge=1, description="rounds between test-set evaluations")
    target_accuracy: float | None = Field(None, gt=0, le=1)
    stop_at_target: bool = False
    deadline_s: float = Field(60.0, gt=0, description="the server waits this long for a round's results; "
                              "simulation: a client whose emulated time exceeds it is late")
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    processes: Optional[int] = Field(None, ge=1, le=1024, description="fl simulate: worker processes that train "
                                     "a round's clients in parallel, the same results whatever the count (none: "
                                     "the usable cores; 1: every client in this process, as under "
                                     "fl.local_privacy, whose noise is one stream drawn in client order)")
    privacy: Optional[PrivacyConfig] = Field(None, description="client-level differential privacy "
                                             "(none: updates are averaged as they are)")
    local_privacy: Optional[PrivacySpec] = Field(None, description="sample-level DP-SGD in each client's local "
                                                 "training: dp_sgd:noise_multiplier=...,clip=...[,target_epsilon=...]")
    secure: Optional[SecureSpec] = Field(None, description="secure aggregation, so the server sees only the sum "
                                         "of the round's updates: secagg[:value_bits=16,clip_range=0.5,...] "
                                         "(SecAgg+; with fl.privacy its noise is added by the clients) or "
                                         "ckks[:value_bits=14,...] (homomorphic, TenSEAL; fl simulate only)")

    @property
    def sampling_rate(self) -> float:
        """q: the chance that one client takes part in a round."""
        return min(1.0, self.clients_per_round / self.clients)

    @model_validator(mode="after")
    def _check(self) -> "FederationConfig":
        if self.clients_per_round > self.clients:
            raise ValueError(f"clients_per_round: {self.clients_per_round} exceeds clients={self.clients}")
        if self.min_clients > self.clients_per_round:
            raise ValueError(f"min_clients: {self.min_clients} exceeds clients_per_round={self.clients_per_round}")
        if not self.codec.target.capabilities.standalone:
            raise ValueError(f"codec: {self.codec.name!r} cannot be decoded by the server alone "
                             f"(allowed: {', '.join(uplink_codecs())})")
        if self.fleet.local_epochs_max is not None and self.fleet.local_epochs_max < self.local_epochs:
            raise ValueError(f"fleet.local_epochs_max: {self.fleet.local_epochs_max} is below "
                             f"local_epochs={self.local_epochs}")
        if self.local_privacy is not None:
            if self.local_privacy.options.noise_multiplier is None:
                raise ValueError("local_privacy: give noise_multiplier= (a client's rounds are not known in "
                                 "advance, so local DP-SGD's noise is not calibrated; target_epsilon= is its limit)")
            if self.strategy.name == "fedsgd":
                raise ValueError("local_privacy: fedsgd takes one full-batch step, not DP-SGD's sampled ones "
                                 "(use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad)")
        if self.fleet.drop_stage != "train" and self.secure is None:
            raise ValueError(f"fleet.drop_stage: {self.fleet.drop_stage!r} is a stage of secure aggregation; "
                             "without fl.secure clients drop at 'train'")
        if self.secure is not None:
            self._check_secure()
        if self.privacy is not None:
            from shoal.fl.privacy.dp_fedavg import check_privacy

            check_privacy(self.privacy, self.strategy.target, self.clients_per_round)
            # Without a noise multiplier the run calibrates one that fits its budget when it is
            # built (shoal.fl.privacy.plan.with_noise_multiplier); one given must fit already.
            if self.privacy.target_epsilon is not None and self.privacy.noise_multiplier is not None:
                from shoal.privacy.accountant import epsilon

                q = self.sampling_rate
                planned = epsilon(self.privacy.noise_multiplier, q, self.rounds, self.privacy.delta)
                if planned > self.privacy.target_epsilon:
                    raise ValueError(f"privacy.target_epsilon: {self.rounds} rounds at noise_multiplier "
                                     f"{self.privacy.noise_multiplier:g} (sampling {q:g}) would spend epsilon "
                                     f"{planned:.3g} > {self.privacy.target_epsilon:g} at delta "
                                     f"{self.privacy.delta:g}: raise the noise or cut fl.rounds")
        return self


    def _check_secure(self) -> None:
        name = self.secure.name
        if self.clients_per_round < 3:
            raise ValueError(f"secure: {name} needs clients_per_round >= 3 (with two, either client's update is "
                             "the sum minus its own)")
        if self.codec.name != "none":
            raise ValueError(f"secure: {name} quantises the updates itself (value_bits=); fl.codec must be none, "
                             f"got {self.codec.name!r}")
        if not getattr(self.strategy.target, "aggregates_mean", False):
            raise ValueError(f"secure: the server sees only the sum of the updates, which "
                             f"{self.strategy.name} cannot use (it needs each one); use fedavg, fedavgm, fedprox, "
                             "fedsgd, fedadam, fedyogi or fedadagrad")
        if self.privacy is not None:
            if not self.secure.target.distributed_noise:
                raise ValueError(f"privacy: distributed DP noise is built for secagg; fl.secure={name} cannot add "
                                 "it, so the server would get a sum without noise: use fl.secure=secagg with "
                                 "fl.privacy, or drop fl.privacy")
            if self.privacy.where != "client":
                raise ValueError("privacy.where: under fl.secure the server never sees an update to clip; set "
                                 "fl.privacy.where=client (the clients clip and add the noise)")
            if self.privacy.adaptive:
                raise ValueError("privacy.adaptive: adaptive clipping needs each client's clipped-or-not bit, "
                                 "which secure aggregation hides; use a fixed fl.privacy.clip")


class ServerConfig(_Strict):
    address: str = Field("127.0.0.1:8443", description="host:port the server listens on (port 0: any free port)")
    db: str = Field("shoal-fl.db", description="state database: a file (SQLite) or a SQLAlchemy URL")
    certs: str = Field("certs", description="directory from `shoal fl certs --out` (the server reads its server/ "
                       "folder, a client its NAME/ folder)")
    insecure: bool = Field(False, description="no TLS (tests on loopback only); tokens still required")
    max_update_bytes: ByteSize = Field(ByteSize(64 << 20), description="largest update message accepted")
    wait_for_clients_s: float = Field(600.0, gt=0, description="how long a round waits for enough connected "
                                      "clients before the server gives up")
    max_update_norm: Optional[float] = Field(None, gt=0, description="largest L2 norm of one client's update "
                                             "(none: unbounded)")
    max_update_norm_median: Optional[float] = Field(None, ge=1, description="largest norm as a multiple of the "
                                                    "round's median update norm (none: unbounded)")
    update_norm_action: Literal["reject", "clip"] = Field("reject", description="what an update over the bound gets")
    kill_before_commit: Optional[int] = Field(None, ge=1, description="injected failure, to test recovery: "
                                              "SIGKILL the server after aggregating this round, before storing "
                                              "it; once per output directory (OUT/fault.json)")


class FlRunConfig(_Strict):
    """One federated training run."""

    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = "cnn1d"
    task: TaskSpec = Field("classification", description="classification only, with its options (loss=, "
                           "metrics=): the federation's partitions, target and summary are by class")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    fl: FederationConfig = Field(default_factory=FederationConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    out: str = "runs/fl"

    @model_validator(mode="after")
    def _classification(self) -> "FlRunConfig":
        # Partitions (iid aside) deal out classes, and fl.target_accuracy, the round
        # lines and the summary are accuracies: another task would need all of them reworked.
        if self.fl.secure is not None and (self.server.max_update_norm is not None
                                           or self.server.max_update_norm_median is not None):
            raise ValueError("server.max_update_norm: under fl.secure the server sees no single update to bound; "
                             "leave server.max_update_norm and max_update_norm_median unset")
        if self.task.target.main_metric != "accuracy":
            raise ValueError(f"task: {self.task.name!r}: a federation trains classification only "
                             "(allowed: classification, with loss= and metrics= options)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_fl_config(source: str | Path | dict[str, Any] | FlRunConfig | None = None,
                   overrides: list[str] | tuple[str, ...] = (), **fields: Any) -> FlRunConfig:
    """Read a YAML path (or mapping), apply ``--set`` overrides and non-None
    ``fields``, validate; :class:`ConfigError` names each bad field."""
    data = gather(source, overrides, fields)
    try:
        return FlRunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_error(err)) from None
