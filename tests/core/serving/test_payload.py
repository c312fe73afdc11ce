"""The request parser: every MLflow scoring format maps to the same matrix; every bad input is
refused with a message naming the problem (and the HTTP status the server will answer with)."""

import math

import numpy as np
import pytest

from mms_core.serving.payload import InputSchema, PayloadError, parse_body

SCHEMA = InputSchema(features=["a", "b", "c"], mean=[10.0, 20.0, 30.0], max_rows=4)
ROWS = [[1, 2, 3], [4.5, 5, 6]]


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": ROWS},
        {"instances": ROWS},
        {"inputs": {"a": [1, 4.5], "b": [2, 5], "c": [3, 6]}},
        {"instances": [{"a": 1, "b": 2, "c": 3}, {"c": 6, "b": 5, "a": 4.5, "extra": 0}]},
        {"dataframe_records": [{"a": 1, "b": 2, "c": 3}, {"a": 4.5, "b": 5, "c": 6}]},
        {"dataframe_split": {"columns": ["c", "a", "b"], "data": [[3, 1, 2], [6, 4.5, 5]]}},
        {"dataframe_split": {"data": ROWS}},
        {"inputs": ROWS, "params": {"ignored": True}},
    ],
)
def test_every_format_gives_the_same_matrix(body):
    x = parse_body(body, SCHEMA)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.asarray(ROWS, dtype=np.float32))


def test_a_single_row_without_the_outer_list_is_one_row():
    assert parse_body({"inputs": [1, 2, 3]}, SCHEMA).shape == (1, 3)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ([1, 2], 422, "JSON object"),
        ({"inputs": ROWS, "instances": ROWS}, 422, "exactly one"),
        ({"inputs": []}, 422, "empty"),
        ({"inputs": [[1, 2]]}, 422, "row 0 has 2 values but the model takes 3"),
        ({"inputs": [[1, 2, 3], [1, 2, 3, 4]]}, 422, "row 1 has 4 values"),
        ({"inputs": [[1, "2", 3]]}, 422, "must be a number"),
        ({"inputs": [[1, None, 3]]}, 422, "must be a number"),
        ({"inputs": {"a": [1], "b": [2]}}, 422, "missing 1 feature column(s)"),
        ({"inputs": {"a": [1], "b": [2], "c": [3, 4]}}, 422, "same length"),
        ({"dataframe_split": {"columns": ["a"], "data": [[1]]}}, 422, "missing 2 feature"),
        ({"dataframe_split": [1]}, 422, "dataframe_split must be"),
        ({"dataframe_records": [{"a": 1, "b": 2}]}, 422, "record 0 is missing"),
        ({"inputs": [[1, 2, 3]] * 5}, 413, "limit is 4"),
        ({"inputs": [[1, math.nan, 3]]}, 422, "feature 'b' is NaN"),
        ({"inputs": [[1, 2, math.inf]]}, 422, "feature 'c' is NaN or infinite"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_it(body, status, words):
    with pytest.raises(PayloadError) as info:
        parse_body(body, SCHEMA)
    assert info.value.status == status
    assert words in str(info.value)


def test_impute_policy_replaces_nan_with_the_training_mean():
    schema = InputSchema(features=["a", "b", "c"], mean=[10.0, 20.0, 30.0], nan_policy="impute")
    x = parse_body({"inputs": [[1, math.nan, 3], [math.inf, 5, 6]]}, schema)
    np.testing.assert_array_equal(x, np.asarray([[1, 20, 3], [10, 5, 6]], dtype=np.float32))
