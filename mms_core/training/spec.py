"""Training configuration (the `training:` section of a PipelineSpec) and the job sent to workers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mms_core.models import ModelSpec


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


class TrainSpec(BaseModel):
    """How to train."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal["ddp", "fedavg"] = Field(default="ddp", description="Distributed strategy.")
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
        default=100, ge=0, description="Checkpoint every K steps (0: only at the end)."
    )
    world_size: int | None = Field(default=None, ge=1, description="Ranks to use; default all Dask workers.")
    timeout_s: float = Field(default=300, gt=0, description="Process-group init/collective timeout.")
    fedavg: FedAvgSpec = Field(default_factory=FedAvgSpec, description="Settings of strategy 'fedavg'.")


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
    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    samples_per_s: float
    lr: float


class RankResult(BaseModel):
    rank: int
    params_sha256: str = Field(description="Hash of the final parameters (equal on every rank).")
    history: list[EpochMetrics] = Field(default_factory=list, description="Filled on rank 0.")
    weights_uri: str | None = None
    steps: int = 0
    samples: int = Field(default=0, description="Rows trained on, summed over all ranks and epochs.")
    train_seconds: float = 0.0
