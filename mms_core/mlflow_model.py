"""MLflow pyfunc entry point ("models from code": MLflow stores this file, not a pickle).

Loaded by ``mlflow.pyfunc.load_model`` and by ``mlflow models serve``; it rebuilds the network
from the package's safetensors weights and config.
"""

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class MMSClassifier(PythonModel):
    """Class labels for rows of raw feature columns, from an MMS package logged as an artifact."""

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the network from the ``package`` artifact (config + safetensors weights)."""
        from mms_core.packaging import Predictor

        self.predictor = Predictor.from_directory(Path(context.artifacts["package"]))

    # The hints are for MLflow, which reads them when this file is executed (log, load, serve):
    # without one it warns "Add type hints to the `predict` method" each time. A DataFrame hint
    # adds no type-hint validation or signature of its own (MLflow infers no schema from it), so
    # the explicit signature logged by mms_core.registry still decides what input is accepted.
    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Class labels for ``model_input``, a frame with (at least) the model's feature columns."""
        return self.predictor.predict(model_input)


mlflow.models.set_model(MMSClassifier())
