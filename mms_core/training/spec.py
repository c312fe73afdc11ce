"""Training configuration (the `training:` section of a PipelineSpec) and the job sent to workers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mms_core import storage
from mms_core.models import ModelSpec

SHUFFLE_BUFFER_ROWS = 262_144  # 64 MiB of 64 float32 features: a window's rows


class FedAvgSpec(BaseModel):
    """Federated averaging (McMahan et al. 2017): the `training.fedavg:` section.

    Used when ``training.strategy`` is ``fedavg``; the DDP fields of TrainSpec (epochs, batch_size,
    lr, optimizer, schedule) do not apply there. FedSGD is the special case
    ``local_epochs=1, local_batch_size=0``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    clients: int = Field(default=10, ge=1, description="K: simulated clients, each owning a partition.")
    fraction: float = Field(
        default=0.1, gt=0, le=1, description="C: share of clients sampled per round (at least one)."
    )
    local_epochs: int = Field(default=1, ge=1, description="E: passes over its data per sampled client.")
    local_batch_size: int = Field(
        default=10, ge=0, description="B: rows per local step; 0 = the whole local dataset (FedSGD at E=1)."
    )
    rounds: int = Field(default=50, ge=1, description="Communication rounds (one server update each).")
    partition: Literal["iid", "dirichlet", "shards"] = Field(
        default="iid",
        description="iid: uniform split; dirichlet: label skew with `alpha`; "
        "shards: sort by label, `shards_per_client` label-sorted shards each (the paper's non-IID).",
    )
    alpha: float = Field(
        default=0.5, gt=0, description="Dirichlet concentration: smaller means fewer labels per client."
    )
    shards_per_client: int = Field(default=2, ge=1, description="Label-sorted shards per client ('shards').")
    client_lr: float = Field(
        default=0.05, gt=0, description="Client learning rate (plain SGD, as the paper)."
    )
    dp_clip: float | None = Field(
        default=None, gt=0, description="Clip each client's update to this L2 norm (None: no clipping)."
    )
    dp_noise_multiplier: float = Field(
        default=0.0,
        ge=0,
        description="Gaussian noise std = multiplier * dp_clip, added to each clipped update.",
    )
    secure_aggregation: bool = Field(
        default=False, description="Pairwise-mask weighted updates so the server sees only their sum."
    )

    @model_validator(mode="after")
    def _consistent(self) -> FedAvgSpec:
        if self.dp_noise_multiplier > 0 and self.dp_clip is None:
            raise ValueError(
                "dp_noise_multiplier > 0 needs dp_clip: the noise std is multiplier * clip norm; "
                "set training.fedavg.dp_clip (e.g. 1.0)"
            )
        if self.secure_aggregation and self.clients_per_round < 2:
            raise ValueError(
                f"secure_aggregation needs at least 2 clients per round, but fraction={self.fraction} "
                f"of clients={self.clients} samples {self.clients_per_round}: raise fraction or clients"
            )
        return self

    @property
    def clients_per_round(self) -> int:
        """max(1, round(C * K)) clients take part in each round."""
        return max(1, round(self.fraction * self.clients))


class FsdpSpec(BaseModel):
    """Fully sharded data parallel (torch FSDP2 ``fully_shard``): the `training.fsdp:` section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reshard_after_forward: bool = Field(
        default=True, description="Free gathered parameters after forward (less memory, one more all-gather)."
    )


class ParamServerSpec(BaseModel):
    """Asynchronous SGD against parameter-server actors: the `training.param_server:` section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shards: int = Field(
        default=1, ge=1, description="Parameter-server actors; parameters are split across them."
    )
    staleness_bound: int | None = Field(
        default=None,
        ge=0,
        description="A worker more than this many versions behind waits (0: synchronous; None: fully async).",
    )


