"""MLflow pyfunc entry point ("models from code": MLflow stores this file, not a pickle).

Loaded by ``mlflow.pyfunc.load_model`` and by ``mlflow models serve``; it rebuilds the network
from the package's safetensors weights and config. It imports mlflow, numpy, pandas and
mms_portable, which every registered model carries (``code_paths``): a built-in network (mlp,
cnn, gpt) loads wherever the model's pinned requirements are installed, with no MMS.

A user model (``pkg.module:build_fn``) cannot travel that way: its module is the user's code, and
MMS imports it only where the operator trusts it. It loads as it always has, through MMS's own
predictor, so only where MMS and that module are installed and the module is listed in
``MMS_TRUSTED_MODEL_MODULES``; registering one says so (mms_core.registry).
"""

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from mms_portable import ZOO, PortableModelError, Predictor, load_package, model_name


class MMSClassifier(PythonModel):
    """Class labels for rows of raw feature columns, from an MMS package logged as an artifact."""

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the network from the ``package`` artifact (config + safetensors weights)."""
        directory = Path(context.artifacts["package"])
        name = model_name(directory)
        self.predictor = load_package(directory) if name in ZOO else _user_model(directory, name)

    # The hints are for MLflow, which reads them when this file is executed (log, load, serve):
    # without one it warns "Add type hints to the `predict` method" each time. A DataFrame hint
    # adds no type-hint validation or signature of its own (MLflow infers no schema from it), so
    # the explicit signature logged by mms_core.registry still decides what input is accepted.
    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Class labels for ``model_input``, a frame with (at least) the model's feature columns."""
        return self.predictor.predict(model_input)


def _user_model(directory: Path, name: str) -> Predictor:
    """A user model's predictor, through MMS's trust boundary (MMS must be installed here)."""
    try:
        from mms_core.packaging import Predictor as MMSPredictor
    except ImportError as exc:
        raise PortableModelError(
            f"model {name!r} is a user model, not one of MMS's built-in networks {sorted(ZOO)}: it loads"
            f" only where MMS and the module {name.partition(':')[0]!r} are installed, with that module"
            " listed in MMS_TRUSTED_MODEL_MODULES"
        ) from exc
    return MMSPredictor.from_directory(directory)


mlflow.models.set_model(MMSClassifier())
