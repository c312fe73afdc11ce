"""Metering on a real SQLite file: API keys, usage counters and the quota limiter."""

import hashlib
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mms_core.errors import MMSError
from mms_core.serving.metering import KeyStore, QuotaLimiter, UsageMeter, usage_report

HOUR_10 = datetime(2026, 11, 22, 10, tzinfo=UTC)


class FakeClock:
    """Seconds that only move when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def usage_rows_in_db(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM usage_hourly").fetchone()[0]


def swap_db_for_directory(path: Path) -> Path:
    """Move the database away and put a directory in its place: every open of ``path`` now fails."""
    moved = path.with_name("moved.db")
    path.rename(moved)
    path.mkdir()
    return moved


# --- keys ---------------------------------------------------------------------------------------


def test_create_verify_revoke_round_trip(tmp_path: Path) -> None:
    store = KeyStore(path=tmp_path / "m.db", cache_ttl_s=0)
    token, key = store.create(tenant="acme", quota_rows_per_min=600)
    assert token.startswith(f"mms_{key.key_id}_") and key.key_id.startswith("k_")
    assert (key.tenant, key.admin, key.quota_rows_per_min, key.revoked) == ("acme", False, 600, False)
    assert key.created.tzinfo is not None
    assert store.verify(token) == key

    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert store.verify(wrong) is None

    revoked = store.revoke(key_id=key.key_id)
    assert revoked.revoked and revoked.key_id == key.key_id
    assert store.verify(token) == revoked  # recognised but revoked: the server answers 403, not 401
    assert store.revoke(key_id=key.key_id) == revoked  # idempotent
    assert store.list() == [revoked]


@pytest.mark.parametrize(
    "token",
    ["", "mms_", "Bearer abc", "mms_k_0123456789abcdef", "mms_k_0123_" + "a" * 43, "x" * 10_000, None],
)
def test_verify_rejects_malformed_tokens(tmp_path: Path, token: object) -> None:
    store = KeyStore(path=tmp_path / "m.db")
    store.create(tenant="acme")
    assert store.verify(token) is None  # type: ignore[arg-type]


def test_verify_rejects_unknown_key_with_valid_shape(tmp_path: Path) -> None:
    store = KeyStore(path=tmp_path / "m.db")
    token, key = store.create(tenant="acme")
    other = KeyStore(path=tmp_path / "other.db").create(tenant="acme")[0]
    assert store.verify(other) is None
    assert store.verify(token.replace(key.key_id, "k_" + "0" * 16)) is None


def test_unknown_key_revoke_names_it(tmp_path: Path) -> None:
    store = KeyStore(path=tmp_path / "m.db")
    with pytest.raises(MMSError, match="k_doesnotexist"):
        store.revoke(key_id="k_doesnotexist")


def test_secret_is_not_stored(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    token, key = KeyStore(path=db).create(tenant="acme", admin=True)
    secret = token.removeprefix(f"mms_{key.key_id}_")
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())  # db, -wal, -shm
    assert secret.encode() not in on_disk and token.encode() not in on_disk
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT * FROM api_keys").fetchall()
    assert secret not in repr(rows)
    assert hashlib.sha256(secret.encode()).hexdigest() in repr(rows)  # what is kept instead


def test_second_store_sees_keys_of_the_first(tmp_path: Path) -> None:
    first = KeyStore(path=tmp_path / "m.db")
    token, key = first.create(tenant="team.a", admin=True)
    second = KeyStore(path=tmp_path / "m.db")
    assert second.verify(token) == key
    assert [k.key_id for k in second.list()] == [key.key_id]
    token2, key2 = second.create(tenant="team_b")
    assert first.verify(token2) == key2
    assert [k.key_id for k in first.list()] == [key.key_id, key2.key_id]


def test_revocation_by_another_process_seen_within_cache_ttl(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    clock = FakeClock()
    store = KeyStore(path=db, cache_ttl_s=2.0, clock=clock)
    token, key = store.create(tenant="acme")
    assert store.verify(token) == key  # now cached
    code = "import sys; from pathlib import Path; from mms_core.serving.metering import KeyStore; "
    code += "KeyStore(path=Path(sys.argv[1])).revoke(key_id=sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(db), key.key_id], check=True, timeout=60)

    clock.now += 1.9
    assert store.verify(token).revoked is False  # still answered from the cache, no database read
    clock.now += 0.2
    assert store.verify(token).revoked is True


def test_revoking_through_the_same_store_takes_effect_at_once(tmp_path: Path) -> None:
    store = KeyStore(path=tmp_path / "m.db", cache_ttl_s=60.0, clock=FakeClock())
    token, key = store.create(tenant="acme")
    assert store.verify(token) == key  # cached for a minute
    store.revoke(key_id=key.key_id)
    assert store.verify(token).revoked is True


def test_verify_is_served_from_cache_without_the_database(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    clock = FakeClock()
    store = KeyStore(path=db, cache_ttl_s=5.0, clock=clock)
    token, key = store.create(tenant="acme")
    assert store.verify(token) == key
    swap_db_for_directory(db)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(store.verify(token))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [key] * 8
    assert store.verify(token[:-1] + ("x" if token[-1] != "x" else "y")) is None  # wrong secret, cached too
    clock.now += 5.1
    with pytest.raises(MMSError, match="metering database"):
        store.verify(token)


@pytest.mark.parametrize("tenant", ["", "a" * 65, "acme corp", "acme/prod", "ümlaut", 7])
def test_bad_tenant_is_refused_with_the_rule(tmp_path: Path, tenant: object) -> None:
    store = KeyStore(path=tmp_path / "m.db")
    with pytest.raises(MMSError, match="letters, digits"):
        store.create(tenant=tenant)  # type: ignore[arg-type]
    assert store.list() == []


@pytest.mark.parametrize("quota", [0, -5, 1.5, True, "100"])
def test_bad_quota_is_refused_with_the_fix(tmp_path: Path, quota: object) -> None:
    store = KeyStore(path=tmp_path / "m.db")
    with pytest.raises(MMSError, match="rows per minute > 0"):
        store.create(tenant="acme", quota_rows_per_min=quota)  # type: ignore[arg-type]


def test_reserved_anonymous_tenant_is_refused(tmp_path: Path) -> None:
    store = KeyStore(path=tmp_path / "m.db")
    with pytest.raises(MMSError, match="'anonymous' is reserved"):
        store.create(tenant="anonymous")
    assert store.list() == []


def test_longest_valid_tenant_is_accepted(tmp_path: Path) -> None:
    _, key = KeyStore(path=tmp_path / "m.db").create(tenant="A-z.0_" + "x" * 58)
    assert len(key.tenant) == 64


# --- usage --------------------------------------------------------------------------------------


def test_usage_from_many_threads_is_exact(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    _, key = KeyStore(path=db).create(tenant="acme")
    meter = UsageMeter(path=db, flush_interval_s=0.002)
    meter.start()  # flushes race with the recording threads
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a missing lock shows up

    def work(i: int) -> None:
        for _ in range(500):
            key_id = key.key_id if i % 2 else None
            meter.record(key_id=key_id, model=f"m{i % 3}", version="1", rows=3, compute_ms=0.5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    meter.close()
    meter.close()  # idempotent

    report = usage_report(path=db, since=datetime.now(UTC) - timedelta(hours=1), price_per_1k_rows=2.0)
    assert sum(r.requests for r in report) == 4000
    assert sum(r.rows for r in report) == 12000
    assert sum(r.compute_ms for r in report) == pytest.approx(2000.0)
    by_key = {(r.tenant, r.key_id, r.model): r.requests for r in report}
    # threads 1,3,5,7 use the key (models m1,m0,m2,m1); 0,2,4,6 are anonymous (m0,m2,m1,m0)
    assert by_key == {
        ("acme", key.key_id, "m0"): 500,
        ("acme", key.key_id, "m1"): 1000,
        ("acme", key.key_id, "m2"): 500,
        ("anonymous", "anonymous", "m0"): 1000,
        ("anonymous", "anonymous", "m1"): 500,
        ("anonymous", "anonymous", "m2"): 500,
    }
    assert [r.tenant for r in report] == sorted(r.tenant for r in report)


def test_counts_add_up_over_two_flushes(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    meter = UsageMeter(path=db)
    meter.record(key_id="k_a", model="m", version="2", rows=10, compute_ms=1.5)
    assert meter.flush() == 1
    assert meter.flush() == 0  # nothing new
    meter.record(key_id="k_a", model="m", version="2", rows=5, compute_ms=2.0)
    meter.record(key_id="k_a", model="m", version="3", rows=1, compute_ms=1.0)
    assert meter.flush() == 2
    report = usage_report(path=db, since=datetime.now(UTC) - timedelta(hours=1), price_per_1k_rows=1.0)
    got = [(r.version, r.requests, r.rows, r.compute_ms) for r in report]
    assert got == [("2", 2, 15, 3.5), ("3", 1, 1, 1.0)]
    assert report[0].tenant == "unknown"  # a key id that is not in the key table


def test_record_does_no_io(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    meter = UsageMeter(path=db, clock=FakeClock(HOUR_10.timestamp()))
    meter.record(key_id=None, model="m", version="1", rows=1, compute_ms=1.0)
    assert usage_rows_in_db(db) == 0
    moved = swap_db_for_directory(db)
    for _ in range(100):  # with no database to open, recording still works: it never touches it
        meter.record(key_id=None, model="m", version="1", rows=1, compute_ms=1.0)
    db.rmdir()
    moved.rename(db)
    assert usage_rows_in_db(db) == 0
    assert meter.flush() == 1
    assert usage_report(path=db, since=HOUR_10, price_per_1k_rows=0)[0].requests == 101


def test_failed_flush_keeps_counts_for_the_next(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    meter = UsageMeter(path=db, clock=FakeClock(HOUR_10.timestamp()))
    meter.record(key_id="k_a", model="m", version="1", rows=7, compute_ms=1.0)
    moved = swap_db_for_directory(db)
    with pytest.raises(MMSError, match="metering database"):
        meter.flush()
    meter.record(key_id="k_a", model="m", version="1", rows=3, compute_ms=1.0)  # recorded while failing
    with pytest.raises(MMSError):
        meter.close()  # the final flush fails too: said loudly, counts kept
    db.rmdir()
    moved.rename(db)
    meter.close()  # retry
    (row,) = usage_report(path=db, since=HOUR_10, price_per_1k_rows=0)
    assert (row.requests, row.rows) == (2, 10)


def test_start_after_close_is_refused(tmp_path: Path) -> None:
    meter = UsageMeter(path=tmp_path / "m.db")
    meter.close()
    with pytest.raises(MMSError, match="closed"):
        meter.start()


def test_usage_report_filters_hour_buckets_and_prices(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    _, key = KeyStore(path=db).create(tenant="zeta")
    clock = FakeClock(HOUR_10.timestamp())
    meter = UsageMeter(path=db, clock=clock)
    for hour, rows in [(0, 100), (1, 2000), (2, 30_000)]:
        clock.now = (HOUR_10 + timedelta(hours=hour, minutes=15)).timestamp()
        meter.record(key_id=key.key_id, model="m", version="1", rows=rows, compute_ms=1.0)
        meter.record(key_id=None, model="m", version="1", rows=1, compute_ms=1.0)
    meter.close()

    def rows_for(since: datetime, until: datetime | None) -> dict[str, int]:
        report = usage_report(path=db, since=since, until=until, price_per_1k_rows=0.5)
        return {r.tenant: r.rows for r in report}

    h = timedelta(hours=1)
    assert rows_for(HOUR_10 + h, HOUR_10 + 2 * h) == {"anonymous": 1, "zeta": 2000}
    assert rows_for(HOUR_10 + 1.5 * h, None) == {"anonymous": 2, "zeta": 32_000}  # since rounds down
    assert rows_for(HOUR_10, HOUR_10 + 2 * h + timedelta(seconds=1)) == {"anonymous": 3, "zeta": 32_100}
    assert rows_for(HOUR_10 + 3 * h, None) == {}

    report = usage_report(path=db, since=HOUR_10, until=None, price_per_1k_rows=0.5)
    assert [(r.tenant, r.requests, r.rows, r.cost) for r in report] == [
        ("anonymous", 3, 3, pytest.approx(0.0015)),
        ("zeta", 3, 32_100, pytest.approx(16.05)),
    ]


def test_usage_report_needs_aware_times_and_tolerates_missing_db(tmp_path: Path) -> None:
    with pytest.raises(MMSError, match="timezone"):
        usage_report(path=tmp_path / "m.db", since=datetime(2026, 1, 1), price_per_1k_rows=1)
    with pytest.raises(MMSError, match="price"):
        usage_report(path=tmp_path / "m.db", since=HOUR_10, price_per_1k_rows=-1)
    assert usage_report(path=tmp_path / "none.db", since=HOUR_10, price_per_1k_rows=1) == []
    assert not (tmp_path / "none.db").exists()


# --- quota --------------------------------------------------------------------------------------


def test_quota_admits_up_to_the_limit_then_asks_to_wait() -> None:
    clock = FakeClock()
    limiter = QuotaLimiter(clock=clock)
    for _ in range(6):
        assert limiter.try_acquire(key_id="k", rows=10, limit_per_min=60) == 0.0
    wait = limiter.try_acquire(key_id="k", rows=10, limit_per_min=60)
    assert wait == pytest.approx(10.0)  # 60 rows/min refill 1 row/s; 10 rows missing
    assert limiter.try_acquire(key_id="other", rows=60, limit_per_min=60) == 0.0  # buckets are per key

    clock.now += 4.0
    assert limiter.try_acquire(key_id="k", rows=10, limit_per_min=60) == pytest.approx(6.0)  # nothing taken
    clock.now += 6.0
    assert limiter.try_acquire(key_id="k", rows=10, limit_per_min=60) == 0.0
    assert limiter.try_acquire(key_id="k", rows=1, limit_per_min=60) > 0


def test_quota_refill_is_capped_at_the_limit() -> None:
    clock = FakeClock()
    limiter = QuotaLimiter(clock=clock)
    assert limiter.try_acquire(key_id="k", rows=60, limit_per_min=60) == 0.0
    clock.now += 3600  # an idle hour refills one bucket, not sixty
    assert limiter.try_acquire(key_id="k", rows=60, limit_per_min=60) == 0.0
    assert limiter.try_acquire(key_id="k", rows=1, limit_per_min=60) == pytest.approx(1.0)


def test_oversized_batch_needs_a_full_bucket_and_then_pays_for_it() -> None:
    clock = FakeClock()
    limiter = QuotaLimiter(clock=clock)
    assert limiter.try_acquire(key_id="k", rows=1, limit_per_min=60) == 0.0
    assert limiter.try_acquire(key_id="k", rows=120, limit_per_min=60) == pytest.approx(1.0)  # until full
    clock.now += 1.0
    assert limiter.try_acquire(key_id="k", rows=120, limit_per_min=60) == 0.0  # drains to -60
    assert limiter.try_acquire(key_id="k", rows=1, limit_per_min=60) == pytest.approx(61.0)


def test_quota_is_exact_under_threads() -> None:
    limiter = QuotaLimiter(clock=FakeClock())
    admitted: list[float] = []

    def work() -> None:
        for _ in range(200):
            if limiter.try_acquire(key_id="k", rows=1, limit_per_min=500) == 0.0:
                admitted.append(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 500


def test_quota_rejects_nonsense() -> None:
    limiter = QuotaLimiter()
    with pytest.raises(MMSError):
        limiter.try_acquire(key_id="k", rows=-1, limit_per_min=60)
    with pytest.raises(MMSError):
        limiter.try_acquire(key_id="k", rows=1, limit_per_min=0)
