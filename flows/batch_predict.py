"""batch-predict: a registered model over a table at any fsspec URI, on the Dask cluster."""

from __future__ import annotations

from prefect import flow

from infra.cluster import dask_client
from mms_core.config import Settings
from mms_core.serving.offline.batch import BatchResult
from tasks.predict import batch_predict as predict_task


@flow(name="batch-predict", log_prints=True)
def batch_predict(
    model: str = "digits-classifier@champion",
    input_uri: str = "",
    output_uri: str = "",
    id_column: str | None = None,
    probabilities: bool = False,
) -> BatchResult:
    """Predict every row of ``input_uri`` with ``model`` (NAME@ALIAS) and write Parquet to ``output_uri``."""
    settings = Settings()
    with dask_client(settings) as client:
        return predict_task(
            client=client,
            tracking_uri=settings.tracking_uri,
            model=model,
            input_uri=input_uri,
            output_uri=output_uri,
            id_column=id_column,
            probabilities=probabilities,
        )
