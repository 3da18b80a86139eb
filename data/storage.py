"""Reading shard bytes from local disk or any S3 API, surviving a flaky network.

`open_stream(url, offset)` returns a binary reader from byte `offset` on:
a local file (path or `file://`), or `s3://bucket/key` through boto3 with a
configurable `endpoint_url` (AWS, MinIO, Ceph, moto). Credentials come only
from boto3's standard chain (environment, shared files, instance roles):
never from our config, never logged.

An S3 object is read by one GET; when the stream breaks (connection reset,
truncated body, stalled read past `read_timeout_s`) or a request is refused
with a retryable status (503 SlowDown, 5xx, 429), the reader waits
(exponential backoff with full jitter) and re-issues a ranged GET from the
first byte it has not yet returned, pinned to the object's ETag, so the
caller sees every byte exactly once. Each retry is counted by reason in the
`stats` dict the caller passes. botocore's own retries are switched off so
that every retry goes through this one policy and is counted. A run of
failures ends after `max_retries` retries or `max_total_retry_s` seconds,
whichever comes first, so a dead endpoint gives its error within minutes.
A streamed object that is not there (NoSuchKey) is retried `missing_retries`
times (a fresh upload may not be visible yet), then reported as
FileNotFoundError; `read_bytes` (manifests) reports it at once.

Local files are opened without blocking and must be regular files: a FIFO or
a device in a shard list would otherwise hang or stream forever
(NotARegularFile).
"""
from __future__ import annotations

import io
import logging
import os
import random
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

log = logging.getLogger(__name__)
RETRYABLE_CODES = {"RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500"}


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3 API (`storage.s3:` in the YAML). No credentials here by design."""

    endpoint_url: Optional[str] = None
    """e.g. http://minio:9000; None = AWS (or the AWS_ENDPOINT_URL environment variable)."""
    region: Optional[str] = None
    """Region name; None = boto3's chain (AWS_DEFAULT_REGION, ~/.aws/config)."""
    max_retries: int = 10
    """Retries of one object read before giving up (each broken stream or refusal is one)."""
    backoff_base_s: float = 0.25
    """First retry waits up to this long; doubling each retry (full jitter)."""
    backoff_cap_s: float = 20.0
    """Longest wait between two retries."""
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    """A read that stalls this long counts as a broken stream and is retried."""
    max_total_retry_s: float = 45.0
    """Longest time one read keeps retrying after its last success; with the timeouts above,
    an endpoint that never answers gives its error in under 2 minutes."""
    missing_retries: int = 2
    """Retries of an object that is not there (NoSuchKey) before it counts as missing."""

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.missing_retries < 0:
            raise ValueError(f"storage.s3.max_retries and storage.s3.missing_retries must be >= 0, got "
                             f"{self.max_retries} and {self.missing_retries}")
        for name in ("backoff_base_s", "backoff_cap_s", "connect_timeout_s", "read_timeout_s", "max_total_retry_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"storage.s3.{name} must be > 0, got {getattr(self, name)}")


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = str(url)[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    return bucket, key


def join(base: str, relative: str) -> str:
    """`relative` inside the directory or prefix `base` (URLs keep their scheme)."""
    if "://" in relative or relative.startswith("/"):
        return relative
    if is_s3(base):
        return base.rstrip("/") + "/" + relative
    return str(Path(base) / relative)


def join_inside(base: str, relative: str) -> str:
    """`join(base, relative)`, or ValueError when the result would lie outside `base`: an
    absolute path or URL, a `..` that climbs out, or (locally) a symlink leading out."""
    if "://" in relative or relative.startswith("/"):
        raise ValueError(f"shard path {relative!r} is absolute: it points outside {base}")
    if is_s3(base):
        if ".." in relative.split("/"):
            raise ValueError(f"shard path {relative!r} has a '..' segment: it may point outside {base}")
        return join(base, relative)
    root = os.path.realpath(base)
    resolved = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, resolved]) != root:
        raise ValueError(f"shard path {relative!r} resolves to {resolved}, outside {base}")
    return join(base, relative)


def check_regular_file(path: str) -> None:
    """NotARegularFile when a local `path` exists but is not a regular file (a missing one is
    left to the reader: it counts it as missing)."""
    try:
        mode = os.stat(local_path(path)).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{path} is not a regular file")


class NotARegularFile(OSError):
    """A local shard path names a FIFO, device, socket or directory."""


def local_path(url: str) -> str:
    return str(url)[len("file://"):] if str(url).startswith("file://") else str(url)


