"""data/storage.py against a real (local) S3 API: moto's server, and a proxy that breaks GETs.

Every fault the proxy injects cuts an object GET mid-body (or refuses it with 503 SlowDown),
so each passing read here went through at least one ranged, ETag-pinned resume.
"""
from __future__ import annotations

import random

import pytest

from tests.conftest import make_bucket, s3_test_client, upload_dir

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from botocore import exceptions as bx  # noqa: E402

from data import storage  # noqa: E402
from data.storage import S3Options, open_stream, read_bytes, retry_reason  # noqa: E402

pytestmark = pytest.mark.timeout(120)

BUCKET = "vlpt-storage-test"
BIG_KEY = "shards/train/big-000000.tar"
BIG_SIZE = 3_000_000
EXPECTED_REASON = {"reset": "connection", "slowdown": "throttled", "truncate": "truncated",
                   "stall": "read_timeout"}


@pytest.fixture(scope="module")
def bucket(s3_server):
    return make_bucket(s3_server.endpoint_url, BUCKET)


@pytest.fixture(scope="module")
def big_object(s3_server, bucket) -> bytes:
    data = random.Random(1234).randbytes(BIG_SIZE)
    s3_test_client(s3_server.endpoint_url).put_object(Bucket=bucket, Key=BIG_KEY, Body=data)
    return data


def fast_opts(endpoint_url: str, **kw) -> S3Options:
    return S3Options(endpoint_url=endpoint_url, **{
        "read_timeout_s": 1.0, "connect_timeout_s": 2.0, "backoff_base_s": 0.01,
        "backoff_cap_s": 0.05, "max_retries": 10, **kw})


def url(key: str, bucket: str = BUCKET) -> str:
    return f"s3://{bucket}/{key}"


def assert_resumed_by_range(proxy, n_gets: int) -> None:
    """`n_gets` object GETs, each after the first a ranged resume (or a retry after a refusal)."""
    gets = [entry for entry in proxy.log if entry[0] == "GET"]
    assert len(gets) == n_gets, proxy.log
    for (_, _, _, fault), (_, _, rng, _) in zip(gets, gets[1:]):
        if fault != "slowdown":  # a cut body is resumed from the first byte not yet returned
            assert rng is not None and rng.startswith("bytes="), proxy.log


# ---------------------------------------------------------------- plain reads


def test_read_bytes_of_uploaded_tree(s3_server, bucket, tmp_path):
    rng = random.Random(0)
    files = {"a.bin": rng.randbytes(10), "sub/b.bin": rng.randbytes(70_000), "sub/deeper/c.txt": b"",
             "sub/deeper/d.json": b'{"x": 1}'}
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    keys = upload_dir(s3_server.endpoint_url, tmp_path, bucket, "tree/v1/")
    assert keys == sorted(f"tree/v1/{rel}" for rel in files)
    opts = S3Options(endpoint_url=s3_server.endpoint_url)
    stats: dict[str, int] = {}
    for rel, content in files.items():
        assert read_bytes(url(f"tree/v1/{rel}"), opts, stats) == content
        assert read_bytes(storage.join(url("tree/v1"), rel), opts, stats) == content
    assert stats == {}


@pytest.mark.parametrize("offset", [0, 1, 4095, 1 << 20, BIG_SIZE - 1, BIG_SIZE])
def test_open_stream_from_offset(s3_server, big_object, offset):
    stats: dict[str, int] = {}
    with open_stream(url(BIG_KEY), offset, S3Options(endpoint_url=s3_server.endpoint_url), stats) as f:
        assert f.read() == big_object[offset:]
    assert stats == {}


def test_open_stream_reads_in_pieces(s3_server, big_object):
    with open_stream(url(BIG_KEY), 10, S3Options(endpoint_url=s3_server.endpoint_url)) as f:
        parts = [f.read(1), f.read(100_000), f.read(1 << 21), f.read()]
        assert f.read(10) == b""
    assert b"".join(parts) == big_object[10:]


def test_missing_key_is_file_not_found(s3_server, bucket):
    stats: dict[str, int] = {}
    with pytest.raises(FileNotFoundError, match="no-such-key"):
        read_bytes(url("shards/no-such-key.tar"), S3Options(endpoint_url=s3_server.endpoint_url), stats)
    with pytest.raises(FileNotFoundError):
        with open_stream(url("shards/no-such-key.tar"), 5, S3Options(endpoint_url=s3_server.endpoint_url)) as f:
            f.read(1)
    assert stats == {}  # not retried


def test_proxy_passes_other_requests_through(fault_proxy, big_object, bucket):
    """Faults are for object GETs only: a listing and a HEAD go through and leave the plan."""
    fault_proxy.plan(["slowdown"])
    client = s3_test_client(fault_proxy.url)
    listed = client.list_objects_v2(Bucket=bucket, Prefix="shards/train/")
    assert [o["Key"] for o in listed["Contents"]] == [BIG_KEY]
    assert client.head_object(Bucket=bucket, Key=BIG_KEY)["ContentLength"] == BIG_SIZE
    assert fault_proxy.pending == 1 and not fault_proxy.injected
    assert read_bytes(url(BIG_KEY), fast_opts(fault_proxy.url)) == big_object
    assert fault_proxy.injected == {"slowdown": 1} and fault_proxy.errors == []


