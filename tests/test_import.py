"""vlkit import coco | karpathy | vqa: small annotation files in the published formats, written
by the test, into dataset folders that the JSONL reader takes."""
import json
import os

import pytest
from PIL import Image

from vlkit.cli import main
from vlkit.data.jsonl import JsonlDataset


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (30 * i % 255, 0, 0)).save(folder / name)
    return folder


def _coco(tmp_path, n=5, name="captions.json", prefix="COCO_train2014_"):
    names = [f"{prefix}{i:012d}.jpg" for i in range(1, n + 1)]
    obj = {"images": [{"id": i, "file_name": f, "height": 8, "width": 8} for i, f in enumerate(names, 1)],
           "annotations": [{"image_id": i, "id": 10 * i + k, "caption": f" image {i} caption {k} "}
                           for i in range(1, n + 1) for k in range(2)]}
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path, names


def _read(folder, split):
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def test_coco_split_ratio_grouped_captions_and_hard_links(tmp_path, capsys):
    ann, names = _coco(tmp_path, n=10)
    images = _images(tmp_path / "train2014", names)
    out = tmp_path / "ds"
    assert main(["import", "coco", str(ann), "--images", str(images), "--out", str(out),
                 "--split-ratio", "0.6,0.2,0.2"]) == 0
    printed = capsys.readouterr().out
    assert "train: 6 records" in printed and "test: 2 records" in printed and "10 hardlink" in printed
    recs = _read(out, "train") + _read(out, "val") + _read(out, "test")
    assert sorted(r["image_id"] for r in recs) == list(range(1, 11))
    r = next(r for r in recs if r["image_id"] == 3)
    assert r["caption"] == "image 3 caption 0" and r["captions"] == ["image 3 caption 0", "image 3 caption 1"]
    assert r["image"] == f"images/{names[2]}"
    assert os.path.samefile(out / r["image"], images / names[2])  # hard link: same file, no copy
    ds = JsonlDataset(out, "train")  # the reader takes it as it is (images inside the folder)
    assert len(ds) == 6 and ds[0]["image"].size == (8, 8)
    assert json.loads((out / "import.json").read_text())[0]["format"] == "coco"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]  # no stage folder left


def test_coco_adds_a_split_to_a_dataset_and_refuses_to_replace_one(tmp_path, capsys):
    ann, names = _coco(tmp_path, n=3)
    val, val_names = _coco(tmp_path, n=2, name="val.json", prefix="COCO_val2014_")
    images = _images(tmp_path / "img", names + val_names)
    out = tmp_path / "ds"
    assert main(["import", "coco", str(ann), "--images", str(images), "--out", str(out), "--link", "copy"]) == 0
    assert main(["import", "coco", str(val), "--images", str(images), "--out", str(out), "--split", "test"]) == 0
    assert len(_read(out, "train")) == 3 and len(_read(out, "test")) == 2
    assert not os.path.samefile(out / _read(out, "train")[0]["image"], images / names[0])  # --link copy
    assert len(json.loads((out / "import.json").read_text())) == 2
    capsys.readouterr()
    assert main(["import", "coco", str(ann), "--images", str(images), "--out", str(out)]) == 2
    assert "already has train.jsonl" in capsys.readouterr().err


