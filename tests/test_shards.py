"""Webdataset tar shards: byte-exact round trip, seeded shuffling, rank/worker splits, training."""
import json
import tarfile

import pytest
from torch.utils.data import DataLoader

from vlkit.cli import main
from vlkit.data.shards import ShardDataset, ShardSource, ShardStream, shard_paths, write_shards
from vlkit.data.synthetic import write_dataset

N, SIZE = 16, 7  # write_dataset(num=20) puts 16 records in train.jsonl


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("jsonl")
    write_dataset(root, num=20, seed=3, image_size=32)
    return root


@pytest.fixture(scope="module")
def shards(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    assert main(["shard", str(dataset), "--out", str(out), "--shard-size", str(SIZE)]) == 0
    return out


def _lines(dataset):
    return [line for line in (dataset / "train.jsonl").read_bytes().splitlines() if line.strip()]


def test_round_trip_is_byte_identical(dataset, shards):
    paths = shard_paths(shards, "train")
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    lines = _lines(dataset)
    assert len(lines) == N
    members = []
    for p in paths:
        with tarfile.open(p) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert len(members) == 2 * N
    for i, line in enumerate(lines):
        (json_name, record), (image_name, image) = members[2 * i], members[2 * i + 1]
        rec = json.loads(line)
        assert json_name == f"{i:09d}.json" and record == line.strip()
        assert image_name == f"{i:09d}.png"
        assert image == (dataset / rec["image"]).read_bytes()
    ds = ShardDataset(shards)
    assert len(ds) == N and [len(r) for r in ds.shard_ranges] == [7, 7, 2]
    for i, line in enumerate(lines):
        assert ds.records[i] == json.loads(line)
        assert ds.image_bytes(i) == (dataset / ds.records[i]["image"]).read_bytes()
    item = ds[5]
    assert item["image"].mode == "RGB" and item["caption"] == json.loads(lines[5])["caption"]
    assert item["image_path"].endswith("train-000000.tar#000000005.png")


def test_writing_twice_gives_identical_shards(dataset, shards, tmp_path):
    res = write_shards(dataset, tmp_path, "train", SIZE)
    assert res["samples"] == N and res["skipped"] == {}
    for a, b in zip(shard_paths(shards), shard_paths(tmp_path)):
        assert a.read_bytes() == b.read_bytes()


def test_missing_image_is_an_error_or_skipped(dataset, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = _lines(dataset)
    (bad / "images").symlink_to(dataset / "images")
    extra = json.dumps({"image": "images/nope.png", "caption": "gone"}).encode()
    (bad / "train.jsonl").write_bytes(b"\n".join(lines[:3] + [extra]) + b"\n")
    # images/ is a symbolic link to another folder: outside the dataset unless allowed
    with pytest.raises(ValueError, match=r"train.jsonl:1: image .* lies outside the dataset folder"):
        write_shards(bad, tmp_path / "out", "train", 2)
    with pytest.raises(ValueError, match=r"train.jsonl:4: image .*nope.png not found"):
        write_shards(bad, tmp_path / "out", "train", 2, allow_outside=True)
    res = write_shards(bad, tmp_path / "out", "train", 2, on_bad_sample="skip", allow_outside=True)
    assert res["samples"] == 3 and res["skipped"] == {"missing image": 1}
    assert len(shard_paths(tmp_path / "out")) == 2


def test_shard_source_shuffles_shards_and_samples_with_a_seed(shards):
    ds = ShardDataset(shards)
    src = ShardSource(ds, seed=1)
    order = src.epoch_order(0)
    assert sorted(order) == list(range(N))
    # each shard is read as one run of samples
    runs = [next(s for s, r in enumerate(ds.shard_ranges) if i in r) for i in order]
    assert len([k for k in range(1, N) if runs[k] != runs[k - 1]]) == 2
    assert order != list(range(N)) and order != src.epoch_order(1)
    assert order == ShardSource(ds, seed=1).epoch_order(0) != ShardSource(ds, seed=2).epoch_order(0)
    assert src(N + 3)["caption"] == ds[src.epoch_order(1)[3]]["caption"]


def _keys(stream, workers=0):
    if workers:
        loader = DataLoader(stream, batch_size=None, num_workers=workers,
                            collate_fn=lambda x: x, multiprocessing_context="fork")
        return [rec["__key__"] for rec in loader]
    return [rec["__key__"] for rec in stream]


def test_stream_splits_by_rank_and_worker_and_is_seeded(shards):
    all_keys = sorted(_keys(ShardStream(shards, decode=False)))
    assert len(all_keys) == N
    # 2 ranks x 2 workers: 4 readers over 3 shards, each sample read exactly once
    parts = [_keys(ShardStream(shards, seed=5, buffer=4, rank=r, world=2, decode=False), workers=2)
             for r in range(2)]
    assert sorted(parts[0] + parts[1]) == all_keys and not set(parts[0]) & set(parts[1])
    a = _keys(ShardStream(shards, seed=5, buffer=4, decode=False))
    assert a == _keys(ShardStream(shards, seed=5, buffer=4, decode=False))
    assert a != _keys(ShardStream(shards, seed=6, buffer=4, decode=False))
    assert a != sorted(a)  # the buffer shuffles samples
    two = _keys(ShardStream(shards, seed=5, epochs=2, decode=False))
    assert len(two) == 2 * N and sorted(two[:N]) == sorted(two[N:]) == all_keys


def test_train_reads_a_shard_folder(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_NO_PROGRESS", "1")
    out = tmp_path / "run"
    assert main(["train", "clip", "--data", str(shards), "--out", str(out), "--steps", "3",
                 "--batch-size", "8", "--no-eval", "--workers", "0", "--precision", "fp32",
                 "--set", "vision.image_size=32", "--set", "vision.dim=32", "--set", "vision.depth=1",
                 "--set", "vision.heads=2", "--set", "vision.mlp_dim=64", "--set", "text.dim=32",
                 "--set", "text.depth=1", "--set", "text.heads=2", "--set", "text.mlp_dim=64",
                 "--set", "embed_dim=16"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["samples"] == 24 and summary["bad_samples"] == {}  # 1.5 epochs
    assert (out / "model.safetensors").is_file()