# ---------------------------------------------------------------- faults, resumed


@pytest.mark.parametrize("kind", ["reset", "slowdown", "truncate", "stall"])
def test_fault_on_first_get_is_retried_and_counted(fault_proxy, big_object, kind):
    fault_proxy.plan([kind])
    stats: dict[str, int] = {}
    assert read_bytes(url(BIG_KEY), fast_opts(fault_proxy.url), stats) == big_object
    assert fault_proxy.injected == {kind: 1}
    assert stats == {f"s3_retry_{EXPECTED_REASON[kind]}": 1}
    # botocore's own retries are off: the one fault cost exactly one more GET, ours.
    assert_resumed_by_range(fault_proxy, 2)
    assert fault_proxy.errors == []


@pytest.mark.parametrize("faults", [["reset", "reset", "reset"],
                                    ["truncate", "slowdown", "reset", "stall", "truncate"],
                                    ["slowdown"] * 4])
def test_faults_in_a_row(fault_proxy, big_object, faults):
    fault_proxy.plan(faults)
    stats: dict[str, int] = {}
    assert read_bytes(url(BIG_KEY), fast_opts(fault_proxy.url), stats) == big_object
    expected: dict[str, int] = {}
    for kind in faults:
        key = f"s3_retry_{EXPECTED_REASON[kind]}"
        expected[key] = expected.get(key, 0) + 1
    assert stats == expected
    assert sum(fault_proxy.injected.values()) == len(faults)
    assert_resumed_by_range(fault_proxy, len(faults) + 1)


def test_every_other_get_faulted_reading_in_pieces(fault_proxy, big_object):
    """`every=2`: the first read goes through; the second breaks once and resumes."""
    fault_proxy.plan(["reset"], every=2)
    for expected_stats in ({}, {"s3_retry_connection": 1}):
        stats: dict[str, int] = {}
        with open_stream(url(BIG_KEY), 0, fast_opts(fault_proxy.url), stats) as f:
            assert b"".join(iter(lambda: f.read(300_001), b"")) == big_object
        assert stats == expected_stats
    assert fault_proxy.injected == {"reset": 1} and fault_proxy.object_gets == 3


def test_fault_policy(fault_proxy, big_object):
    """A policy sees each request: here every unranged GET is truncated, resumes are not."""
    fault_proxy.plan(policy=lambda req: None if req.header("Range") else "truncate")
    stats: dict[str, int] = {}
    assert read_bytes(url(BIG_KEY), fast_opts(fault_proxy.url), stats) == big_object
    assert stats == {"s3_retry_truncated": 1} and fault_proxy.injected == {"truncate": 1}


def test_fault_during_read_from_offset(fault_proxy, big_object):
    offset = 777_777
    fault_proxy.plan(["reset", "truncate"])
    stats: dict[str, int] = {}
    with open_stream(url(BIG_KEY), offset, fast_opts(fault_proxy.url), stats) as f:
        assert f.read() == big_object[offset:]
    assert stats == {"s3_retry_connection": 1, "s3_retry_truncated": 1}
    ranges = [rng for method, _, rng, _ in fault_proxy.log if method == "GET"]
    assert ranges[0] == f"bytes={offset}-"
    assert all(int(r[len("bytes="):-1]) > offset for r in ranges[1:]), ranges


# ---------------------------------------------------------------- giving up


def test_gives_up_after_max_consecutive_retries(fault_proxy, big_object):
    kind = "slowdown"  # refusals deliver nothing: four in a row exhaust three retries
    fault_proxy.plan([kind] * 4)
    stats: dict[str, int] = {}
    with pytest.raises(IOError, match="giving up after 3 retries") as info:
        read_bytes(url(BIG_KEY), fast_opts(fault_proxy.url, max_retries=3), stats)
    assert url(BIG_KEY) in str(info.value)
    assert stats == {f"s3_retry_{EXPECTED_REASON[kind]}": 3}
    assert fault_proxy.injected == {kind: 4} and fault_proxy.pending == 0


def test_retry_budget_is_per_run_of_failures_not_per_object(fault_proxy, big_object):
    # Each reset delivers half of what is left: progress resets the budget, so 6 faults
    # pass with max_retries=3 and the bytes are exact.
    fault_proxy.plan(["reset"] * 6)
    stats: dict[str, int] = {}
    assert read_bytes(url(BIG_KEY), fast_opts(fault_proxy.url, max_retries=3), stats) == big_object
    assert stats == {"s3_retry_connection": 6}


def test_max_retries_zero_fails_on_first_fault(fault_proxy, big_object):
    fault_proxy.plan(["truncate"])
    stats: dict[str, int] = {}
    with pytest.raises(IOError, match="giving up after 0 retries"):
        read_bytes(url(BIG_KEY), fast_opts(fault_proxy.url, max_retries=0), stats)
    assert stats == {}


