"""Shards streamed from URLs: brace specs, HTTP reads equal local ones, dropped and stalled
connections, 404s, rank/worker splits, resume of training batches, `vlkit train --data URL`."""
import importlib.util
import io
import json
import socket
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from torch.utils.data import DataLoader

from vlkit.cli import main
from vlkit.data.jsonl import DatasetError
from vlkit.data.loader import close_loader
from vlkit.data.remote import (RemoteShardStream, ShardReadError, expand_braces, is_shard_spec,
                               shard_urls, stream_batch_loader)
from vlkit.data.shards import ShardStream, shard_paths
from vlkit.data.synthetic import write_dataset

N = 16  # write_dataset(num=20) puts 16 records in train.jsonl; shards of 7: 7 + 7 + 2
FAST = dict(read_timeout=2.0, connect_timeout=2.0, retries=2, backoff=0.0)


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` at ``/FLAGS/NAME``, FLAGS a comma-separated set of: ok (plain,
    with Range support), norange (Range ignored), drop-once (the first request of a name sends at most
    2 KiB of the body, then closes), drop-always (every response does), stall
    (headers never come)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        flags, _, name = self.path.lstrip("/").partition("/")
        flags = set(flags.split(","))
        srv = self.server
        srv.hits[self.path] += 1
        srv.ranges.append(self.headers.get("Range"))
        if "stall" in flags:
            srv.stop.wait(10)
            return
        data = srv.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and "norange" not in flags:
            start = int(rng.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        drop = "drop-always" in flags or ("drop-once" in flags and srv.hits[self.path] == 1)
        if drop:
            self.wfile.write(body[:min(len(body) // 2, 2048)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("jsonl")
    write_dataset(root, num=20, seed=3, image_size=32)
    return root


@pytest.fixture(scope="module")
def shards(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    assert main(["shard", str(dataset), "--out", str(out), "--shard-size", "7"]) == 0
    return out


@pytest.fixture(scope="module")
def server(shards):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.files = {p.name: p.read_bytes() for p in shard_paths(shards)}
    srv.files["bad-000000.tar"] = _bad_shard()
    srv.hits, srv.ranges, srv.stop = Counter(), [], threading.Event()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


def _bad_shard() -> bytes:
    """A shard of three samples: a good one, a corrupt image, a record without a caption."""
    good = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (8, 8), (200, 10, 10)).save(good, format="PNG")
    members = [("a.json", b'{"image": "images/a.png", "caption": "a red square"}'),
               ("a.png", good.getvalue()),
               ("b.json", b'{"image": "images/b.png", "caption": "broken"}'),
               ("b.png", b"not a png at all"),
               ("c.json", b'{"image": "images/c.png"}'),
               ("c.png", good.getvalue())]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _read(stream) -> dict:
    return {rec["__key__"].rpartition("#")[2]: (rec["caption"], np.asarray(rec["image"]).tobytes())
            for rec in stream}


# ---- specs ------------------------------------------------------------------------------------

def test_brace_expansion():
    assert expand_braces("t-{000000..000002}.tar") == ["t-000000.tar", "t-000001.tar", "t-000002.tar"]
    assert expand_braces("t-{8..11}.tar") == ["t-8.tar", "t-9.tar", "t-10.tar", "t-11.tar"]
    assert expand_braces("t-{08..10}") == ["t-08", "t-09", "t-10"]
    assert expand_braces("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad, msg in (("t-{3..1}.tar", "runs backwards"), ("t-{x}.tar", "neither a range"),
                     ("t-{1..2.tar", "unbalanced"), ("t-{{1..2}}.tar", "unbalanced")):
        with pytest.raises(ValueError, match=msg):
            expand_braces(bad)


def test_spec_lists_and_local_paths(shards):
    spec = "http://h/a-{0..1}.tar::https://h/b.tar"
    assert shard_urls(spec) == ["http://h/a-0.tar", "http://h/a-1.tar", "https://h/b.tar"]
    local = str(shards / "train-{000000..000002}.tar")
    assert shard_urls(local) == [str(p) for p in shard_paths(shards)]
    assert len(shard_urls(f"file://{shards}/train-{{000000..000001}}.tar")) == 2
    with pytest.raises(DatasetError, match=r"train-000003.tar: no such shard file"):
        shard_urls(str(shards / "train-{000002..000003}.tar"))
    with pytest.raises(DatasetError, match="empty pattern"):
        shard_urls("http://h/a.tar::")
    assert is_shard_spec(spec) and is_shard_spec(local) and is_shard_spec("s3://b/x.tar")
    assert not is_shard_spec(str(shards)) and not is_shard_spec("synthetic")


# ---- reading ----------------------------------------------------------------------------------

def test_http_reads_equal_local_reads(shards, server):
    local = _read(ShardStream(shards))
    assert len(local) == N
    assert _read(RemoteShardStream(server.url + "/ok/train-{000000..000002}.tar", **FAST)) == local
    assert _read(RemoteShardStream(f"file://{shards}/train-{{000000..000002}}.tar")) == local
    split = f"{server.url}/ok/train-000000.tar::{shards}/train-{{000001..000002}}.tar"
    assert _read(RemoteShardStream(split, **FAST)) == local


def test_ranks_and_workers_split_the_shards(server):
    spec = server.url + "/ok/train-{000000..000002}.tar"
    parts = [[r["__key__"] for r in RemoteShardStream(spec, rank=r, world=3, decode=False, **FAST)]
             for r in range(3)]
    keys = [k for p in parts for k in p]
    assert sorted(len(p) for p in parts) == [2, 7, 7] and len(set(keys)) == N
    loader = DataLoader(RemoteShardStream(spec, decode=False, **FAST), batch_size=None, num_workers=2,
                        collate_fn=lambda x: x, multiprocessing_context="fork")
    assert sorted(r["__key__"] for r in loader) == sorted(keys)
    with pytest.raises(ValueError, match=r"3 shards cannot be split between 4 readers"):
        list(RemoteShardStream(spec, world=4, **FAST))


def test_a_dropped_connection_is_resumed(shards, server):
    local = _read(ShardStream(shards))
    for flags in ("drop-once", "drop-once,norange"):  # a Range request; the body again, head dropped
        spec = f"{server.url}/{flags}/train-{{000000..000002}}.tar"
        before = len(server.ranges)
        assert _read(RemoteShardStream(spec, **FAST)) == local
        for i in range(3):
            assert server.hits[f"/{flags}/train-00000{i}.tar"] == 2
        resumed = [r for r in server.ranges[before:] if r]
        assert len(resumed) == 3 and all(r.startswith("bytes=") and r != "bytes=0-" for r in resumed)


def test_a_connection_that_always_drops_is_an_error_or_skipped(shards, server):
    bad = f"{server.url}/drop-always/train-000001.tar"
    spec = f"{server.url}/ok/train-000000.tar::{bad}::{server.url}/ok/train-000002.tar"
    with pytest.raises(ShardReadError, match=rf"{bad}: connection closed early at byte \d+ of \d+ "
                                             r"\(gave up after 2 retries\)"):
        list(RemoteShardStream(spec, **FAST))
    assert server.hits["/drop-always/train-000001.tar"] == 3
    stream = RemoteShardStream(spec, on_bad_sample="skip", **FAST)
    got = _read(stream)
    assert stream.skipped == {"unreadable shard": 1} and len(stream.bad_events) == 1
    assert set(got) <= set(_read(ShardStream(shards))) and 9 <= len(got) < N  # shard 1's first half counts
    endless = RemoteShardStream(bad, epochs=None, on_bad_sample="skip", **FAST)  # never a silent spin
    with pytest.raises(DatasetError, match="a whole epoch of this reader's shards gave no usable sample"):
        next(iter(endless))


def test_a_stalled_server_ends_by_the_read_timeout(server):
    url = f"{server.url}/stall/train-000000.tar"
    t0 = time.perf_counter()
    with pytest.raises(ShardReadError, match=rf"{url}: timed out waiting for data at byte 0 "
                                             r"\(gave up after 1 retries\)"):
        list(RemoteShardStream(url, read_timeout=0.3, retries=1, backoff=0.0))
    assert time.perf_counter() - t0 < 5


def test_a_missing_url_is_a_clear_error(server):
    url = f"{server.url}/ok/train-000009.tar"
    with pytest.raises(ShardReadError, match=rf"^{url}: HTTP 404 Not Found$"):
        list(RemoteShardStream(url, **FAST))
    assert server.hits["/ok/train-000009.tar"] == 1  # a 404 is not retried
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ShardReadError, match=rf"127.0.0.1:{port}/x.tar: cannot connect \(.*refused"):
        list(RemoteShardStream(f"http://127.0.0.1:{port}/x.tar", **FAST))


def test_bad_samples_name_url_and_member_or_are_skipped(server):
    url = f"{server.url}/ok/bad-000000.tar"
    with pytest.raises(DatasetError, match=rf"{url}#b.png"):
        list(RemoteShardStream(url, **FAST))
    stream = RemoteShardStream(url, on_bad_sample="skip", **FAST)
    assert [r["caption"] for r in stream] == ["a red square"]
    assert stream.skipped == {"corrupt image": 1, "missing caption": 1}


def test_fsspec_urls_and_the_missing_extra(shards, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for p in shard_paths(shards):
        fs.pipe(f"/vlkit-test/{p.name}", p.read_bytes())
    assert _read(RemoteShardStream("memory://vlkit-test/train-{000000..000002}.tar")) == _read(ShardStream(shards))
    if importlib.util.find_spec("s3fs") is None:  # fsspec without its S3 backend
        with pytest.raises(DatasetError, match=r"s3://b/t.tar: .*s3fs.*vlkit\[remote\]', plus s3fs\)"):
            list(RemoteShardStream("s3://b/t.tar", on_bad_sample="skip"))
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(DatasetError, match=r"s3://b/t.tar: reading s3:// URLs needs fsspec "
                                           r"\(pip install 'vlkit\[remote\]', plus s3fs\)"):
        list(RemoteShardStream("s3://b/t.tar"))


def test_stream_batches_resume_where_they_stopped(server):
    spec = server.url + "/ok/train-{000000..000002}.tar"

    def batches(start, workers=0):
        stream = RemoteShardStream(spec, seed=1, buffer=4, epochs=None, decode=False, **FAST)
        loader = stream_batch_loader(stream, lambda recs, rngs: {"keys": [r["__key__"] for r in recs]},
                                     4, start=start, seed=1, num_workers=workers)
        out = []
        for b in loader:
            out.append(b["keys"])
            if len(out) == 6 - start // 4:
                close_loader(loader)
                return out
    whole = batches(0)
    assert len(whole) == 6 and batches(8) == whole[2:]
    assert batches(12, workers=2) == batches(0, workers=2)[3:]


# ---- training ---------------------------------------------------------------------------------

TINY = ["--set", "vision.image_size=32", "--set", "vision.dim=32", "--set", "vision.depth=1",
        "--set", "vision.heads=2", "--set", "vision.mlp_dim=64", "--set", "text.dim=32",
        "--set", "text.depth=1", "--set", "text.heads=2", "--set", "text.mlp_dim=64",
        "--set", "embed_dim=16"]


def test_train_reads_shard_urls(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLKIT_NO_PROGRESS", "1")
    out = tmp_path / "run"
    spec = server.url + "/ok/train-{000000..000001}.tar"
    assert main(["train", "clip", "--data", spec, "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--workers", "1", "--precision", "fp32", "--read-timeout", "5", *TINY]) == 0
    assert "--data is shard URLs: evaluation skipped" in capsys.readouterr().out
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == 2 and summary["samples"] == 8 and summary["bad_samples"] == {}
    assert json.loads((out / "config.json").read_text())["data"] == spec
    assert (out / "tokenizer").is_dir()
    skip = tmp_path / "skip"  # a shard that always drops: skipped and counted
    spec = f"{server.url}/ok/train-000000.tar::{server.url}/drop-always/train-000001.tar"
    assert main(["train", "clip", "--data", spec, "--out", str(skip), "--steps", "2", "--batch-size", "4",
                 "--workers", "0", "--precision", "fp32", "--retries", "1", "--on-bad-sample", "skip",
                 "--no-eval", *TINY]) == 0
    summary = json.loads((skip / "train_summary.json").read_text())
    assert summary["bad_samples"] == {"unreadable shard": 1}
    assert main(["train", "clip", "--data", server.url + "/ok/train-{000000..000002}.tar", "--out",
                 str(tmp_path / "run2"), "--steps", "1", "--workers", "4", *TINY]) == 2
    assert "3 shards cannot be split between 4 readers" in capsys.readouterr().err
    assert main(["train", "clip", "--data", "synthetic", "--retries", "1", "--out", str(tmp_path / "run3"),
                 "--steps", "1"]) == 2
    assert "--retries: for shard URLs in --data, not synthetic" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()
