"""Tests of the Python client against a running Weir (scripts/check-python runs them).

Environment:
  WEIR_ADDR     the server to test, for example 127.0.0.1:50051 (required)
  WEIR_API_KEY  a key of a tenant with the SQLite demo source "demo" (default "demo")
  WEIR_BIN      the weir binary, for the rate-limit test that starts its own server
                (default $CARGO_TARGET_DIR/debug/weir, then ~/.cache/weir-target/debug/weir)
  WEIR_PY_STUBS the directory of the generated weir/v1/*_pb2*.py (default ./gen)
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import time
from typing import Iterator

import grpc
import pytest

import client
from weir.v1 import schema_pb2

SOURCE = "demo"


@pytest.fixture(scope="module")
def weir() -> Iterator[client.Weir]:
    addr = os.environ.get("WEIR_ADDR")
    if not addr:
        pytest.skip("WEIR_ADDR is not set: start weir and point WEIR_ADDR at it (see scripts/check-python)")
    with client.Weir(addr, os.environ.get("WEIR_API_KEY", "demo")) as w:
        yield w


def test_list_sources(weir: client.Weir) -> None:
    sources = {s.name: s for s in weir.list_sources()}
    assert SOURCE in sources, f"no source {SOURCE!r} in {list(sources)}"
    demo = sources[SOURCE]
    assert demo.engine == schema_pb2.ENGINE_SQLITE
    assert demo.capabilities.query
    assert demo.capabilities.parameter_style == "?"


def test_unary_count(weir: client.Weir) -> None:
    result = weir.execute(SOURCE, "SELECT count(*) FROM customers")
    assert len(result.columns) == 1
    assert len(result.rows) == 1
    assert client.from_value(result.rows[0].values[0]) == 500
    assert result.stats.rows_returned == 1


def test_unary_parameters(weir: client.Weir) -> None:
    result = weir.execute(SOURCE, "SELECT ? + 1 AS n, ? AS s, ? AS z", [41, "weir", None])
    assert client.rows(result.columns, result.rows) == [{"n": 42, "s": "weir", "z": None}]


def test_stream_orders(weir: client.Weir) -> None:
    messages = list(weir.execute_stream(SOURCE, "SELECT * FROM orders", max_batch_rows=500))
    kinds = [m.WhichOneof("payload") for m in messages]
    assert kinds[0] == "metadata", kinds
    assert kinds[-1] == "stats", kinds
    assert set(kinds[1:-1]) == {"batch"}, kinds
    batches = [m.batch for m in messages[1:-1]]
    assert len(batches) >= 6, f"3000 rows in batches of at most 500 came in {len(batches)} batches"
    assert all(0 < len(b.rows) <= 500 for b in batches)
    total = sum(len(b.rows) for b in batches)
    assert total == 3000
    assert messages[-1].stats.rows_returned == 3000
    columns = [c.name for c in messages[0].metadata.columns]
    assert "id" in columns
    assert all(len(r.values) == len(columns) for b in batches for r in b.rows)


def test_stream_orders_as_arrow(weir: client.Weir) -> None:
    # pyarrow, Arrow's reference implementation, reads the joined pieces as one IPC stream.
    import pyarrow as pa

    sql = (
        "SELECT o.id, o.status, o.ordered_at, c.signed_up, c.vip, o.id * 2 AS twice "
        "FROM orders o JOIN customers c ON c.id = o.customer_id ORDER BY o.id"
    )
    messages = list(
        weir.execute_stream(SOURCE, sql, max_batch_rows=1000, result_format=client.query_pb2.RESULT_FORMAT_ARROW_IPC)
    )
    kinds = [m.WhichOneof("payload") for m in messages]
    assert kinds == ["metadata"] + ["arrow_ipc"] * 4 + ["stats"], kinds
    table = pa.ipc.open_stream(b"".join(m.arrow_ipc for m in messages[1:-1])).read_all()
    assert table.num_rows == 3000
    assert table.column_names == [c.name for c in messages[0].metadata.columns]
    schema = table.schema
    assert schema.field("id").type == pa.int64()
    assert schema.field("status").type == pa.string()
    assert schema.field("ordered_at").type == pa.timestamp("us")
    assert schema.field("signed_up").type == pa.date32()
    assert schema.field("vip").type == pa.bool_()
    # SQLite declares no type for an expression: its first batch's values type it.
    assert schema.field("twice").type == pa.int64()
    assert schema.field("id").metadata[b"weir.native_type"] == b"INTEGER"
    result = weir.execute(SOURCE, sql)
    rows = client.rows(result.columns, result.rows)
    assert table.column("id").to_pylist() == [r["id"] for r in rows]
    assert table.column("status").to_pylist() == [r["status"] for r in rows]
    assert table.column("vip").to_pylist() == [r["vip"] for r in rows]
    assert table.column("twice").to_pylist() == [2 * r["id"] for r in rows]
    assert messages[-1].stats.rows_returned == 3000


def test_compressed_calls(weir: client.Weir) -> None:
    # grpcio compresses its requests with gzip; Weir takes them (and answers
    # plainly: this server does not set server.compression).
    addr = os.environ["WEIR_ADDR"]
    with client.Weir(addr, os.environ.get("WEIR_API_KEY", "demo"), compression=grpc.Compression.Gzip) as gz:
        messages = list(gz.execute_stream(SOURCE, "SELECT * FROM orders", max_batch_rows=500))
        assert sum(len(m.batch.rows) for m in messages if m.WhichOneof("payload") == "batch") == 3000
        plain = weir.execute(SOURCE, "SELECT count(*), max(status) FROM orders")
        zipped = gz.execute(SOURCE, "SELECT count(*), max(status) FROM orders")
        assert zipped.rows == plain.rows


def test_unknown_source_error_details(weir: client.Weir) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        weir.execute("no_such_source", "SELECT 1")
    details = client.error_details(caught.value)
    assert details["code"] == grpc.StatusCode.NOT_FOUND
    assert details["reason"] == "SOURCE_NOT_FOUND"
    assert details["domain"] == "weir.dev"


# --- a server of our own, with a tiny rate limit ---------------------------


def weir_binary() -> pathlib.Path | None:
    candidates = [os.environ.get("WEIR_BIN")]
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(os.path.join(os.environ["CARGO_TARGET_DIR"], "debug", "weir"))
    candidates.append(os.path.expanduser("~/.cache/weir-target/debug/weir"))
    # Where the README's `cargo run` builds it without CARGO_TARGET_DIR.
    candidates.append(str(pathlib.Path(__file__).resolve().parents[2] / "target" / "debug" / "weir"))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return pathlib.Path(c)
    return None


RATE_LIMITED_KEY = "python-test-rate-limited-key"

DOWN_KEY = "python-test-down"
RATE_LIMITED_CONFIG = f"""
[server]
listen = "127.0.0.1:0"        # a free port, read back from the log
shutdown_grace = "1s"

