"""Training configuration (the `training:` section of a PipelineSpec) and the job sent to workers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mms_core.models import ModelSpec


class TrainSpec(BaseModel):
    """How to train."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal["ddp"] = Field(default="ddp", description="Distributed strategy.")
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
