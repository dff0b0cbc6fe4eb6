"""A small Python client for Weir, built on stubs generated from proto/weir/v1.

Generate the stubs first (see README.md), then:

    python client.py                      # the demo server: 127.0.0.1:50051, key "demo"
    WEIR_ADDR=weir.example:50051 WEIR_API_KEY=... python client.py --source main --sql "select 1"   # also streams it (--stream-sql to change)
    WEIR_ADDR=https://weir.example:50051 WEIR_CA_CERT=ca.pem ...   # TLS; without WEIR_CA_CERT, the system's authorities

It lists the tenant's sources, runs one unary Execute, reads one ExecuteStream
and shows how to honour RetryInfo when the server answers RESOURCE_EXHAUSTED.
The functions are reused by test_client.py.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import json
import os
import sys
import time
import uuid
from typing import Any, Callable, Iterator, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# The generated modules (package weir.v1) live in ./gen unless WEIR_PY_STUBS
# names another directory.
sys.path.insert(0, os.environ.get("WEIR_PY_STUBS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen")))

from weir.v1 import query_pb2, query_pb2_grpc, schema_pb2, schema_pb2_grpc, values_pb2  # noqa: E402

T = TypeVar("T")


def target(addr: str) -> str:
    """gRPC target from WEIR_ADDR, which weirctl writes as http://host:port."""
    for prefix in ("http://", "https://"):
        if addr.startswith(prefix):
            return addr[len(prefix) :]
    return addr


def auth(api_key: str) -> list[tuple[str, str]]:
    """Every weir.v1 call carries the API key as a bearer token."""
    return [("authorization", f"Bearer {api_key}")]


class Weir:
    """The two services on one channel, with the key attached to every call."""

    def __init__(
        self, addr: str, api_key: str, timeout: float = 30.0, compression: grpc.Compression = grpc.Compression.NoCompression
    ):
        # With grpc.Compression.Gzip, requests go compressed; answers are
        # compressed where the server sets server.compression = "gzip".
        # https://, or a CA certificate in WEIR_CA_CERT, is TLS (the system's
        # authorities, or WEIR_CA_CERT's): never send the key in plaintext to
        # an address that asked for TLS, nor when TLS settings were given.
        ca_path = os.environ.get("WEIR_CA_CERT")
        if addr.startswith("http://") and ca_path:
            raise ValueError("WEIR_CA_CERT is set but the address is http://: use https:// or host:port")
        if addr.startswith("https://") or ca_path:
            ca = None
            if ca_path:
                with open(ca_path, "rb") as f:
                    ca = f.read()
            credentials = grpc.ssl_channel_credentials(root_certificates=ca)
            self.channel = grpc.secure_channel(target(addr), credentials, compression=compression)
        else:
            self.channel = grpc.insecure_channel(target(addr), compression=compression)
        self.query = query_pb2_grpc.QueryServiceStub(self.channel)
        self.schema = schema_pb2_grpc.SchemaServiceStub(self.channel)
        self.metadata = auth(api_key)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Weir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_sources(self) -> list[schema_pb2.SourceInfo]:
        reply = self.schema.ListSources(schema_pb2.ListSourcesRequest(), metadata=self.metadata, timeout=self.timeout)
        return list(reply.sources)

    def execute(self, source: str, sql: str, params: list[Any] | None = None) -> query_pb2.ExecuteResponse:
        request = query_pb2.ExecuteRequest(source=source, sql=sql, params=[to_value(p) for p in params or []])
        return self.query.Execute(request, metadata=self.metadata, timeout=self.timeout)

    def execute_stream(
        self,
        source: str,
        sql: str,
        params: list[Any] | None = None,
        max_batch_rows: int = 0,
        result_format: int = query_pb2.RESULT_FORMAT_ROWS,
    ) -> Iterator[query_pb2.ExecuteStreamResponse]:
        """Yields the stream's messages: metadata, row batches (or, with
        result_format=query_pb2.RESULT_FORMAT_ARROW_IPC, pieces of one Arrow
        IPC stream), stats.

        Raises RuntimeError when the stream ends without stats: the rows
        received until then are incomplete.
        """
        request = query_pb2.ExecuteStreamRequest(
            source=source,
            sql=sql,
            params=[to_value(p) for p in params or []],
            max_batch_rows=max_batch_rows,
            format=result_format,
        )
        saw_stats = False
        for message in self.query.ExecuteStream(request, metadata=self.metadata, timeout=self.timeout):
            saw_stats = message.WhichOneof("payload") == "stats"
            yield message
        if not saw_stats:
            raise RuntimeError("the stream ended without stats: its result is incomplete")


