"""What every stream consumer shares, whichever broker it reads: its options, the stats it reports,
its error type, and the per-run context that turns message bodies into answers. Both broker modules
(:mod:`.stream`, :mod:`.stream_redis`) import from here, so neither imports the other's internals."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mms_core import storage
from mms_core.errors import MMSError
from mms_core.monitoring.stats import RunningStats
from mms_core.packaging import Predictor
from mms_core.serving.payload import InputSchema, NanPolicy, PayloadError, parse_body


class StreamError(MMSError):
    """The stream cannot run: a bad source/sink URI, an unreachable broker, no workers."""


class StreamOptions(BaseModel):
    """How consumers read, batch, reclaim and stop. The defaults suit a long-running service."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    batch_size: int = Field(64, ge=1, le=10_000)
    """Messages (Redis) or lines (NDJSON) per micro-batch; each batch is one forward pass."""
    block_ms: int = Field(1000, ge=1)
    """How long one read waits for new messages (NDJSON: the pause between directory listings)."""
    min_idle_ms: int = Field(30_000, ge=0)
    """A pending message idle this long is taken to belong to a dead consumer and is reclaimed."""
    claim_every_s: float = Field(5.0, ge=0)
    """How often a busy consumer also looks for messages to reclaim (an idle one looks every read)."""
    idle_exit_s: float | None = Field(None, ge=0)
    """Stop after this long with no new message and nothing pending; None runs until stopped."""
    nan_policy: NanPolicy = "reject"
    """``reject`` answers a message holding NaN/inf with an error; ``impute`` uses the training mean."""
    stats_uri: str | None = None
    """Directory (fsspec URI) where consumer i writes ``consumer-i.json``: its running input statistics
    and predicted-class counts, for the monitoring flow. None keeps none."""
    stats_every_s: float = Field(10.0, gt=0)
    """How often a consumer rewrites its statistics file (and once more when it stops)."""


class _Counts(BaseModel):
    messages: int = 0  # answers written: predictions and errors
    rows: int = 0
    errors: int = 0
    reclaimed: int = 0  # messages taken over from a consumer that went quiet
    duplicates: int = 0  # messages already answered elsewhere (a reclaim race, a crashed batch): skipped
    files: int = 0  # NDJSON sink files written


class ConsumerStats(_Counts):
    """What one consumer did."""

    consumer: str


class StreamResult(_Counts):
    """What all consumers did, in total and each."""

    source: str
    sink: str
    model_version: str
    consumers: list[ConsumerStats]


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class ConsumerRun:
    """What every consumer loop needs, bundled so the loops keep short signatures."""

    predictor: Predictor
    schema: InputSchema
    version: str
    options: StreamOptions
    name: str
    index: int
    n_consumers: int
    stop: StopFlag | None
    monitor: RunningStats | None = None
    _asked: float = 0.0
    _stopped: bool = False
    _stats_written: float = 0.0

    def stopped(self) -> bool:
        # A distributed.Event costs a scheduler round trip: ask every 0.2 s, not every batch.
        if self.stop is not None and time.monotonic() - self._asked >= 0.2:
            self._asked, self._stopped = time.monotonic(), self.stop.is_set()
        return self._stopped

    def answer(self, bodies: list[Any]) -> list[dict[str, Any]]:
        """``{"predictions": [...]}`` or ``{"error": message}`` per body, in one forward pass."""
        results: list[dict[str, Any]] = [{} for _ in bodies]
        parsed: dict[int, np.ndarray] = {}
        for i, body in enumerate(bodies):
            try:
                if isinstance(body, PayloadError):  # the message could not even be decoded
                    raise body
                parsed[i] = parse_body(body, self.schema)
            except PayloadError as exc:
                results[i] = {"error": str(exc)}
        if parsed:
            x = np.concatenate(list(parsed.values()))
            labels = self.predictor.predict_array(x)
            bounds = np.cumsum([len(x) for x in parsed.values()])[:-1]
            for i, part in zip(parsed, np.split(labels, bounds), strict=True):
                results[i] = {"predictions": part.tolist()}
            if self.monitor is not None:
                self.monitor.update(x, labels)
                self.write_stats()
        return results

    def write_stats(self, *, force: bool = False) -> None:
        """Rewrite this consumer's statistics file (atomically) every ``options.stats_every_s``."""
        uri = self.options.stats_uri
        if self.monitor is None or uri is None or not self.monitor.rows:
            return  # a consumer that saw nothing keeps the file of the last one that did
        if force or time.monotonic() - self._stats_written >= self.options.stats_every_s:
            storage.write_bytes_atomic(
                storage.join(uri, f"consumer-{self.index}.json"),
                self.monitor.snapshot().model_dump_json().encode(),
            )
            self._stats_written = time.monotonic()


def decode_json(text: str, what: str) -> Any:
    """The decoded JSON, or the PayloadError that answers it (a bad message is answered, not fatal)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return PayloadError(f"{what} is not valid JSON ({exc.msg} at char {exc.pos})")
