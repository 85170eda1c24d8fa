"""Bad samples: every kind is converted, or skipped and counted (--on-bad-sample skip), or an
error naming the file and line (the default); too many skips stop the run."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlkit.data.jsonl import DatasetError, JsonlDataset, TooManyBadSamples
from vlkit.data.transforms import ImageError, load_image

GOOD = 12


def _png_header_only(width, height):
    """A PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _rgb(seed, size=(24, 20)):
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a)


# (name, file bytes, caption, expected skip reason or None when the sample is usable)
def _cases():
    grey16 = Image.fromarray(np.arange(24 * 20, dtype=np.uint16).reshape(20, 24) * 130)  # I;16
    cmyk = io.BytesIO()
    _rgb(1).convert("CMYK").save(cmyk, "JPEG")
    whole = _png(_rgb(2, (48, 48)))
    return [
        ("grey.png", _png(_rgb(3).convert("L")), "a grey picture", None),
        ("cmyk.jpg", cmyk.getvalue(), "a cmyk picture", None),
        ("deep.png", _png(grey16), "a sixteen bit picture", None),
        ("tiny.png", _png(_rgb(4, (1, 1))), "one pixel", None),
        ("long.png", _png(_rgb(5)), "long " * 20_000, None),  # 100k characters
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "corrupt", "corrupt image"),
        ("truncated.png", whole[:len(whole) // 2], "truncated", "truncated image"),
        ("empty.png", b"", "zero bytes", "empty image file"),
        ("bomb.png", _png_header_only(20_000, 20_000), "huge", "image too large"),
        ("absent.png", None, "missing file", "missing image"),
        ("blank.png", _png(_rgb(6)), "", "empty caption"),
        ("spaces.png", _png(_rgb(7)), "  \t ", "empty caption"),
    ]


EXPECTED = {"corrupt image": 1, "truncated image": 1, "empty image file": 1, "image too large": 1,
            "missing image": 1, "empty caption": 2, "bad encoding": 1}


@pytest.fixture
def messy(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(GOOD):
        _rgb(100 + i).save(images / f"good{i}.png")
        rec = {"image": f"images/good{i}.png", "caption": f"red circle number {i}"}
        lines.append(json.dumps(rec).encode())
    for name, data, caption, _ in _cases():
        if data is not None:
            (images / name).write_bytes(data)
        lines.append(json.dumps({"image": f"images/{name}", "caption": caption}).encode())
    _rgb(8).save(images / "latin1.png")
    lines.insert(3, b'{"image": "images/latin1.png", "caption": "caf\xe9 au lait"}')  # not UTF-8
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "test.jsonl").write_bytes(b"\n".join(lines[:4]) + b"\n")
    return tmp_path


def test_odd_but_valid_images_become_rgb(messy):
    for name, _, _, reason in _cases():
        if reason is None:
            img = load_image(messy / "images" / name)
            assert img.mode == "RGB" and img.size[0] >= 1, name
    deep = np.asarray(load_image(messy / "images" / "deep.png"))
    assert deep.max() > 200 and deep.min() < 50  # 16-bit data scaled to 8 bits, not clipped


@pytest.mark.parametrize("name, reason", [(c[0], c[3]) for c in _cases() if c[3] and "caption" not in c[3]])
def test_each_bad_image_has_its_reason_and_names_the_file(messy, name, reason):
    with pytest.raises(ImageError) as err:
        load_image(messy / "images" / name)
    assert err.value.reason == reason and name in str(err.value)


def test_default_is_an_error_naming_file_and_line(messy):
    with pytest.raises(DatasetError, match=r"train.jsonl:4: not valid UTF-8"):
        JsonlDataset(messy, "train")
    (messy / "train.jsonl").write_bytes(b"\n".join(
        line for line in (messy / "train.jsonl").read_bytes().splitlines() if b"latin1" not in line
        and b'"caption": ""' not in line and b'"  \\t "' not in line) + b"\n")
    ds = JsonlDataset(messy, "train")
    index = next(i for i, r in enumerate(ds.records) if r["image"].endswith("truncated.png"))
    with pytest.raises(DatasetError) as err:
        ds[index]
    assert "truncated.png" in str(err.value) and f"train.jsonl:{ds.lines[index]}" in str(err.value)


def test_skip_counts_every_reason_exactly(messy):
    ds = JsonlDataset(messy, "train", on_bad_sample="skip")
    assert len(ds) == GOOD + len(_cases()) - 2  # the two empty captions and the bad line dropped
    for i in range(len(ds)):
        rec = ds[i]
        assert rec["image"].mode == "RGB"
    assert dict(ds.skipped) == EXPECTED
    assert ds.summary().startswith(f"skipped {sum(EXPECTED.values())} of {GOOD + len(_cases()) + 1} samples")


def test_too_many_bad_samples_stop_with_a_clear_message(messy):
    with pytest.raises(TooManyBadSamples, match=r"of the samples are bad, more than the allowed 10.0%"):
        ds = JsonlDataset(messy, "train", on_bad_sample="skip", max_skip_rate=0.1, min_samples=5)
        for i in range(len(ds)):
            ds[i]
    # a lenient threshold lets the whole epoch through
    ds = JsonlDataset(messy, "train", on_bad_sample="skip", max_skip_rate=0.5, min_samples=5)
    for i in range(len(ds)):
        ds[i]
    assert 0.2 < ds.skip_rate() < 0.5


def test_training_under_skip_reports_exact_counts(messy, tmp_path, monkeypatch):
    from vlkit.cli import main
    monkeypatch.setenv("VLKIT_NO_PROGRESS", "1")
    out = tmp_path / "run"
    # 4 steps of 8 samples cover the 22 usable records; one DataLoader worker reports its skips
    assert main(["train", "clip", "--data", str(messy), "--out", str(out), "--steps", "4",
                 "--batch-size", "8", "--no-eval", "--workers", "1", "--precision", "fp32",
                 "--on-bad-sample", "skip", "--max-skip-rate", "0.6",
                 "--set", "vision.dim=32", "--set", "vision.depth=1", "--set", "vision.heads=2",
                 "--set", "vision.mlp_dim=64", "--set", "text.dim=32", "--set", "text.depth=1",
                 "--set", "text.heads=2", "--set", "text.mlp_dim=64", "--set", "embed_dim=16"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["bad_samples"] == dict(sorted(EXPECTED.items()))
    assert np.isfinite(summary["loss"])


def test_an_abort_in_a_loader_worker_is_reported_in_one_line(messy):
    from torch.utils.data import DataLoader

    from vlkit.cli import _one_line
    # 12% of the lines are bad (under the limit); the bad images found in the worker go over it
    ds = JsonlDataset(messy, "train", on_bad_sample="skip", max_skip_rate=0.2, min_samples=5)
    loader = DataLoader(ds, batch_size=None, num_workers=1, collate_fn=lambda x: x,
                        multiprocessing_context="fork")
    with pytest.raises(TooManyBadSamples) as err:
        list(loader)
    line = _one_line(err.value)
    assert "\n" not in line and line.startswith(str(messy / "train.jsonl"))
    assert "more than the allowed 20.0% (max_skip_rate)" in line and "corrupt image" in line
