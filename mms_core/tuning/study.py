"""Run an Optuna study with its trials in parallel on a Dask cluster.

Ask-and-tell from the caller's thread: only this process talks to the study's database, so the
workers need no access to it (a cluster's workers rarely reach the sqlite file of a laptop).
Each trial is a Dask task (``trial.run_trial``) that streams its epochs back over a Dask topic;
the caller reports them to Optuna and answers each with a prune decision. A trial that crashes,
or whose worker dies, is marked failed and the study goes on. Re-running a study continues it
up to ``tuning.trials`` finished trials.
"""

from __future__ import annotations

import json
import math
import queue
import uuid
from collections.abc import Callable
from typing import Any

import optuna
from distributed import Client, Future, Variable
from pydantic import BaseModel

from mms_core import storage
from mms_core.errors import TrainingError
from mms_core.spec import PipelineSpec
from mms_core.training.launch import worker_addresses
from mms_core.training.spec import TrainJob
from mms_core.tuning.space import TuneSpec, json_attr, suggest, trial_spec
from mms_core.tuning.trial import TrialPruned, decision_name, run_trial

OnEvent = Callable[[dict[str, Any]], None]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


class TrialSummary(BaseModel):
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    epochs: int


class StudyResult(BaseModel):
    """What a study found (over all its runs so far)."""

    study_name: str
    direction: str
    metric: str
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    completed: int
    pruned: int
    failed: int
    trials: list[TrialSummary]


def study_name(*, spec: PipelineSpec, tune: TuneSpec) -> str:
    """The study's name: the tuning section's, or the spec name and a hash of spec and space
    (the same spec and space continue the same study)."""
    if tune.study_name:
        return tune.study_name
    key = storage.canonical_hash(
        {"spec": spec.model_dump(mode="json"), "tune": tune.model_dump(mode="json", exclude={"trials"})}
    )
    return f"{spec.name}-{key[:10]}"