class HierarchicalSpec(BaseModel):
    """Two-level all-reduce through one "supernode" per group: the `training.hierarchical:` section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    group_size: int | None = Field(
        default=None,
        ge=1,
        description="Consecutive ranks per group (the lowest is its supernode); None: one group per host.",
    )


class TrainSpec(BaseModel):
    """How to train."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal["ddp", "fsdp", "param_server", "hierarchical", "fedavg"] = Field(
        default="ddp", description="Distributed strategy (see mms_core/training/strategies.py)."
    )
    epochs: int = Field(default=30, ge=1, description="Passes over the training shards.")
    batch_size: int = Field(default=32, ge=1, description="Rows per step on each worker.")
    lr: float = Field(default=2e-3, gt=0, description="Peak learning rate.")
    optimizer: Literal["adamw", "sgd"] = Field(default="adamw", description="Optimizer.")
    weight_decay: float = Field(default=1e-4, ge=0, description="Decoupled weight decay.")
    schedule: Literal["constant", "cosine"] = Field(
        default="cosine", description="LR schedule over all steps."
    )
    seed: int = Field(default=0, description="Seed for init and shuffling.")
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="Autocast precision.")
    checkpoint_every: int = Field(
        default=100,
        ge=0,
        description="Checkpoint every K steps, and always at each epoch's (round's) end (0: only there).",
    )
    resume: bool = Field(
        default=True,
        description="Resume from the newest valid checkpoint of the same spec and data (false: start over).",
    )
    max_restarts: int = Field(
        default=2, ge=0, description="Times a run restarts from its last checkpoint after losing a worker."
    )
    shuffle_buffer_rows: int = Field(
        default=SHUFFLE_BUFFER_ROWS,
        ge=1,
        description="File sources (shards of parts): rows a rank shuffles together, a window of whole "
        "parts; bounds the rank's memory for its data (about two windows with prefetch). Ignored for "
        "built-in datasets, whose shards are held whole.",
    )
    world_size: int | None = Field(default=None, ge=1, description="Ranks to use; default all Dask workers.")
    timeout_s: float = Field(default=300, gt=0, description="Process-group init/collective timeout.")
    fedavg: FedAvgSpec = Field(default_factory=FedAvgSpec, description="Settings of strategy 'fedavg'.")
    fsdp: FsdpSpec = Field(default_factory=FsdpSpec, description="Settings of strategy 'fsdp'.")
    param_server: ParamServerSpec = Field(
        default_factory=ParamServerSpec, description="Settings of strategy 'param_server'."
    )
    hierarchical: HierarchicalSpec = Field(
        default_factory=HierarchicalSpec, description="Settings of strategy 'hierarchical'."
    )


def checkpoint_key(*, manifest_hash: str, model: ModelSpec, train: TrainSpec) -> str:
    """Names a run's checkpoint directory by what determines the training (data, model, settings),
    so a re-run of a crashed run finds and resumes its checkpoints. Settings that only steer
    recovery are left out, and so is the shuffle buffer at its default: keys of runs from before
    the field stay as they were (a crashed run resumes after an upgrade)."""
    left_out = {"resume", "max_restarts", "timeout_s"}
    if train.shuffle_buffer_rows == SHUFFLE_BUFFER_ROWS:
        left_out.add("shuffle_buffer_rows")
    training = train.model_dump(mode="json", exclude=left_out)
    return storage.canonical_hash(
        {"manifest": manifest_hash, "model": model.model_dump(mode="json"), "training": training}
    )[:24]


class TrainJob(BaseModel):
    """Everything a rank needs, by URI: the same object for Dask workers and torchrun."""

    model_config = ConfigDict(frozen=True)

    manifest_uri: str
    model: ModelSpec
    train: TrainSpec
    output_uri: str = Field(description="Where rank 0 writes the final weights (safetensors).")
    checkpoint_uri: str = Field(description="Directory for step checkpoints.")
    num_threads: int = Field(default=1, ge=1, description="torch intra-op threads per rank.")


class EpochMetrics(BaseModel):
    """One epoch's figures. For a language model a sample is a predicted token: accuracies are
    next-token accuracies and ``samples_per_s`` equals ``tokens_per_s``."""

    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    samples_per_s: float
    lr: float
    tokens_per_s: float | None = Field(
        default=None, description="Language models: tokens trained on per second, all ranks together."
    )
    mfu: float | None = Field(
        default=None,
        description="Language models: model FLOPs utilisation per device (0..1); None when the device's "
        "peak is unknown (a CPU without MMS_PEAK_TFLOPS).",
    )


class RankResult(BaseModel):
    rank: int
    stats: dict[str, Any] = Field(
        default_factory=dict,
        description="Strategy-specific figures (e.g. staleness histogram, bytes communicated), JSON-able.",
    )
    params_sha256: str = Field(description="Hash of the final parameters (equal on every rank).")
    history: list[EpochMetrics] = Field(default_factory=list, description="Filled on rank 0.")
    weights_uri: str | None = None
    steps: int = 0
    samples: int = Field(default=0, description="Rows trained on, summed over all ranks and epochs.")
    train_seconds: float = 0.0
