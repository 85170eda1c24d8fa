"""Webdataset shards streamed from URLs: ``https://host/train-{000000..000099}.tar``.

A shard spec names tar shards (the format `vlkit shard` writes; see `vlkit.data.shards`):

- one pattern, or several joined by ``::`` (``a-{0..9}.tar::b-{0..4}.tar``);
- brace groups in a pattern expand in order: a range ``{000..099}`` (zero-padded to the width
  of its ends when either starts with 0) or a list ``{en,de}``; several groups give every
  combination, the first group varying slowest;
- each shard is ``http://`` or ``https://`` (the standard library's urllib), ``file://`` or a
  plain local path, or any other ``scheme://`` that fsspec knows (``s3://`` with s3fs,
  ``gs://`` with gcsfs; ``pip install 'vlkit[remote]'``).

Shards are read as streams, front to back, never copied to disk. Reading is bounded in time:
``connect_timeout`` limits opening a connection, ``read_timeout`` every wait for data. A read
that fails half-way (a dropped connection, a timeout, a body shorter than its Content-Length,
an HTTP 5xx) is retried up to ``retries`` times per shard, after ``backoff``, 2·``backoff``,
4·``backoff`` ... seconds, from the byte offset reached: an HTTP Range request
(``Range: bytes=N-``), or, from a server that ignores it, the whole body again with the first
N bytes dropped; fsspec files and local files are reopened and seeked. Samples already yielded
are never yielded twice. When the retries are spent (or at once for an HTTP 4xx such as 404)
the shard is an `ShardReadError` naming the URL, or, with ``on_bad_sample="skip"``, the rest of
the shard is skipped and counted as "unreadable shard".
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import io
import itertools
import json
import math
import os
import re
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from typing import Callable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from .jsonl import DatasetError, TooManyBadSamples
from .loader import iterable_loader, sample_rng
from .shards import ShardStream

SEPARATOR = "::"
CONNECT_TIMEOUT = 10.0   # seconds to open a connection
READ_TIMEOUT = 60.0      # seconds to wait for the next bytes
RETRIES = 3              # re-openings of one shard after a failed read
BACKOFF = 1.0            # seconds before the first retry, doubled for each further one
UNREADABLE = "unreadable shard"
REMOTE_EXTRA = "pip install 'vlkit[remote]'"

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_RETRY_STATUS = (408, 425, 429)  # client errors worth retrying; every 5xx is too


class ShardReadError(DatasetError):
    """A shard that could not be read to its end; the message names the URL."""
    reason = UNREADABLE


# ---- shard specs ------------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """Every name a pattern's brace groups stand for, in order:
    ``"t-{00..02}.tar"`` -> t-00.tar, t-01.tar, t-02.tar; ``"{a,b}-{1..2}"`` -> a-1, a-2, b-1, b-2."""
    m = _BRACE.search(pattern)
    head = pattern if m is None else pattern[:m.start()]
    if "{" in head or "}" in head:
        raise ValueError(f"{pattern}: unbalanced or nested braces")
    if m is None:
        return [pattern]
    rest = expand_braces(pattern[m.end():])
    return [head + choice + tail for choice in _brace_choices(m.group(1), pattern) for tail in rest]


def _brace_choices(body: str, pattern: str) -> list[str]:
    r = _RANGE.match(body)
    if r:
        lo, hi = r.groups()
        if int(hi) < int(lo):
            raise ValueError(f"{pattern}: the range {{{body}}} runs backwards")
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0
        return [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    if "," in body:
        return body.split(",")
    raise ValueError(f"{pattern}: {{{body}}} is neither a range {{000..099}} nor a list {{a,b}}")


def scheme(url: str) -> str:
    """``http``, ``s3`` ... of a URL; ``""`` for a plain path."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def is_shard_spec(data: str) -> bool:
    """Whether ``--data`` names shards (URLs, patterns, tar files) rather than a folder."""
    data = str(data)
    if os.path.isdir(data):
        return False
    return bool(scheme(data)) or SEPARATOR in data or _BRACE.search(data) is not None \
        or data.endswith((".tar", ".tar.gz", ".tgz"))


