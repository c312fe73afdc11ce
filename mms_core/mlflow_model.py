"""MLflow pyfunc entry point ("models from code": MLflow stores this file, not a pickle).

Loaded by ``mlflow.pyfunc.load_model`` and by ``mlflow models serve``; it rebuilds the network
from the package's safetensors weights and config.
"""

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class MMSClassifier(PythonModel):
    def load_context(self, context):
        from mms_core.packaging import Predictor

        self.predictor = Predictor.from_directory(Path(context.artifacts["package"]))

    def predict(self, context, model_input, params=None):
        return self.predictor.predict(model_input)


mlflow.models.set_model(MMSClassifier())
