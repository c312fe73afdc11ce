"""S3-style credentials in a spec reach the run (ingest reads with them) but none of what the run
stores or shows: the real training flow on Prefect's harness and a real MLflow store (sqlite)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from pydantic import SecretStr

from flows.deploy import deployments
from flows.monitoring import monitoring
from flows.training_pipeline import training_pipeline
from mms_core.errors import SpecError
from mms_core.spec import load_spec

KEY, SECRET = "AKIAEXAMPLESECRET", "wJalrSecretValue123"
CREDENTIALS = [f"data.storage_options.key={KEY}", f"data.storage_options.secret={SECRET}"]
SMALL = [
    "training.epochs=1",
    "training.world_size=1",
    "preprocess.n_shards=1",
    "model.kwargs.hidden=[8]",
    "compress.quantize=false",
    "evaluate.min_accuracy=0.0",
    "registry.model_name=secret-test",
    "registry.experiment=test-secrets",
]


def _leaks(text: str) -> list[str]:
    return [s for s in (KEY, SECRET) if s in text]


def test_prefect_serializes_the_flows_secret_parameters_masked():
    """What Prefect stores for a flow run's parameters (Flow.serialize_parameters: jsonable_encoder)."""
    spec = load_spec(overrides=[*CREDENTIALS, "data.storage_options.endpoint_url=http://127.0.0.1:9000"])
    stored = training_pipeline.serialize_parameters({"spec": spec})
    assert stored["spec"]["data"]["storage_options"] == {
        "key": "**********", "secret": "**********", "endpoint_url": "http://127.0.0.1:9000",
    }  # fmt: skip
    assert stored["spec"]["training"] == spec.training.model_dump(mode="json")
    assert monitoring.serialize_parameters({"api_key": SecretStr(SECRET)}) == {"api_key": "**********"}


@pytest.mark.slow
def test_credentials_never_reach_mlflow_params_prefect_parameters_or_logs(mms_home, small_df):
    csv = mms_home / "table.csv"
    small_df.to_csv(csv, index=False)
    # storage_options go to fsspec for a local file too: the local filesystem ignores key/secret.
    spec = load_spec(overrides=[f"data.source={csv.as_uri()}", *CREDENTIALS, *SMALL])

    result = training_pipeline(spec=spec)

    run = MlflowClient(tracking_uri=f"sqlite:///{mms_home / 'mlflow.db'}").get_run(result.run_id)
    assert '"key":"**********"' in run.data.params["spec"]
    assert not _leaks(repr(run.data.params) + repr(run.data.tags))
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(result.flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    assert flow_run.parameters["spec"]["data"]["storage_options"] == {
        "key": "**********",
        "secret": "**********",
    }
    assert not _leaks(repr(flow_run.parameters))
    assert any("ingested" in log.message for log in logs)
    assert not _leaks("\n".join(log.message for log in logs))


def test_a_deployment_refuses_a_spec_with_credentials_naming_the_fix(tmp_path):
    path = tmp_path / "s3.yaml"
    path.write_text(
        f"data:\n  source: s3://bucket/t.csv\n  storage_options: {{key: {KEY}, secret: {SECRET}}}\n"
    )
    with pytest.raises(
        SpecError, match=r"storage_options.key, data.storage_options.secret.*environment"
    ) as err:
        deployments(spec_path=path)
    assert not _leaks(str(err.value))