def shard_urls(spec: str) -> list[str]:
    """The shards a spec names, in order (``::``-joined patterns, braces expanded). Local paths
    (plain or ``file://``) must exist; URLs are checked when read."""
    urls = []
    for part in str(spec).split(SEPARATOR):
        if not part.strip():
            raise DatasetError(f"{spec}: empty pattern between '{SEPARATOR}' separators")
        try:
            urls.extend(expand_braces(part.strip()))
        except ValueError as e:
            raise DatasetError(str(e)) from None
    for url in urls:
        path = _local_path(url)
        if path is not None and not os.path.isfile(path):
            raise DatasetError(f"{url}: no such shard file")
    return urls


def _local_path(url: str) -> str | None:
    s = scheme(url)
    if s == "":
        return url
    if s == "file":
        return urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    return None


# ---- reading one shard ------------------------------------------------------------------------

class _ReadTimeout:
    """An http.client connection that waits ``read_timeout`` (not its connect timeout) for data."""

    def __init__(self, *args, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout

    def connect(self):
        super().connect()  # bounded by the connect timeout (urlopen's ``timeout``)
        self.sock.settimeout(self.read_timeout)


class _HTTPConnection(_ReadTimeout, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ReadTimeout, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self.read_timeout = read_timeout

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, read_timeout=self.read_timeout), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self.read_timeout = read_timeout

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, read_timeout=self.read_timeout), req,
                            context=self._context)


