"""What every stream consumer shares, whichever broker it reads: its options, the stats it reports,
its error type, and the per-run context that turns message bodies into answers. The broker modules
(:mod:`.stream_ndjson`, :mod:`.stream_redis`) import from here, so neither imports the other's
internals.

Nothing a message holds may stop a consumer: bytes that are not UTF-8, text that is not JSON, numbers
too long to convert, nesting too deep to decode, arrays of the wrong shape, values the model cannot
take. Each of these becomes an ``error`` answer to that message alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mms_core import storage
from mms_core.errors import MMSError
from mms_core.monitoring.stats import RunningStats
from mms_core.packaging import Predictor
from mms_core.serving.payload import InputSchema, NanPolicy, PayloadError, parse_body

MAX_ERROR_CHARS = 1000  # an error quotes the message (keys, values): a huge message, a short answer


class StreamError(MMSError):
    """The stream cannot run: a bad source/sink URI, an unreachable broker, no workers."""


class StreamOptions(BaseSettings):
    """How consumers read, batch, reclaim, bound their streams and stop. The defaults suit a
    long-running service; every field can also be set from the environment (``MMS_STREAM_MAXLEN``,
    ``MMS_STREAM_MAX_DELIVERIES``, ...), and keyword arguments override the environment."""

    model_config = SettingsConfigDict(env_prefix="MMS_STREAM_", frozen=True, use_attribute_docstrings=True)

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
    max_deliveries: int = Field(5, ge=1)
    """Redis: a message delivered more often than this without an answer (its processing keeps
    killing consumers) is moved to the dead-letter stream ``<source>:dead`` instead of being retried."""
    maxlen: int = Field(100_000, ge=1)
    """Redis: every stream the broker writes (answers, dead letters) keeps about this many newest
    entries (``XADD MAXLEN ~``): readers of the sink must keep up, or the oldest answers are dropped."""


class _Counts(BaseModel):
    messages: int = 0  # answers written: predictions and errors
    rows: int = 0
    errors: int = 0
    reclaimed: int = 0  # messages taken over from a consumer that went quiet
    duplicates: int = 0  # messages already answered elsewhere (a reclaim race, a crashed batch): skipped
    files: int = 0  # NDJSON sink files written
    dead: int = 0  # messages moved to the dead-letter stream after max_deliveries


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
        """``{"predictions": [...], "rows": matrix}`` or ``{"error": message}`` per body, in one forward
        pass. ``rows`` (the float32 rows predicted) is for :meth:`observe`; brokers do not write it.

        Never raises for what a body holds: a body that cannot be read, stacked or predicted gets an
        error; the others in the micro-batch are still predicted.
        """
        results: list[dict[str, Any]] = [{} for _ in bodies]
        parsed: dict[int, np.ndarray] = {}
        for i, body in enumerate(bodies):
            x = self._parse(body)
            if isinstance(x, str):
                results[i] = {"error": clip(x)}
            else:
                parsed[i] = x
        if parsed:
            self._predict(parsed, results)
        return results

    def _parse(self, body: Any) -> np.ndarray | str:
        """The body's rows as ``[rows, features]`` float32, or the message that says why not."""
        try:
            if isinstance(body, PayloadError):  # the message could not even be decoded
                raise body
            x = parse_body(body, self.schema)
        except PayloadError as exc:
            return str(exc)
        except Exception as exc:  # nothing a client sends may stop a consumer
            return f"the message cannot be read ({type(exc).__name__}: {exc}); send rows as [[...], ...]"
        return x  # parse_body guarantees float32 [rows, features]: it stacks with the others

    def _predict(self, parsed: dict[int, np.ndarray], results: list[dict[str, Any]]) -> None:
        """One forward pass for the micro-batch; should it fail, one per message, so that only the
        message the model cannot take is answered with the error."""
        try:
            self._forward(parsed, results)
        except Exception:  # retried alone below: only the culprit gets the error
            for i, x in parsed.items():
                try:
                    self._forward({i: x}, results)
                except Exception as exc:  # this message alone: answer it, keep consuming
                    results[i] = {"error": clip(_model_error(exc))}

    def _forward(self, parsed: dict[int, np.ndarray], results: list[dict[str, Any]]) -> None:
        x = np.concatenate(list(parsed.values()))
        labels = np.asarray(self.predictor.predict_array(x))
        if labels.shape[:1] != (len(x),):
            raise ValueError(f"the model returned {labels.shape[:1]} labels for {len(x)} rows")
        bounds = np.cumsum([len(v) for v in parsed.values()])[:-1]
        for (i, rows), part in zip(parsed.items(), np.split(labels, bounds), strict=True):
            results[i] = {"predictions": part.tolist(), "rows": rows}

    def observe(self, results: Iterable[dict[str, Any]]) -> None:
        """Count the rows and predictions of the answers the broker wrote in the monitor.

        Called after the write, with only the answers written: a message answered by two consumers
        (a reclaim race) is counted once, by the one whose answer counted.
        """
        done = [r for r in results if "predictions" in r]
        if self.monitor is None or not done:
            return
        self.monitor.update(
            np.concatenate([r["rows"] for r in done]), [p for r in done for p in r["predictions"]]
        )
        self.write_stats()

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


def clip(message: str) -> str:
    """``message`` cut to :data:`MAX_ERROR_CHARS`: an error quoting a huge message stays small."""
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."


def _model_error(exc: Exception) -> str:
    return (
        f"the model cannot predict this message ({type(exc).__name__}: {exc}); check that its rows "
        "are finite numbers in the model's feature order"
    )


def decode_json(raw: str | bytes, what: str) -> Any:
    """The decoded JSON, or the PayloadError that answers it (a bad message is answered, not fatal).

    Catches everything decoding can raise on hostile input: bytes that are not UTF-8, invalid JSON,
    integers beyond Python's 4300-digit conversion limit, nesting deeper than the recursion limit.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return PayloadError(
                f"{what} is not UTF-8 (byte {raw[exc.start]:#04x} at position {exc.start}); send UTF-8 JSON"
            )
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        return PayloadError(f"{what} is not valid JSON ({exc.msg} at char {exc.pos})")
    except RecursionError:
        return PayloadError(f"{what} is nested too deeply to decode; send rows as a 2-D list [[...], ...]")
    except ValueError as exc:  # the int-digits limit: Python's own hint (set_int_max_str_digits) is ours
        return PayloadError(f"{what} cannot be decoded ({str(exc).split(';')[0]}); send numbers as floats")
    except Exception as exc:  # whatever a message holds, it is answered, never fatal
        return PayloadError(f"{what} cannot be decoded ({type(exc).__name__}); send a JSON object of rows")