# ---------------------------------------------------------------- the object changes mid-read


def put_direct(s3_server, key: str, data: bytes, client=None) -> None:
    (client or s3_test_client(s3_server.endpoint_url)).put_object(Bucket=BUCKET, Key=key, Body=data)


def replacer(s3_server, key: str, data: bytes, replaced: list):
    """A proxy hook that replaces `key` by `data`. The client is built here, not in the hook:
    building one takes about a second on a loaded machine, and the hook runs while the reader
    waits under a 1 s read timeout, which then expired and the retry read the old object."""
    client = s3_test_client(s3_server.endpoint_url)

    def replace(fault, request):
        put_direct(s3_server, key, data, client)
        replaced.append(fault)
    return replace


@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_object_replaced_between_get_and_resume_raises(s3_server, bucket, fault_proxy, kind):
    key = f"shards/changing-{kind}.tar"
    rng = random.Random(99)
    old, new = rng.randbytes(BIG_SIZE), rng.randbytes(BIG_SIZE)
    put_direct(s3_server, key, old)
    replaced = []
    fault_proxy.hook = replacer(s3_server, key, new, replaced)  # runs while the first GET is cut
    fault_proxy.plan([kind])
    stats: dict[str, int] = {}
    with pytest.raises(IOError, match="changed while it was being read") as info:
        read_bytes(url(key), fast_opts(fault_proxy.url), stats)
    assert replaced == [kind] and url(key) in str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, bx.ClientError) and cause.response["Error"]["Code"] == "PreconditionFailed"
    assert retry_reason(cause) is None  # not retried: a changed object is an error
    gets = [entry for entry in fault_proxy.log if entry[0] == "GET"]
    assert len(gets) == 2 and gets[1][2].startswith("bytes=")  # the one resume, refused
    assert stats == {f"s3_retry_{EXPECTED_REASON[kind]}": 1}
    assert read_bytes(url(key), fast_opts(fault_proxy.url)) == new  # a fresh read is whole


def test_object_replaced_before_first_byte_reads_new_version(s3_server, bucket, fault_proxy):
    """Refused before any byte was returned: nothing to mix, so the retry reads the new object."""
    key = "shards/changing-early.tar"
    old, new = b"old" * 1000, b"new" * 2000
    put_direct(s3_server, key, old)
    replaced = []
    fault_proxy.hook = replacer(s3_server, key, new, replaced)  # runs before the 503 is sent
    fault_proxy.plan(["slowdown"])
    stats: dict[str, int] = {}
    data = read_bytes(url(key), fast_opts(fault_proxy.url), stats)
    assert fault_proxy.errors == [] and replaced == ["slowdown"], (fault_proxy.errors, fault_proxy.log)
    assert data == new, fault_proxy.log
    assert stats == {"s3_retry_throttled": 1}


# ---------------------------------------------------------------- classification


def client_error(status: int, code: str) -> bx.ClientError:
    return bx.ClientError({"Error": {"Code": code, "Message": "test"},
                           "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("status,code,reason", [
    (503, "SlowDown", "throttled"),
    (429, "TooManyRequests", "throttled"),
    (400, "ThrottlingException", "throttled"),
    (500, "InternalError", "http_500"),
    (503, "ServiceUnavailable", "http_503"),
    (502, "BadGateway", "http_502"),
    (404, "NoSuchKey", None),
    (403, "AccessDenied", None),
    (412, "PreconditionFailed", None),
    (400, "InvalidArgument", None),
])
def test_retry_reason_client_errors(status, code, reason):
    assert retry_reason(client_error(status, code)) == reason


def test_retry_reason_transport_errors():
    from urllib3.exceptions import ProtocolError

    ep = "http://127.0.0.1:1"
    assert retry_reason(bx.ReadTimeoutError(endpoint_url=ep)) == "read_timeout"
    assert retry_reason(bx.ConnectTimeoutError(endpoint_url=ep)) == "connect"
    assert retry_reason(bx.EndpointConnectionError(endpoint_url=ep)) == "connect"
    assert retry_reason(bx.IncompleteReadError(actual_bytes=1, expected_bytes=2)) == "truncated"
    assert retry_reason(storage.TruncatedBody("short")) == "truncated"
    assert retry_reason(bx.ResponseStreamingError(error=ProtocolError("reset"))) == "connection"
    assert retry_reason(bx.ConnectionClosedError(endpoint_url=ep)) == "connection"
    assert retry_reason(ConnectionResetError(104, "reset")) == "connection"
    assert retry_reason(FileNotFoundError("x")) is None
    assert retry_reason(ValueError("x")) is None


def test_connection_refused_is_retried_as_connect(big_object):
    from tests.s3_server import free_port

    stats: dict[str, int] = {}
    with pytest.raises(IOError, match="giving up after 2 retries"):
        read_bytes(url(BIG_KEY), fast_opts(f"http://127.0.0.1:{free_port()}", max_retries=2), stats)
    assert stats == {"s3_retry_connect": 2}