def open_study(*, name: str, tune: TuneSpec, storage_url: str) -> optuna.Study:
    """Create the study in ``storage_url`` (any SQLAlchemy URL) or load it if it exists."""
    sampler = (
        optuna.samplers.TPESampler(seed=tune.seed)
        if tune.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=tune.seed)
    )
    pruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "none": optuna.pruners.NopPruner,
    }[tune.pruner]()
    return optuna.create_study(
        study_name=name,
        storage=storage_url,
        direction=tune.direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def run_study(
    *,
    client: Client,
    study: optuna.Study,
    spec: PipelineSpec,
    tune: TuneSpec,
    manifest_uri: str,
    root: str,
    on_event: OnEvent | None = None,
) -> StudyResult:
    """Run trials until the study has ``tune.trials`` finished ones, ``parallel`` at a time.

    Args:
        client: Dask client; each trial is one task on one worker.
        study: from ``open_study``.
        spec: the base spec; each trial applies its parameters (``space.trial_spec``).
        tune: the tuning section.
        manifest_uri: shards every trial trains on.
        root: storage root; trials write under ``<root>/tuning/<study>/`` and clean up.
        on_event: called in this thread with ``trial_start``, ``trial_epoch`` and ``trial_end``
            events (for MLflow runs and logs).

    Raises:
        TrainingError: the cluster has no workers.
    """
    workers = worker_addresses(client)
    if not workers:
        raise TrainingError("the Dask cluster has no workers; start some (mms stack up, MMS_N_WORKERS)")
    emit = on_event or (lambda ev: None)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # left running by a crashed run
        emit({"kind": "trial_end", "trial": t.number, "state": "FAIL", "value": None, "error": "abandoned"})
    todo = tune.trials - len(study.get_trials(deepcopy=False, states=FINISHED))
    if todo > 0:
        _Trials(
            client=client, study=study, spec=spec, tune=tune, manifest_uri=manifest_uri, root=root, emit=emit
        ).run(todo=todo, parallel=min(tune.parallel or len(workers), todo))
    return summarize(study, metric=tune.metric)


class _Trials:
    """The ask-run-report-tell loop of one ``run_study`` call."""

    def __init__(self, *, client, study, spec, tune, manifest_uri, root, emit) -> None:
        self.client, self.study, self.spec, self.tune = client, study, spec, tune
        self.manifest_uri, self.emit = manifest_uri, emit
        self.dir = storage.join(root, "tuning", study.study_name)
        self.topic = f"mms-tune-{uuid.uuid4().hex[:8]}"
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.running: dict[int, tuple[optuna.Trial, Future]] = {}
        self.epochs: dict[int, int] = {}

    def run(self, *, todo: int, parallel: int) -> None:
        self.client.subscribe_topic(self.topic, lambda ev: self.events.put(ev[1]))
        try:
            started = 0
            while started < todo or self.running:
                while len(self.running) < parallel and started < todo:
                    self._start()
                    started += 1
                self._report_epochs()
                for number, (trial, future) in list(self.running.items()):
                    if future.done():
                        self._report_epochs(block=False)  # its last epochs before its result
                        self._finish(number, trial, future)
        finally:
            self.client.unsubscribe_topic(self.topic)
            self.client.cancel([f for _, f in self.running.values()])

    def _start(self) -> None:
        trial = self.study.ask()
        params = suggest(trial, self.tune)
        tspec = trial_spec(spec=self.spec, tune=self.tune, params=params)
        out = storage.join(self.dir, f"trial-{trial.number:04d}")
        train = tspec.training.model_copy(update={"resume": False, "checkpoint_every": 0})
        job = TrainJob(
            manifest_uri=self.manifest_uri,
            model=tspec.model,
            train=train,
            output_uri=storage.join(out, "model.safetensors"),
            checkpoint_uri=storage.join(out, "ckpt"),
        )
        future = self.client.submit(
            run_trial,
            job,
            topic=self.topic,
            number=trial.number,
            ask_prune=self.tune.pruner != "none",
            pure=False,
            key=f"{self.topic}-trial{trial.number}",
        )
        self.running[trial.number] = (trial, future)
        self.emit({"kind": "trial_start", "trial": trial.number, "params": params})

    def _report_epochs(self, *, block: bool = True) -> None:
        try:
            ev = self.events.get(timeout=0.1) if block else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._report(ev)
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return

    def _report(self, ev: dict[str, Any]) -> None:
        number, epoch = ev["trial"], ev["epoch"]
        if number not in self.running:
            return
        trial = self.running[number][0]
        self.epochs[number] = epoch
        value = float(ev[self.tune.metric])
        prune = False
        if math.isfinite(value):
            trial.report(value, epoch)
            prune = bool(trial.should_prune())
        if self.tune.pruner != "none":
            Variable(decision_name(topic=self.topic, number=number, epoch=epoch), client=self.client).set(
                prune
            )
        self.emit({**ev, "kind": "trial_epoch", "trial": number, "pruning": prune})

    def _finish(self, number: int, trial: optuna.Trial, future: Future) -> None:
        del self.running[number]
        state, value, error = "COMPLETE", None, None
        if future.status == "finished":
            value = float(getattr(future.result().history[-1], self.tune.metric))
            if math.isfinite(value):
                self.study.tell(trial, value)
            else:
                state, error = "FAIL", f"{self.tune.metric} is {value}"
        else:
            exc = future.exception() if future.status == "error" else None
            state = "PRUNED" if isinstance(exc, TrialPruned) else "FAIL"
            error = None if state == "PRUNED" else repr(exc) if exc else f"task {future.status}"
        if state != "COMPLETE":
            self.study.tell(trial, state=getattr(optuna.trial.TrialState, state))
        storage.remove_tree(storage.join(self.dir, f"trial-{number:04d}"))
        self.emit({"kind": "trial_end", "trial": number, "state": state, "value": value, "error": error})


def summarize(study: optuna.Study, *, metric: str) -> StudyResult:
    """The study's finished trials and its best one."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial if done else None
    return StudyResult(
        study_name=study.study_name,
        direction=study.direction.name.lower(),
        metric=metric,
        best_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=_spec_values(best) if best else {},
        completed=len(done),
        pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        failed=sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
        trials=[
            TrialSummary(
                number=t.number,
                state=t.state.name,
                value=t.value,
                params=_spec_values(t),
                epochs=max(t.intermediate_values, default=0),
            )
            for t in trials
        ],
    )


def _spec_values(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's parameters as spec values (choices offered as JSON text decoded back)."""
    return {
        name: json.loads(value) if t.user_attrs.get(json_attr(name)) else value
        for name, value in t.params.items()
    }
