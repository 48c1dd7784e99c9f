"""The learned policy as an MLflow pyfunc, logged as "models from code" (no pickled objects).

Input: a DataFrame with one column per observation field (`policy.observation.OBS_FIELDS`), one
row per tier; output: a DataFrame with the `action` in [-1, 1] per row.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd

from policy.observation import OBS_FIELDS
from policy.rl import load


class PolicyModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
    """Rows of observation fields -> `action` in [-1, 1], through `policy.rl`'s numpy inference."""

    def load_context(self, context):  # type: ignore[no-untyped-def]
        """Load the policy file logged with the model."""
        self.policy = load(context.artifacts["policy"])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """Actions for a DataFrame with one column per observation field."""
        vectors = np.asarray(pd.DataFrame(model_input)[list(OBS_FIELDS)], dtype=np.float64)
        return pd.DataFrame({"action": self.policy.network.actions(vectors)})


mlflow.models.set_model(PolicyModel())
