"""Tasks of the batch-predict flow."""

from __future__ import annotations

from distributed import Client
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mms_core.serving.offline.batch import BatchResult, predict_registered


@task(name="batch-predict", cache_policy=NONE)
def batch_predict(
    *, client: Client, tracking_uri: str, model: str, input_uri: str, output_uri: str,
    id_column: str | None, probabilities: bool,
) -> BatchResult:  # fmt: skip
    result = predict_registered(
        client=client,
        tracking_uri=tracking_uri,
        model=model,
        input_uri=input_uri,
        output_uri=output_uri,
        id_column=id_column,
        probabilities=probabilities,
    )
    get_run_logger().info(
        "%s v%s: %d rows in %d partitions -> %s",
        model,
        result.model_version,
        result.rows,
        result.partitions,
        result.output_uri,
    )
    return result
