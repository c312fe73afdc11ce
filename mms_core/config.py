"""Process-wide settings: where state lives and which servers to use.

Everything has an embedded default, so a fresh checkout runs with no setup: state under
./.mms, MLflow on SQLite there, a Dask LocalCluster, and Prefect's API from the home's embedded
server (infra.embedded_prefect: started by the first `mms` command, kept a while for the next).
`mms stack up` (or a cluster) is used by setting MMS_MLFLOW_URI / MMS_DASK_ADDRESS /
PREFECT_API_URL.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Typed settings read from MMS_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="MMS_", frozen=True)

    home: Path = Field(default=Path(".mms"), description="Root of all local run state.")
    mlflow_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default sqlite:///<home>/mlflow.db."
    )
    storage_uri: str | None = Field(
        default=None, description="fsspec root for datasets, shards, checkpoints; default <home>/data."
    )
    dask_address: str | None = Field(
        default=None, description="Address of a running Dask scheduler; default: a LocalCluster."
    )
    artifact_uri: str | None = Field(
        default=None,
        description=(
            "Root for the artifacts of experiments MMS creates (any MLflow artifact URI, e.g. s3://b/p);"
            " default: <home>/artifacts with a database tracking URI, and the server's own"
            " (its --artifacts-destination, proxied) with an http(s) MLflow server."
        ),
    )
    tuning_storage: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the Optuna study database; default sqlite:///<home>/optuna.db.",
    )
    n_workers: int = Field(default=2, ge=1, description="Workers in the embedded LocalCluster.")
    threads_per_worker: int = Field(default=1, ge=1, description="Threads per embedded worker.")
    worker_memory: str = Field(default="4GiB", description="Memory limit per embedded worker.")
    prefect_start_timeout_s: float = Field(
        default=180.0,
        gt=0,
        description=(
            "Seconds the embedded Prefect server (and Prefect's own temporary server) may take to start;"
            " ~5 s on 2 idle cores, ~11 s in a new home (migrations), several times that on a busy machine."
        ),
    )
    prefect_idle_s: float = Field(
        default=600.0,
        ge=0,
        description=(
            "Seconds the embedded Prefect server of a home stays up after the last `mms` command let go"
            " of it, so the next one attaches instead of starting it again; 0 stops it with that command."
        ),
    )
    trusted_model_modules: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description=(
            "Comma-separated modules (or package prefixes: 'mypkg' allows 'mypkg.models') whose"
            " 'module:build_fn' model builders a registered package may name; the zoo's mlp, cnn and"
            " gpt are always allowed. Read by every process that loads a package (server, Dask"
            " workers), so set it there: a package naming any other module fails to load."
        ),
    )

    @field_validator("trusted_model_modules", mode="before")
    @classmethod
    def _module_list(cls, v: object) -> object:
        # An environment variable arrives as one string: "mypkg, other.models".
        if isinstance(v, str):
            v = [part.strip() for part in v.split(",") if part.strip()]
        for name in v if isinstance(v, list | tuple) else ():
            if not all(part.isidentifier() for part in str(name).split(".")):
                raise ValueError(
                    f"MMS_TRUSTED_MODEL_MODULES entry {name!r} is not a module name: list modules or"
                    " package prefixes (e.g. 'mypkg,other.models'), not 'module:function' paths"
                )
        return v

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        # Workers run in other processes (maybe other directories): always hand them absolute paths.
        return v.expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def study_storage(self) -> str:
        # Not MLflow's own database file: both keep an alembic_version table, and each would
        # read the other's schema revision as its own.
        return self.tuning_storage or f"sqlite:///{self.home / 'optuna.db'}"

    @property
    def artifact_root(self) -> str | None:
        """Where new experiments keep artifacts; None: leave it to the MLflow server.

        A remote server stores artifacts where its operator said (S3 behind --artifacts-destination)
        and proxies them to every client; a path on this host would be unreadable from the others.
        """
        if self.artifact_uri:
            return self.artifact_uri.rstrip("/")
        if self.tracking_uri.startswith(("http://", "https://")):
            return None
        return (self.home / "artifacts").as_uri()

    @property
    def storage_root(self) -> str:
        return (self.storage_uri or str(self.home / "data")).rstrip("/")


def prefect_env(settings: Settings) -> dict[str, str]:
    """Environment Prefect needs before it is imported: state under MMS_HOME, no analytics.

    Creates the directories (Prefect's SQLite cannot create its parent folder).
    """
    (settings.home / "prefect" / "storage").mkdir(parents=True, exist_ok=True)
    env = {
        "PREFECT_HOME": str(settings.home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(settings.home / "prefect" / "storage"),
        # Where a process still starts Prefect's own temporary server (flows called from Python with
        # no PREFECT_API_URL), its 20 s default failed runs on a busy 2-core machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(round(settings.prefect_start_timeout_s)),
    }
    return {k: v for k, v in env.items() if k not in os.environ}
