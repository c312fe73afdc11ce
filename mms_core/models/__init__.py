"""Model zoo (mlp, cnn, gpt) and user models by import path "pkg.module:build_fn".

Loading a registered package imports only the zoo and the operator's MMS_TRUSTED_MODEL_MODULES
(:func:`trusted_modules`); a run building its own model is not restricted.
"""

from mms_core.models.zoo import ModelSpec, build_model, trusted_modules, trusting

__all__ = ["ModelSpec", "build_model", "trusted_modules", "trusting"]
