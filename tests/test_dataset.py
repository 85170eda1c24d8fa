import json

import numpy as np
import pytest
from PIL import Image

from vlkit.data.jsonl import DatasetError, FolderDataset, JsonlDataset
from vlkit.data.synthetic import write_dataset


def make_image(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (value, 0, 0)).save(path)


def good(i, **extra):
    return json.dumps({"image": f"images/{i}.png", "caption": f"caption {i}", **extra})


@pytest.fixture
def messy(tmp_path):
    """train.jsonl with good lines and one of each kind of bad line or image."""
    for i in (1, 6, 8):
        make_image(tmp_path / "images" / f"{i}.png", 10 * i)
    (tmp_path / "images" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = [
        good(1, negatives=[{"caption": "x", "kind": "relation_flip"}], label="red circle"),  # 1
        '{"image": "images/2.png", "caption": ',                                             # 2
        json.dumps({"caption": "no image"}),                                                 # 3
        json.dumps({"image": "images/4.png", "caption": "   "}),                             # 4
        json.dumps({"image": "images/5.png"}),                                               # 5
        good(66),                                                                            # 6
        good(7),                                                                             # 7
        good(8, qa=[{"question": "q?", "answer": "yes", "type": "exists"}]),                 # 8
        "   ",                                                                               # blank
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "caption": ', "invalid JSON"),
    ('["a list"]', "JSON object"),
    (json.dumps({"caption": "no image"}), "image"),
    (json.dumps({"image": "a.png", "caption": ""}), "empty caption"),
    (json.dumps({"image": "a.png", "caption": " \t "}), "empty caption"),
    (json.dumps({"image": "a.png"}), "caption"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    make_image(tmp_path / "images" / "1.png")
    (tmp_path / "val.jsonl").write_text(good(1) + "\n\n" + line + "\n" + good(1) + "\n")
    with pytest.raises(DatasetError, match=message) as err:
        JsonlDataset(tmp_path, "val")
    assert f"{tmp_path / 'val.jsonl'}:3" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_and_corrupt_images_name_image_and_line(messy):
    lines = (messy / "train.jsonl").read_text().splitlines()
    kept = [lines[0], lines[5], lines[6], lines[7]]
    (messy / "val.jsonl").write_text("\n".join(kept) + "\n")
    ds = JsonlDataset(messy, "val")
    assert len(ds) == 4
    assert ds[0]["image"].size == (8, 6)
    with pytest.raises(DatasetError) as err:
        ds[1]
    assert "66.png" in str(err.value) and "val.jsonl:2" in str(err.value)
    with pytest.raises(DatasetError) as err:
        ds[2]
    assert "7.png" in str(err.value) and "val.jsonl:3" in str(err.value)


def test_skip_counts_and_summary(messy):
    ds = JsonlDataset(messy, "train", on_bad_sample="skip")
    assert len(ds) == 4  # lines 1, 6, 7, 8 parse; 2-5 are skipped up front
    assert ds.skipped == {"bad json": 1, "no image field": 1, "empty caption": 1, "missing caption": 1}
    first = ds[0]
    assert first["caption"] == "caption 1" and np.asarray(first["image"])[0, 0, 0] == 10
    assert first["label"] == "red circle" and first["negatives"][0]["kind"] == "relation_flip"
    item = ds[1]  # 66.png is missing and 7.png corrupt: the next readable sample stands in
    assert item["caption"] == "caption 8" and item["qa"][0]["answer"] == "yes"
    assert ds[2]["caption"] == "caption 8"
    assert ds[3]["caption"] == "caption 8"
    assert ds.skipped["missing image"] == 1 and ds.skipped["corrupt image"] == 1  # counted once
    assert ds.summary() == ("skipped 6 of 8 samples: 1 bad json, 1 no image field, 1 empty caption, "
                            "1 missing caption, 1 missing image, 1 corrupt image")


def test_summary_groups_reasons(tmp_path):
    make_image(tmp_path / "images" / "0.png")
    lines = [good(0), good(98), json.dumps({"image": "x.png", "caption": ""}), good(99), good(0)]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    ds = JsonlDataset(tmp_path, "test", on_bad_sample="skip")
    items = [ds[i] for i in range(len(ds))]
    assert [r["caption"] for r in items] == ["caption 0", "caption 0", "caption 0", "caption 0"]
    assert ds.summary() == "skipped 3 of 5 samples: 2 missing image, 1 empty caption"


def test_all_bad_under_skip_raises(tmp_path):
    (tmp_path / "train.jsonl").write_text(good(1) + "\n")
    ds = JsonlDataset(tmp_path, on_bad_sample="skip")
    with pytest.raises(DatasetError, match="no readable sample"):
        ds[0]


def test_missing_file_and_bad_mode(tmp_path):
    with pytest.raises(DatasetError, match="train.jsonl"):
        JsonlDataset(tmp_path)
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match="on_bad_sample"):
        JsonlDataset(tmp_path, on_bad_sample="ignore")


def test_reads_a_written_synthetic_dataset(tmp_path):
    write_dataset(tmp_path, sizes={"train": 6, "test": 3}, splits=("train", "test"))
    ds = JsonlDataset(tmp_path, "test")
    assert len(ds) == 3
    rec = ds[2]
    assert rec["image"].size == (64, 64) and rec["image"].mode == "RGB"
    assert rec["captions"][0] == rec["caption"] and rec["objects"] and rec["negatives"]
    assert JsonlDataset(tmp_path / "train.jsonl")[5]["image_path"].endswith("train_000005.png")


def test_folder_dataset(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n")
    make_image(tmp_path / "b.jpg")
    (tmp_path / "c.png").write_bytes(b"junk")
    (tmp_path / "c.txt").write_text("corrupt")
    with pytest.raises(DatasetError, match="b.txt"):
        FolderDataset(tmp_path)
    ds = FolderDataset(tmp_path, on_bad_sample="skip")
    assert len(ds) == 2 and ds[0]["caption"] == "a red thing"
    assert ds[1]["caption"] == "a red thing"  # c.png is corrupt: a.png stands in
    assert ds.summary() == "skipped 2 of 3 samples: 1 missing caption, 1 corrupt image"