def _http_opener(url: str, connect_timeout: float, read_timeout: float):
    """open(offset) -> (response, total size or None) for an http(s) URL."""
    opener = urllib.request.build_opener(_HTTPHandler(read_timeout), _HTTPSHandler(read_timeout))

    def open_at(offset: int):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = opener.open(urllib.request.Request(url, headers=headers), timeout=connect_timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code < 500 and e.code not in _RETRY_STATUS:
                raise ShardReadError(f"{url}: HTTP {e.code} {e.reason}") from None
            raise ConnectionError(f"HTTP {e.code} {e.reason}") from None
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                resp.close()
                raise ShardReadError(f"{url}: asked for bytes from {offset}, the server sent from {start}")
            return resp, total
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        _discard(resp, offset)  # a server that ignores Range sends the whole body again
        return resp, total
    return open_at


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes 100-199/200`` header."""
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) != "*" else None)


def _discard(f, n: int) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError(f"the body ended {n} bytes before the offset to resume from")
        n -= len(chunk)


def _fsspec_opener(url: str):
    """open(offset) -> (file, size) for a URL an fsspec file system reads (s3://, gs:// ...)."""
    try:
        import fsspec
    except ImportError:
        raise DatasetError(f"{url}: reading {scheme(url)}:// URLs needs fsspec ({REMOTE_EXTRA}"
                           f"{_backend_hint(url)})") from None

    def open_at(offset: int):
        try:
            f = fsspec.open(url, "rb").open()
        except ImportError as e:  # fsspec names the backend package it lacks: a set-up error
            raise DatasetError(f"{url}: {e} ({REMOTE_EXTRA}{_backend_hint(url)})") from None
        except ValueError as e:  # e.g. a protocol fsspec does not know
            raise DatasetError(f"{url}: {e}") from None
        except (FileNotFoundError, PermissionError) as e:
            raise ShardReadError(f"{url}: {type(e).__name__}: {e}") from None
        if offset:
            f.seek(offset)
        return f, getattr(f, "size", None)
    return open_at


def _backend_hint(url: str) -> str:
    backend = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme(url))
    return f", plus {backend}" if backend else ""


def _file_opener(path: str):
    def open_at(offset: int):
        try:
            f = open(path, "rb")
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            raise ShardReadError(f"{path}: {e.strerror}") from None
        f.seek(offset)
        return f, os.fstat(f.fileno()).st_size
    return open_at


def _describe(error) -> str:
    if isinstance(error, str):
        return error
    if isinstance(error, urllib.error.URLError):  # raised while connecting and sending the request
        reason = error.reason
        return f"cannot connect ({'timed out' if isinstance(reason, TimeoutError) else reason})"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out waiting for data"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# what a retry can mend: a dropped or refused connection, a timeout, a broken HTTP response
_TRANSIENT = (OSError, http.client.HTTPException)


class RetryingReader(io.RawIOBase):
    """A shard's bytes front to back; a failed read reopens the shard at the offset reached
    (``open_at(offset) -> (file, total size or None)``), at most ``retries`` times, waiting
    ``backoff · 2**k`` seconds before retry k. A body that ends before its known size counts as
    a failed read."""

    def __init__(self, url: str, open_at: Callable[[int], tuple], retries: int = RETRIES,
                 backoff: float = BACKOFF, sleep: Callable[[float], None] = time.sleep):
        super().__init__()
        self.url, self._open_at, self.retries, self.backoff = url, open_at, retries, backoff
        self._sleep = sleep
        self.offset, self.size, self.failures, self._f = 0, None, 0, None
        self._reopen()

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        while True:
            try:
                self._f, size = self._open_at(self.offset)
                self.size = size if size is not None else self.size
                return
            except _TRANSIENT as e:
                self._failed(e)

    def _failed(self, error) -> None:
        """Note a failed read: give up after ``retries`` of them, else wait before the next."""
        self._drop()
        self.failures += 1
        why = _describe(error)
        if self.failures > self.retries:
            raise ShardReadError(f"{self.url}: {why} at byte {self.offset}"
                                 + (f" of {self.size}" if self.size is not None else "")
                                 + f" (gave up after {self.retries} retries)")
        self._sleep(self.backoff * 2 ** (self.failures - 1))

    def readinto(self, b) -> int:
        while True:
            if self.size is not None and self.offset >= self.size:
                return 0
            if self._f is None:
                self._reopen()
                continue
            try:
                data = self._f.read(len(b))
            except _TRANSIENT as e:
                self._failed(e)
                continue
            if not data and self.size is not None:  # closed before the end: a dropped connection
                self._failed("connection closed early")
                continue
            b[:len(data)] = data
            self.offset += len(data)
            return len(data)

    def _drop(self) -> None:
        """Close the current connection or file, whatever state it is in."""
        if self._f is not None:
            try:
                self._f.close()
            except _TRANSIENT:
                pass
            self._f = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_shard(url: str, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT,
               retries: int = RETRIES, backoff: float = BACKOFF) -> RetryingReader:
    """A shard as a readable stream (http(s) by urllib, local paths and file://, else fsspec)."""
    s, path = scheme(url), _local_path(url)
    if path is not None:
        open_at = _file_opener(path)
    elif s in ("http", "https"):
        open_at = _http_opener(url, connect_timeout, read_timeout)
    else:
        open_at = _fsspec_opener(url)
    return RetryingReader(url, open_at, retries, backoff)


# ---- the streaming dataset --------------------------------------------------------------------

def check_readers(spec: str, world: int, workers: int, shards: list[str] | None = None) -> int:
    """The number of readers (``world`` processes x ``workers`` DataLoader workers, at least
    one a process) of a spec's shards; more readers than shards is a ValueError (a reader
    without a shard would wait for ever in an endless stream)."""
    shards = shard_urls(spec) if shards is None else shards
    readers = world * max(1, workers)
    if readers > len(shards):
        raise ValueError(f"{spec}: {len(shards)} shards cannot be split between {readers} readers "
                         f"(processes x loader workers: {world} x {max(1, workers)}); use fewer "
                         "--workers or more shards")
    return readers


class RemoteShardStream(ShardStream):
    """`ShardStream` over a shard spec (URLs, patterns; see the module docstring): the same
    seeded shard shuffle, split between ranks and DataLoader workers (shard ``k`` of an epoch's
    order to reader ``k % (world · workers)``), shuffle buffer and bad-sample handling, each
    shard read through `open_shard`. A shard that fails for good is a `ShardReadError`, or with
    ``on_bad_sample="skip"`` counted as "unreadable shard" (samples it gave before stay given).

    ``bad_events`` lists (id, reason) for each skip, the id a 63-bit hash of the sample's
    ``URL#KEY`` (of the URL for an unreadable shard), so a sample met again has the same id; with ``max_skip_rate`` a reader stops with `TooManyBadSamples` once more than that
    share of its first 100 or more samples were bad. An endless stream (``epochs=None``) whose
    reader finds every one of its shards unreadable stops with a `ShardReadError` rather than
    retry them for ever (likewise when none of them holds a usable sample)."""

    def __init__(self, spec: str, seed: int = 0, buffer: int = 1000, rank: int = 0, world: int = 1,
                 epochs: int | None = 1, decode: bool = True, on_bad_sample: str = "error",
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 retries: int = RETRIES, backoff: float = BACKOFF, max_skip_rate: float | None = None):
        for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be above 0, got {value}")
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must be at least 0, got {retries} and {backoff}")
        super().__init__(spec, None, seed, buffer, rank, world, epochs, decode, on_bad_sample)
        self.spec, self.max_skip_rate = spec, max_skip_rate
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.retries, self.backoff = retries, backoff
        self.bad_events: list[tuple[int, str]] = []
        self.skipped_at_start: Counter = Counter()  # nothing is read up front
        self._readers, self._passed, self._empty_in_row, self._where = 1, 0, 0, ""

    def _list_shards(self, spec, split) -> list[str]:
        return shard_urls(spec)

    def _open(self, url: str):
        return open_shard(url, self.connect_timeout, self.read_timeout, self.retries, self.backoff)

    def readers(self, workers: int) -> int:
        """Readers over ``workers`` DataLoader workers a rank (see `check_readers`)."""
        return check_readers(self.spec, self.world, workers, self.shards)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        self._readers = self.readers(info.num_workers if info is not None else 1)
        self._passed = self._empty_in_row = 0
        yield from super().__iter__()

    def _samples(self, url) -> Iterator[dict]:
        gave = False
        try:
            for rec in super()._samples(url):
                gave, self._empty_in_row = True, 0
                yield rec
        except (ShardReadError, tarfile.TarError) as e:
            error = _unreadable(url, e)
            if self.on_bad_sample == "error":
                raise error from None
            self._where = url
            self._skip(error)
        if not gave:
            self._empty_in_row += 1
            # a reader has at most ``mine`` shards an epoch: 2·mine - 1 empty ones in a row hold a
            # whole epoch of them (a run within two epochs is at most (mine - 1) + (mine - 1))
            mine = math.ceil(len(self.shards) / self._readers)
            if self.epochs is None and self._empty_in_row >= 2 * mine - 1:
                raise DatasetError(f"{self.spec}: a whole epoch of this reader's shards gave no usable "
                                   f"sample (the last, {url}: {self.summary()})")

    def summary(self) -> str:
        """One line: what was skipped, by reason."""
        n = sum(self.skipped.values())
        return f"skipped {n}" + (": " + ", ".join(f"{c} {r}" for r, c in self.skipped.most_common()) if n else "")

    def _decode(self, path, key, group) -> Iterator[dict]:
        self._where = f"{path}#{key}"
        for rec in super()._decode(path, key, group):
            self._passed += 1
            yield rec

    def _skip(self, error: DatasetError) -> None:
        super()._skip(error)
        digest = hashlib.blake2b(self._where.encode(), digest_size=8).digest()
        self.bad_events.append((int.from_bytes(digest, "big") >> 1, error.reason))
        self._passed += 1
        if self.max_skip_rate is not None and self._passed >= 100:
            rate = len(self.bad_events) / self._passed
            if rate > self.max_skip_rate:
                raise TooManyBadSamples(
                    f"{self.spec}: {rate:.1%} of the samples read are bad, more than the allowed "
                    f"{self.max_skip_rate:.1%} (max_skip_rate); {self.summary()}")

    def head_records(self, n: int) -> list[dict]:
        """The records (JSON only, images not decoded) of the first ``n`` samples in shard order."""
        records: list[dict] = []
        for url in self.shards:
            try:
                with self._open(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                    for m in tar:
                        if m.isfile() and m.name.endswith(".json"):
                            try:
                                records.append(_json_record(tar.extractfile(m).read()))
                            except ValueError:
                                continue  # the stream reports bad records when it reads them
                            if len(records) >= n:
                                return records
            except (ShardReadError, tarfile.TarError) as e:
                if self.on_bad_sample == "error":
                    raise _unreadable(url, e) from None
        return records


def _unreadable(url: str, error: Exception) -> ShardReadError:
    if isinstance(error, ShardReadError):
        return error
    return ShardReadError(f"{url}: not a readable tar shard ({error})")


def _json_record(raw: bytes) -> dict:
    rec = json.loads(raw.decode("utf-8"))
    if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str):
        raise ValueError("not a record")
    return rec


# ---- training batches -------------------------------------------------------------------------

class StreamBatches(IterableDataset):
    """Training batches from a shard stream: this rank's ``batch_size // world`` samples per
    global batch, read by DataLoader worker ``b % workers`` for local batch ``b``. Sample ``j``
    of global batch ``g`` is augmented with the RNG of position ``g · batch_size + rank ·
    local + j``. ``start`` (a multiple of ``batch_size``: the samples trained on before a
    resume) is reached by reading the stream from its beginning and dropping those batches. Each
    batch reports the samples skipped since the last in ``_bad_samples`` and its global index in
    ``_batch`` (`InOrder` puts the workers' batches back in that order)."""

    def __init__(self, stream: RemoteShardStream, collate, batch_size: int, start: int = 0,
                 seed: int = 0):
        self.stream, self.collate, self.batch_size = stream, collate, batch_size
        self.start, self.seed = start, seed

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self.stream.rank, self.stream.world
        local = self.batch_size // world
        done = len(range(worker, self.start // self.batch_size, workers))  # this worker's, before start
        samples, reported = iter(self.stream), 0
        for b in itertools.count():
            recs = list(itertools.islice(samples, local))
            if len(recs) < local:  # a finite stream ran out
                return
            if b < done:
                continue
            g = b * workers + worker
            first = g * self.batch_size + rank * local
            batch = self.collate(recs, [sample_rng(self.seed, first + j) for j in range(local)])
            batch["_batch"] = g
            events = self.stream.bad_events
            if len(events) > reported:
                batch["_bad_samples"], reported = list(events[reported:]), len(events)
            yield batch


class InOrder:
    """Iterates a loader of `StreamBatches` in global batch order from batch ``first``. A
    DataLoader takes batches from its workers in turn from worker 0, but after a resume the
    next batch may be another worker's; this holds back at most one batch a worker to restore
    the order. Stops the loader's workers on ``_shutdown_workers`` (`close_loader`)."""

    def __init__(self, loader, first: int):
        self.loader, self.next, self._it, self._held = loader, first, None, {}

    def __iter__(self):
        self._it = iter(self.loader)
        return self

    def __next__(self) -> dict:
        while self.next not in self._held:
            batch = next(self._it)
            self._held[batch.pop("_batch")] = batch
        self.next += 1
        return self._held.pop(self.next - 1)

    @property
    def _workers(self):
        return getattr(self._it, "_workers", ())

    def _shutdown_workers(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def stream_batch_loader(stream: RemoteShardStream, collate, batch_size: int, start: int = 0,
                        seed: int = 0, num_workers: int = 1) -> InOrder:
    """Batches of this rank's slice of each global batch from ``stream`` (see `StreamBatches`),
    in order, from global batch ``start // batch_size`` on."""
    stream.readers(num_workers)  # too few shards for the readers: refused here, not in a worker
    if batch_size % stream.world:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {stream.world} processes")
    loader = iterable_loader(StreamBatches(stream, collate, batch_size, start, seed), seed, num_workers)
    return InOrder(loader, start // batch_size)


__all__ = ["InOrder", "RemoteShardStream", "RetryingReader", "ShardReadError", "StreamBatches", "expand_braces",
           "is_shard_spec", "open_shard", "shard_urls", "stream_batch_loader"]