def to_value(v: Any) -> values_pb2.Value:
    """A Python value as a weir.v1.Value parameter, typed so that nothing is lost."""
    if v is None:
        return values_pb2.Value(null=True)
    if isinstance(v, bool):
        return values_pb2.Value(bool_value=v)
    if isinstance(v, int):
        if -(2**63) <= v < 2**63:
            return values_pb2.Value(int64_value=v)
        if 0 <= v < 2**64:
            return values_pb2.Value(uint64_value=v)
        return values_pb2.Value(decimal_value=str(v))
    if isinstance(v, float):
        return values_pb2.Value(double_value=v)
    if isinstance(v, decimal.Decimal):
        return values_pb2.Value(decimal_value=str(v))
    if isinstance(v, (bytes, bytearray, memoryview)):
        return values_pb2.Value(bytes_value=bytes(v))
    if isinstance(v, uuid.UUID):
        return values_pb2.Value(uuid_value=str(v))
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None:
            raise ValueError(f"{v!r} has no time zone: give it a tzinfo (datetime.timezone.utc for a wall-clock time)")
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(v)
        return values_pb2.Value(timestamp_value=ts)
    if isinstance(v, datetime.date):
        return values_pb2.Value(date_value=values_pb2.Date(year=v.year, month=v.month, day=v.day))
    if isinstance(v, datetime.time):
        offset = v.utcoffset()
        return values_pb2.Value(
            time_value=values_pb2.TimeOfDay(
                hours=v.hour,
                minutes=v.minute,
                seconds=v.second,
                nanos=v.microsecond * 1000,
                utc_offset_seconds=None if offset is None else int(offset.total_seconds()),
            )
        )
    if isinstance(v, datetime.timedelta):
        # Exact time, all in microseconds: a day in an interval is a calendar day.
        return values_pb2.Value(interval_value=values_pb2.Interval(microseconds=v // datetime.timedelta(microseconds=1)))
    if isinstance(v, (list, tuple)):
        return values_pb2.Value(list_value=values_pb2.ListValue(values=[to_value(x) for x in v]))
    if isinstance(v, dict):
        return values_pb2.Value(json_value=json.dumps(v))
    if isinstance(v, str):
        return values_pb2.Value(string_value=v)
    # str() of anything else (a set, an object) is not what the caller meant to send.
    raise TypeError(f"{type(v).__name__} has no Weir value: convert it to str, bytes, a number, a date or a list")


def from_value(v: values_pb2.Value) -> Any:
    """A weir.v1.Value as a Python value. Times of day, intervals, and dates
    and timestamps Python cannot hold (before year 1, after 9999) stay messages."""
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null":
        return None
    if kind == "list_value":
        return [from_value(x) for x in v.list_value.values]
    if kind == "decimal_value":
        return decimal.Decimal(v.decimal_value)
    if kind == "uuid_value":
        return uuid.UUID(v.uuid_value)
    try:
        if kind == "timestamp_value":
            return v.timestamp_value.ToDatetime(tzinfo=datetime.timezone.utc)
        if kind == "date_value":
            d = v.date_value
            return datetime.date(d.year, d.month, d.day)
    except (ValueError, OverflowError):
        return getattr(v, kind)
    return getattr(v, kind)


def rows(columns: Any, rows_: Any) -> list[dict[str, Any]]:
    names = [c.name for c in columns]
    return [dict(zip(names, (from_value(x) for x in r.values))) for r in rows_]


def error_details(err: grpc.RpcError) -> dict[str, Any]:
    """The google.rpc details of a failed call: reason, metadata and retry delay.

    Weir sends them in grpc-status-details-bin; rpc_status.from_call decodes
    that header into a google.rpc.Status whose details are Any messages.
    """
    out: dict[str, Any] = {"code": err.code(), "message": err.details(), "reason": None, "retry_delay": None}
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
            out["domain"] = info.domain
            out["metadata"] = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out["retry_delay"] = retry.retry_delay.ToTimedelta()
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out["field_violations"] = [(f.field, f.description) for f in bad.field_violations]
    return out


def retry_delay(err: grpc.RpcError) -> datetime.timedelta | None:
    """The RetryInfo delay of a failed call, or None when retrying will not help."""
    delay: datetime.timedelta | None = error_details(err)["retry_delay"]
    return delay


# Reasons that mean the call was refused before anything reached the
# database: retrying them cannot run a statement twice.
REFUSED_BEFORE_RUNNING = frozenset(
    {
        "RATE_LIMITED",
        "CONCURRENCY_LIMITED",
        "GATEWAY_SATURATED",
        "POOL_EXHAUSTED",
        "SOURCE_CIRCUIT_OPEN",
        "GLOBAL_LIMITS_UNAVAILABLE",
        "TRANSACTION_BUSY",
        "STREAM_CONCURRENCY_LIMITED",
        "TRANSACTION_LIMIT",
        "LOAD_CONCURRENCY_LIMITED",
        "CONSUMER_CONCURRENCY_LIMITED",
        "SUBSCRIPTION_CONCURRENCY_LIMITED",
    }
)


def with_retries(call: Callable[[], T], attempts: int = 5, idempotent: bool = False) -> T:
    """Runs call(), waiting as RetryInfo says before trying again.

    Only refusals that ran nothing are retried, unless the call is
    idempotent: an UNAVAILABLE from a connection lost mid-statement
    (SOURCE_UNAVAILABLE, ENGINE_UNAVAILABLE, SHUTTING_DOWN) may come after the
    statement ran, and running an INSERT again would insert twice.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except grpc.RpcError as err:
            delay = retry_delay(err)
            reason = error_details(err)["reason"]
            retryable = reason in REFUSED_BEFORE_RUNNING or (
                idempotent and err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
            )
            if not retryable or delay is None or attempt == attempts:
                raise
            print(f"  {err.code().name} ({reason}): retrying in {delay.total_seconds():.3f}s")
            time.sleep(delay.total_seconds())
    raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default=os.environ.get("WEIR_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--key", default=os.environ.get("WEIR_API_KEY", "demo"))
    parser.add_argument("--source", default="demo")
    parser.add_argument("--sql", help="the unary statement (default: the demo's SELECT count(*) FROM customers)")
    parser.add_argument("--stream-sql", help="the streamed statement (default: --sql, or the demo's SELECT * FROM orders)")
    args = parser.parse_args()
    # A statement given for another source is streamed too: the demo's
    # tables are not there.
    args.stream_sql = args.stream_sql or args.sql or "SELECT * FROM orders"
    args.sql = args.sql or "SELECT count(*) FROM customers"

    with Weir(args.addr, args.key) as weir:
        try:
            print("Sources:")
            for s in weir.list_sources():
                engine = schema_pb2.Engine.Name(s.engine)
                print(f"  {s.name}: {engine} {s.server_version} healthy={s.healthy} read_only={s.read_only}")

            print(f"\nExecute: {args.sql}")
            result = with_retries(lambda: weir.execute(args.source, args.sql))
            for row in rows(result.columns, result.rows)[:10]:
                print(f"  {row}")
            print(f"  ({result.stats.rows_returned} rows in {result.stats.elapsed.ToTimedelta().total_seconds():.4f}s)")

            print(f"\nExecuteStream: {args.stream_sql}")
            columns: list[Any] = []
            total = batches = 0
            for message in weir.execute_stream(args.source, args.stream_sql):
                kind = message.WhichOneof("payload")
                if kind == "metadata":
                    columns = list(message.metadata.columns)
                    print(f"  columns: {', '.join(c.name for c in columns)}")
                elif kind == "batch":
                    batches += 1
                    total += len(message.batch.rows)
                    if batches == 1 and message.batch.rows:
                        print(f"  first row: {rows(columns, message.batch.rows[:1])[0]}")
                elif kind == "stats":
                    print(f"  {total} rows in {batches} batches; server counted {message.stats.rows_returned}")
        except grpc.RpcError as err:
            d = error_details(err)
            engine = d.get("metadata", {}).get("engine_code")
            detail = f"reason {d['reason']}" + (f", engine code {engine}" if engine else "")
            retry = f", retry in {d['retry_delay']}" if d["retry_delay"] is not None else ""
            print(f"error: {d['code'].name}: {d['message']} ({detail}{retry})", file=sys.stderr)
            return 1
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
