"""Credentials in specs, URLs and API keys: used where needed, masked in everything stored or shown
(MLflow params, hashes, error messages, CLI output)."""

from __future__ import annotations

import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import SecretStr

from mms_core import registry, storage
from mms_core.data.ingest import DataSpec, load_source
from mms_core.errors import DataError, MMSError, MonitoringError
from mms_core.secrets import MASK, redact_mapping, redact_text, redact_url
from mms_core.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
KEY, SECRET = "AKIAEXAMPLESECRET", "wJalrSecretValue123"
CREDENTIALS = [f"data.storage_options.key={KEY}", f"data.storage_options.secret={SECRET}"]
ENDPOINT = "data.storage_options.endpoint_url=http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://mms:pw@db:5432/optuna", "postgresql://mms:***@db:5432/optuna"),
        ("redis://:s3cret@127.0.0.1:6379/0?stream=in", "redis://:***@127.0.0.1:6379/0?stream=in"),
        ("mysql://u@h/db?password=x&charset=utf8", "mysql://u@h/db?password=***&charset=utf8"),
        ("https://h/f.csv?X-Amz-Signature=abc&X-Amz-Security-Token=t", "https://h/f.csv?X-Amz-Signature=***&X-Amz-Security-Token=***"),
        ("builtin://pystdlib?seq_len=64&tokenizer=bpe", "builtin://pystdlib?seq_len=64&tokenizer=bpe"),
        ("sqlite:////home/u/.mms/optuna.db", "sqlite:////home/u/.mms/optuna.db"),
        ("/data/table.csv", "/data/table.csv"),
        ("http://u:p@[::1/x", "http://***@[::1/x"),  # unparsable (open IPv6 bracket): still masked
    ],
)  # fmt: skip
def test_redact_url_masks_passwords_and_secret_query_values_only(url, shown):
    assert redact_url(url) == shown


def test_redact_text_and_mapping():
    text = "cannot connect to postgresql://mms:pw@db/optuna (timeout); see redis://:x@h:1/0."
    assert (
        redact_text(text)
        == "cannot connect to postgresql://mms:***@db/optuna (timeout); see redis://:***@h:1/0."
    )
    options = {"key": SecretStr(KEY), "token": "t", "endpoint_url": SecretStr("http://u:p@minio:9000")}
    assert redact_mapping(options, public=frozenset({"endpoint_url"})) == {
        "key": MASK, "token": MASK, "endpoint_url": "http://u:***@minio:9000",
    }  # fmt: skip


def test_yaml_and_set_credentials_parse_as_secrets_and_the_json_form_masks_them(tmp_path):
    path = tmp_path / "s3.yaml"
    path.write_text(
        f"data:\n  source: s3://b/t.csv\n  storage_options: {{key: {KEY}, endpoint_url: http://h:9000}}\n"
    )
    from_yaml = load_spec(path, overrides=[f"data.storage_options.secret={SECRET}"])
    options = from_yaml.data.storage_options
    assert options["key"].get_secret_value() == KEY and options["secret"].get_secret_value() == SECRET
    dumped = from_yaml.model_dump_json()
    assert KEY not in dumped and SECRET not in dumped and KEY not in repr(from_yaml)
    assert from_yaml.model_dump(mode="json")["data"]["storage_options"] == {
        "key": MASK, "endpoint_url": "http://h:9000", "secret": MASK,
    }  # fmt: skip
    assert from_yaml.masked_fields() == ["data.storage_options.key", "data.storage_options.secret"]
    assert load_spec(overrides=[ENDPOINT]).masked_fields() == []


def test_the_spec_hash_ignores_credentials_and_is_unchanged_for_specs_without():
    plain = load_spec(overrides=[ENDPOINT])
    raw = plain.model_dump(mode="json")
    assert raw["data"]["storage_options"] == {"endpoint_url": "http://127.0.0.1:9000"}  # as before
    assert plain.hash == storage.canonical_hash(raw)
    with_keys = load_spec(overrides=[ENDPOINT, *CREDENTIALS])
    rotated = load_spec(
        overrides=[ENDPOINT, "data.storage_options.key=OTHER", "data.storage_options.secret=x"]
    )
    assert with_keys.hash == rotated.hash != plain.hash