def test_missing_images_are_named_or_skipped_and_counted(tmp_path, capsys):
    ann, names = _coco(tmp_path, n=4)
    images = _images(tmp_path / "img", names[:3])
    out = tmp_path / "ds"
    assert main(["import", "coco", str(ann), "--images", str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 image file(s) missing" in err and names[3] in err and "--skip-missing" in err
    assert not out.exists()  # nothing half-written
    assert main(["import", "coco", str(ann), "--images", str(images), "--out", str(out), "--skip-missing"]) == 0
    assert "skipped: 1 missing image" in capsys.readouterr().out
    assert len(_read(out, "train")) == 3


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o["annotations"][1].pop("caption"), 'annotations[1]: needs a "caption"'),
    (lambda o: o["annotations"][0].update(image_id=99), "image_id 99 is not in"),
    (lambda o: o.pop("images"), 'expected an object with a "images" list'),
    (lambda o: o["images"][0].update(file_name="../../etc/x.jpg"), "must be a relative path inside"),
])
def test_bad_annotation_files_give_one_line_naming_the_field(tmp_path, capsys, mutate, message):
    ann, names = _coco(tmp_path, n=2)
    obj = json.loads(ann.read_text())
    mutate(obj)
    ann.write_text(json.dumps(obj))
    images = _images(tmp_path / "img", names)
    assert main(["import", "coco", str(ann), "--images", str(images), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_karpathy_splits_restval_and_filepath(tmp_path, capsys):
    entries = [("train2014", "a.jpg", "train"), ("val2014", "b.jpg", "restval"), ("val2014", "c.jpg", "val"),
               ("val2014", "d.jpg", "test"), ("val2014", "e.jpg", "test")]
    obj = {"dataset": "coco", "images": [
        {"filepath": fp, "filename": fn, "split": sp, "cocoid": i, "imgid": i,
         "sentences": [{"raw": f"{fn} one.", "tokens": ["one"]}, {"raw": f"{fn} two.", "tokens": ["two"]}]}
        for i, (fp, fn, sp) in enumerate(entries)]}
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps(obj))
    images = _images(tmp_path / "coco", [f"{fp}/{fn}" for fp, fn, _ in entries])
    out = tmp_path / "ds"
    assert main(["import", "karpathy", str(ann), "--images", str(images), "--out", str(out)]) == 0
    train, val, test = _read(out, "train"), _read(out, "val"), _read(out, "test")
    assert [r["image"] for r in train] == ["images/train2014/a.jpg", "images/val2014/b.jpg"]
    assert len(val) == 1 and len(test) == 2
    assert test[0]["captions"] == ["d.jpg one.", "d.jpg two."] and test[0]["cocoid"] == 3
    assert len(JsonlDataset(out, "test")) == 2
    with pytest.raises(SystemExit) as e:  # a Karpathy file names its own splits
        main(["import", "karpathy", str(ann), "--images", str(images), "--out", str(tmp_path / "x"),
              "--split", "train"])
    assert e.value.code == 2


def _vqa(tmp_path):
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 1, "question": "Is there a cat?", "question_id": 10},
        {"image_id": 1, "question": "How many cats?", "question_id": 11},
        {"image_id": 2, "question": "What colour is the car?", "question_id": 20}]}

    def ann(qid, image, best, kind):
        return {"question_id": qid, "image_id": image, "multiple_choice_answer": best, "answer_type": kind,
                "answers": [{"answer": best, "answer_confidence": "yes", "answer_id": k} for k in range(9)]
                + [{"answer": "other", "answer_confidence": "maybe", "answer_id": 9}]}
    annotations = {"annotations": [ann(10, 1, "yes", "yes/no"), ann(11, 1, "2", "number"),
                                   ann(20, 2, "red", "other")]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return tmp_path / "q.json", tmp_path / "a.json"


def test_vqa_questions_into_qa_with_types(tmp_path, capsys):
    q, a = _vqa(tmp_path)
    images = _images(tmp_path / "val2014", ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"])
    out = tmp_path / "ds"
    assert main(["import", "vqa", str(q), str(a), "--images", str(images), "--out", str(out),
                 "--split", "test"]) == 0
    assert "no --captions" in capsys.readouterr().err
    recs = {r["image_id"]: r for r in _read(out, "test")}
    first = recs[1]["qa"]
    assert [(e["question"], e["answer"], e["type"]) for e in first] == [
        ("Is there a cat?", "yes", "yes_no"), ("How many cats?", "2", "count")]
    assert first[0]["answers"].count("yes") == 9 and len(first[0]["answers"]) == 10
    assert recs[2]["qa"][0]["type"] == "other" and recs[1]["caption"] == "Is there a cat?"
    rec = JsonlDataset(out, "test")[0]
    assert rec["qa"] and rec["image"].size == (8, 8)
    # with the COCO captions of the same images, the captions are the records' captions
    caps, _ = _coco(tmp_path, n=2, prefix="COCO_val2014_")
    assert main(["import", "vqa", str(q), str(a), "--images", str(images), "--out", str(tmp_path / "ds2"),
                 "--captions", str(caps)]) == 0
    recs = {r["image_id"]: r for r in _read(tmp_path / "ds2", "train")}
    assert recs[2]["caption"] == "image 2 caption 0" and recs[2]["qa"][0]["answer"] == "red"


def test_vqa_unknown_answer_type_and_missing_image(tmp_path, capsys):
    q, a = _vqa(tmp_path)
    images = _images(tmp_path / "val2014", ["COCO_val2014_000000000001.jpg"])
    assert main(["import", "vqa", str(q), str(a), "--images", str(images), "--out", str(tmp_path / "ds")]) == 2
    assert "<image 2>" in capsys.readouterr().err
    obj = json.loads(a.read_text())
    obj["annotations"][0]["answer_type"] = "colour"
    a.write_text(json.dumps(obj))
    assert main(["import", "vqa", str(q), str(a), "--images", str(images), "--out", str(tmp_path / "ds")]) == 2
    assert "answer_type 'colour' is not one of yes/no, number, other" in capsys.readouterr().err