# ---------------------------------------------------------------- S3 client

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client(opts: S3Options, boto_retries: bool = False):
    """One boto3 client per process, options and retry mode (clients must not cross a fork).

    Stream readers count and back off themselves, so by default boto3 tries each request
    once; `boto_retries` lets boto3 retry each request (each part of a multipart transfer)
    up to `opts.max_retries` times, for whole-file transfers such as checkpoints.
    """
    import boto3
    from botocore.config import Config

    key = (os.getpid(), opts, boto_retries)
    with _clients_lock:
        if key not in _clients:
            retries = ({"mode": "standard", "max_attempts": opts.max_retries + 1} if boto_retries
                       else {"total_max_attempts": 1})
            config = Config(connect_timeout=opts.connect_timeout_s, read_timeout=opts.read_timeout_s,
                            retries=retries)
            _clients[key] = boto3.session.Session().client(
                "s3", endpoint_url=opts.endpoint_url, region_name=opts.region, config=config)
        return _clients[key]


def retry_reason(exc: BaseException) -> Optional[str]:
    """Why `exc` is worth retrying ("throttled", "http_503", "read_timeout", "truncated",
    "connection", "connect"), or None when it is not (403, 404, 412, a bug)."""
    from botocore import exceptions as bx
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        status = _status(exc)
        code = str(err.get("Code", ""))
        if code in ("SlowDown", "Throttling", "ThrottlingException") or status == 429:
            return "throttled"
        if status >= 500 or code in RETRYABLE_CODES:
            return f"http_{status or code}"
        return None
    if isinstance(exc, bx.ReadTimeoutError):
        return "read_timeout"
    if isinstance(exc, (bx.ConnectTimeoutError, bx.EndpointConnectionError)):
        return "connect"
    if isinstance(exc, (bx.IncompleteReadError, TruncatedBody)):
        return "truncated"
    if isinstance(exc, (bx.HTTPClientError, bx.ConnectionError, Urllib3Error, ConnectionError, TimeoutError)):
        return "connection"
    return None


class TruncatedBody(IOError):
    """The body ended before the length the server announced."""


def backoff_s(attempt: int, opts: S3Options, rng: random.Random) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return rng.uniform(0.0, min(opts.backoff_cap_s, opts.backoff_base_s * 2 ** attempt))


class Retrier:
    """The retry policy of one object read: counts retries by reason into `stats`, backs off."""

    def __init__(self, url: str, opts: S3Options, stats: Optional[dict[str, int]], retry_missing: bool = True):
        self.url, self.opts = url, opts
        self.stats = stats if stats is not None else {}
        self.attempt = 0
        self.missing = 0 if retry_missing else opts.missing_retries  # no budget: report at once
        self.since = time.monotonic()
        self._rng = random.Random()  # jitter must differ between processes, not be reproducible

    def succeeded(self) -> None:
        """The budget is for consecutive failures, not a whole object."""
        self.attempt, self.since = 0, time.monotonic()

    def failed(self, exc: BaseException) -> None:
        """Sleep before the next try, or re-raise when `exc` is fatal or retries are spent."""
        if isinstance(exc, FileNotFoundError):
            if self.missing >= self.opts.missing_retries:
                raise exc
            self.missing += 1
            self._count_and_wait("missing", exc)
            return
        reason = retry_reason(exc)
        if reason is None:
            raise exc
        elapsed = time.monotonic() - self.since
        if self.attempt >= self.opts.max_retries or elapsed >= self.opts.max_total_retry_s:
            raise IOError(f"{self.url}: giving up after {self.attempt} retries in {elapsed:.0f}s "
                          f"(storage.s3.max_retries={self.opts.max_retries}, storage.s3.max_total_retry_s="
                          f"{self.opts.max_total_retry_s:g}); last error ({reason}): {type(exc).__name__}: "
                          f"{exc}") from exc
        self._count_and_wait(reason, exc)

    def _count_and_wait(self, reason: str, exc: BaseException) -> None:
        key = f"s3_retry_{reason}"
        self.stats[key] = self.stats.get(key, 0) + 1
        wait = backoff_s(self.attempt, self.opts, self._rng)
        wait = min(wait, max(0.0, self.opts.max_total_retry_s - (time.monotonic() - self.since)))
        log.info("%s: %s (%s), retry %d in %.2fs", self.url, reason, type(exc).__name__,
                 self.attempt + 1, wait)
        self.attempt += 1
        time.sleep(wait)