[metrics]
listen = "127.0.0.1:0"        # a free port too: 9090 may be taken by another weir

[tenants.slow]
api_keys = [{{ id = "python-test", sha256 = "{hashlib.sha256(RATE_LIMITED_KEY.encode()).hexdigest()}" }}]

[tenants.slow.limits]
requests_per_second = 1
burst = 1

[tenants.slow.sources.demo]
engine = "sqlite"
path = ":memory:"
demo_data = true

[tenants.down]
api_keys = [{{ id = "python-test-down", sha256 = "{hashlib.sha256(DOWN_KEY.encode()).hexdigest()}" }}]

[tenants.down.sources.pg]        # nothing listens on port 1
engine = "postgres"
host = "127.0.0.1"
port = 1
user = "nobody"
"""


@pytest.fixture(scope="module")
def rate_limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = weir_binary()
    if binary is None:
        pytest.skip("no weir binary: set WEIR_BIN or build it with cargo build --bin weir")
    tmp = tmp_path_factory.mktemp("weir-rate-limited")
    config = tmp / "weir.toml"
    config.write_text(RATE_LIMITED_CONFIG)
    log_path = tmp / "weir.log"
    # Only this test's settings: drop WEIR__ overrides meant for another server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR__") and k != "WEIR_CONFIG"}
    env.update(WEIR_LOG_FORMAT="json", WEIR_LOG="info", TMPDIR=str(tmp))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(binary), "--config", str(config)], stdout=log, stderr=log, env=env)
    try:
        addr = None
        deadline = time.monotonic() + 30
        while addr is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"weir exited with status {proc.returncode}:\n{log_path.read_text()}")
            for line in log_path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("message") == "weir listening":
                    addr = event["addr"]
            time.sleep(0.05)
        if addr is None:
            pytest.fail(f"weir did not start listening within 30 s:\n{log_path.read_text()}")
        yield addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_rate_limit_retry_info(rate_limited_server: str) -> None:
    with client.Weir(rate_limited_server, RATE_LIMITED_KEY) as weir:
        # Burst 1: the first call takes the only token, the next ones are refused
        # until a token comes back, one per second.
        first = weir.execute(SOURCE, "SELECT 1")
        assert client.from_value(first.rows[0].values[0]) == 1
        with pytest.raises(grpc.RpcError) as caught:
            for _ in range(5):
                weir.execute(SOURCE, "SELECT 1")
        err = caught.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = client.error_details(err)
        assert details["reason"] == "RATE_LIMITED"
        assert details["metadata"].get("limit") == "1"
        delay = client.retry_delay(err)
        assert delay is not None, "RESOURCE_EXHAUSTED without RetryInfo"
        assert 0 < delay.total_seconds() <= 1.0, delay

        # Waiting as told is enough for the next call to pass.
        time.sleep(delay.total_seconds() + 0.05)
        again = weir.execute(SOURCE, "SELECT 2")
        assert client.from_value(again.rows[0].values[0]) == 2

        # with_retries does that wait by itself.
        result = client.with_retries(lambda: weir.execute(SOURCE, "SELECT 3"))
        assert client.from_value(result.rows[0].values[0]) == 3


def test_with_retries_runs_a_statement_twice_only_when_told_it_is_idempotent(rate_limited_server: str) -> None:
    with client.Weir(rate_limited_server, DOWN_KEY) as weir:
        calls = 0

        def insert() -> object:
            nonlocal calls
            calls += 1
            return weir.execute("pg", "INSERT INTO t VALUES (1)")

        # UNAVAILABLE with a RetryInfo delay, but the statement may have run
        # before the connection went: not retried unless idempotent.
        with pytest.raises(grpc.RpcError) as caught:
            client.with_retries(insert, attempts=3)
        assert client.error_details(caught.value)["reason"] == "SOURCE_UNAVAILABLE"
        assert client.retry_delay(caught.value) is not None
        assert calls == 1
        with pytest.raises(grpc.RpcError):
            client.with_retries(insert, attempts=2, idempotent=True)
        assert calls == 3


def test_values_keep_their_type_both_ways() -> None:
    import datetime as dt
    import decimal
    import uuid

    cases = [
        2**63 - 1,
        2**64 - 1,
        -(2**63),
        decimal.Decimal("12345678901234567890.0001"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        dt.date(2024, 2, 29),
        dt.datetime(2024, 2, 29, 12, 30, 15, 250000, tzinfo=dt.timezone.utc),
        b"\x00\xff",
        "text",
        None,
        [1, None, "a"],
    ]
    for value in cases:
        assert client.from_value(client.to_value(value)) == value, value
    # Types without a value of their own go as what they are, not as their str().
    assert client.to_value({"a": 1}).json_value == '{"a": 1}'
    assert client.to_value(bytearray(b"\x01")).bytes_value == b"\x01"
    assert client.to_value((1, 2)).WhichOneof("kind") == "list_value"
    assert client.to_value(dt.timedelta(days=1, seconds=2)).interval_value.microseconds == 86_402_000_000
    assert client.to_value(dt.timedelta(seconds=-1)).interval_value.microseconds == -1_000_000
    assert client.to_value(dt.time(12, 30)).time_value.HasField("utc_offset_seconds") is False
    with pytest.raises(TypeError, match="set has no Weir value"):
        client.to_value({1})
    assert client.to_value(2**64).WhichOneof("kind") == "decimal_value"
    with pytest.raises(ValueError, match="time zone"):
        client.to_value(dt.datetime(2024, 1, 1))
    # Dates Python cannot hold stay messages instead of raising.
    from weir.v1 import values_pb2

    bc = values_pb2.Value(date_value=values_pb2.Date(year=-44, month=3, day=15))
    assert client.from_value(bc).year == -44
