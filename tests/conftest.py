"""Fixtures shared by every test directory. Keep this small: put per-area fixtures beside their tests."""

import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def small_df() -> pd.DataFrame:
    """A tiny, deterministic, well-formed table: 90 rows, 4 float features (f0..f3), 3 classes in 'label'.

    Features have a large offset and spread so that standardisation visibly changes them.
    """
    rng = np.random.default_rng(1234)
    n = 90
    df = pd.DataFrame(
        {f"f{i}": (rng.normal(loc=10.0 * (i + 1), scale=i + 2, size=n)).astype(np.float32) for i in range(4)}
    )
    df["label"] = np.arange(n, dtype=np.int64) % 3
    return df