class S3ObjectReader(io.RawIOBase):
    """A read-only stream over one S3 object from `offset`, resuming broken GETs by range."""

    def __init__(self, url: str, opts: S3Options, offset: int = 0, stats: Optional[dict[str, int]] = None,
                 retry_missing: bool = True):
        super().__init__()
        self.url, self.opts = url, opts
        self.bucket, self.key = split_s3(url)
        self.pos = offset
        self.size: Optional[int] = None
        self.etag: Optional[str] = None
        self.retrier = Retrier(url, opts, stats, retry_missing)
        self._body = None

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        client = s3_client(self.opts)
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            kwargs["Range"] = f"bytes={self.pos}-"
        if self.etag:
            kwargs["IfMatch"] = self.etag  # the object must not change between ranges
        try:
            resp = client.get_object(**kwargs)
        except (client.exceptions.NoSuchKey, client.exceptions.NoSuchBucket):
            raise FileNotFoundError(f"{self.url}: no such object") from None
        except Exception as e:
            if _status(e) == 416:  # range starts at the end: nothing left to read
                self.size = self.pos if self.size is None else self.size
                self._body = io.BytesIO(b"")
                return
            if _status(e) == 412:
                raise IOError(f"{self.url} changed while it was being read (ETag {self.etag}); "
                              f"shards must not be rewritten during training") from e
            raise
        if self.pos and not str(resp.get("ContentRange", "")).startswith(f"bytes {self.pos}-"):
            resp["Body"].close()  # a server ignoring Range would make us repeat bytes
            raise IOError(f"{self.url}: the server ignored the byte range {self.pos}- "
                          f"(Content-Range {resp.get('ContentRange')!r}); it cannot resume reads")
        self.etag = self.etag or resp.get("ETag")
        if self.size is None:
            self.size = self.pos + int(resp["ContentLength"])
        self._body = resp["Body"]

    def probe_size(self) -> int:
        """The object's size from a GET's headers, its body left unread."""
        while self.size is None:
            try:
                self._open()
            except Exception as e:
                self._drop_body()
                self.retrier.failed(e)  # raises when fatal or out of retries
        return self.size

    def _read_some(self, n: int) -> bytes:
        if self._body is None:
            self._open()
        chunk = self._body.read(n)
        if not chunk and self.size is not None and self.pos < self.size:
            raise TruncatedBody(f"body ended at byte {self.pos} of {self.size}")
        return chunk

    def readinto(self, buf) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        while True:
            try:
                chunk = self._read_some(len(buf))
                break
            except Exception as e:
                self._drop_body()
                self.retrier.failed(e)  # raises when fatal or out of retries
        self.retrier.succeeded()
        buf[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception as e:  # a broken connection may fail to close; we replace it anyway
                log.debug("closing a broken body of %s: %s", self.url, e)
        self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def _status(exc: BaseException) -> int:
    resp = getattr(exc, "response", None) or {}
    return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def open_stream(url: str, offset: int = 0, s3: Optional[S3Options] = None,
                stats: Optional[dict[str, int]] = None, retry_missing: bool = True) -> BinaryIO:
    """A buffered binary reader of `url` from byte `offset` (local path, file://, s3://).
    `retry_missing`: retry an S3 object that is not there (storage.s3.missing_retries)."""
    if is_s3(url):
        return io.BufferedReader(S3ObjectReader(url, s3 or S3Options(), offset, stats, retry_missing),
                                 buffer_size=1 << 20)
    return open_regular_file(local_path(url), offset)


def open_regular_file(path: str, offset: int = 0) -> BinaryIO:
    """Open `path` for reading without blocking (a FIFO would wait for a writer) and refuse
    anything but a regular file, checked on the opened descriptor (no race with a swap)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    if offset:
        f.seek(offset)
    return f


def object_size(url: str, s3: Optional[S3Options] = None, stats: Optional[dict[str, int]] = None) -> int:
    """Bytes of a local file or S3 object (FileNotFoundError when it is not there), on S3
    through the same retry policy as reads."""
    if not is_s3(url):
        check_regular_file(url)
        return os.stat(local_path(url)).st_size
    reader = S3ObjectReader(url, s3 or S3Options(), 0, stats)
    try:
        return reader.probe_size()
    finally:
        reader.close()


def sha256_of(url: str, s3: Optional[S3Options] = None, stats: Optional[dict[str, int]] = None) -> str:
    """Hex sha256 of a local file or S3 object, streamed."""
    import hashlib

    h = hashlib.sha256()
    with open_stream(url, 0, s3, stats) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_bytes(url: str, s3: Optional[S3Options] = None, stats: Optional[dict[str, int]] = None) -> bytes:
    """The whole content of a (small) object or file. A missing one is reported at once: it is a
    manifest or checkpoint file the user named, not a shard that may be on its way."""
    with open_stream(url, 0, s3, stats, retry_missing=False) as f:
        return f.read()
