"""What a registered MMS model needs to load and predict without MMS.

The built-in networks (``mlp``, ``cnn``, ``gpt``), the int8 weight format and the predictor
(standardise raw rows, run the network, map the argmax to class labels). Each registered model
carries this package (MLflow ``code_paths``), so ``mlflow.pyfunc.load_model`` and ``mlflow models
serve`` need only the model's pinned requirements: :data:`DEPENDENCIES` and mlflow. MMS uses the
same modules (mms_core.models.zoo, mms_core.compress, mms_core.packaging): one copy of the code
that computes a prediction.

Rule for every module here: import only the standard library and :data:`DEPENDENCIES`, never
mms_core (tests/core/test_portable_model.py checks it), and import nothing a package names.
"""

from mms_portable.errors import PortableModelError
from mms_portable.predictor import CONFIG, WEIGHTS, Predictor, load_package, model_name
from mms_portable.zoo import ZOO

# The distributions this package imports (besides the standard library): with mlflow, the
# requirements a registered model is logged with (mms_core.registry pins them).
DEPENDENCIES = ("torch", "safetensors", "numpy", "pandas")

__all__ = [
    "CONFIG",
    "DEPENDENCIES",
    "WEIGHTS",
    "ZOO",
    "PortableModelError",
    "Predictor",
    "load_package",
    "model_name",
]