def test_tuning_rebuilds_specs_with_the_real_credentials():
    from mms_core.tuning.space import TuneSpec, best_spec, trial_spec

    spec = load_spec(overrides=CREDENTIALS)
    tune = TuneSpec.model_validate({"params": {"training.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}})
    for rebuilt in (
        best_spec(spec=spec, params={"training.lr": 0.005}),
        trial_spec(spec=spec, tune=tune, params={}),
    ):
        assert rebuilt.data.storage_options["secret"].get_secret_value() == SECRET


def test_ingest_reads_with_the_credentials_and_refuses_the_mask(tmp_path, small_df):
    csv = tmp_path / "t.csv"
    small_df.to_csv(csv, index=False)
    # fsspec hands storage options to the local filesystem too, which ignores key/secret
    spec = DataSpec(source=csv.as_uri(), storage_options={"key": KEY, "secret": SECRET})
    assert len(load_source(spec=spec)) == len(small_df)
    masked = DataSpec.model_validate(spec.model_dump(mode="json"))  # read back from MLflow params
    with pytest.raises(DataError, match=r"\['key', 'secret'\] hold the mask.*AWS_ACCESS_KEY_ID"):
        load_source(spec=masked)


def test_mlflow_params_hold_no_credentials_and_retraining_drops_them(tmp_path):
    from mms_core.monitoring.check import retrain_spec

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_spec(overrides=[ENDPOINT, *CREDENTIALS])
    experiment = registry.ensure_experiment(tracking_uri=tracking, name="t", artifact_root=None)
    run_id = registry.start_run(
        tracking_uri=tracking, experiment_id=experiment, run_name="r", tags={},
        params={"spec": spec.model_dump_json(), "study": "postgresql://mms:pgPassw0rd@db/optuna"},
    )  # fmt: skip
    params = registry.client(tracking_uri=tracking).get_run(run_id).data.params
    assert KEY not in str(params) and SECRET not in str(params) and "pgPassw0rd" not in str(params), params
    assert params["study"] == "postgresql://mms:***@db/optuna"
    fresh = retrain_spec(tracking_uri=tracking, run_id=run_id, fresh_data_uri=str(tmp_path / "new.csv"))
    assert {k: v.get_secret_value() for k, v in fresh.data.storage_options.items()} == {
        "endpoint_url": "http://127.0.0.1:9000"
    }


def test_monitoring_sends_the_api_key_and_never_shows_it():
    from mms_core.monitoring.live import fetch_server

    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            self.send_response(403)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        with pytest.raises(MonitoringError):
            fetch_server(
                url=f"http://127.0.0.1:{port}", model="m@champion", version="1", api_key=SecretStr("k-1")
            )
        assert set(seen) == {"Bearer k-1"}  # statistics and /metrics
        with pytest.raises(MonitoringError) as err:  # credentials in the URL: httpx sends them
            fetch_server(url=f"http://user:urlPass@127.0.0.1:{port}", model="m@champion", version="1")
    finally:
        server.shutdown()
    assert "urlPass" not in str(err.value) and "user:***@127.0.0.1" in str(err.value)


def test_mms_tune_prints_the_study_database_without_its_password(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mms_cli.main import app

    url = "postgresql://mms:pgPassw0rd@db.example:5432/optuna"
    monkeypatch.setenv("MMS_HOME", str(tmp_path))
    monkeypatch.setenv("MMS_TUNING_STORAGE", url)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # "external": no server starts
    for var in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH"):  # restored after the test
        monkeypatch.setenv(var, str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "10")

    def tuning(**_):  # the study's database refuses, quoting its URL as database errors do
        raise MMSError(f"cannot open the study database {url}: connection refused")

    monkeypatch.setitem(sys.modules, "flows.tuning", types.SimpleNamespace(tuning=tuning))
    result = CliRunner().invoke(app, ["tune", str(REPO / "examples" / "digits-tune.yaml")])
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())  # rich wraps lines at the terminal's width
    assert "study database postgresql://mms:***@db.example:5432/optuna" in output
    assert "error: cannot open the study database postgresql://mms:***@db.example" in output
    assert "pgPassw0rd" not in result.output
