import json
import subprocess
import sys

import pytest
import torch

import vlkit
from vlkit.cli import main

SMALL_CLIP = ["--set", 'vision={"image_size": 32, "patch_size": 16, "dim": 32, "depth": 1, "heads": 2}',
              "--set", "vision.mlp_dim=64",
              "--set", "embed_dim=16"]


def test_help_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "vlkit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "synth" in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "nosuchmodel", "--out", "x", "--steps", "1"], "unknown model 'nosuchmodel'"),
    (["train", "clip", "--out", "x"], "--steps or --minutes"),
    (["train", "clip", "--data", "/no/such/dir", "--out", "x", "--steps", "1"], "no such folder"),
    (["train", "clip", "--preset", "giant", "--out", "x", "--steps", "1"], "unknown preset"),
    (["eval", "/no/such/run"], "no such folder"),
    (["train", "albef", "--out", "x", "--steps", "1", "--negatives", "3"], "need --hard-negatives"),
    (["train", "albef", "--out", "x", "--steps", "1", "--hard-negatives",
      "--negative-weights", "attribute_swap"], "KIND=W pairs"),
    (["train", "albef", "--out", "x", "--steps", "1", "--hard-negatives",
      "--negative-weights", "attribute_swap=-1"], "KIND=W pairs"),
    (["train", "albef", "--out", "x", "--steps", "1", "--hard-negatives", "--negatives", "0"],
     "at least 1 per image"),
])
def test_user_mistakes_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and "Traceback" not in err


def test_bad_option_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["train", "clip", "--steps", "notanumber", "--out", "x"])
    assert e.value.code == 2


def test_synth_train_eval_load_on_a_dataset_folder(tmp_path, capsys):
    data = tmp_path / "world"
    assert main(["synth", "--out", str(data), "--num", "40", "--image-size", "32"]) == 0
    assert (data / "train.jsonl").is_file() and (data / "test.jsonl").is_file()
    run = tmp_path / "run"
    argv = ["train", "clip", "--data", str(data), "--out", str(run), "--steps", "3", "--batch-size", "8",
            "--no-progress", *SMALL_CLIP, "--set", 'text={"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, '
            '"context_length": 48, "act": "gelu"}']
    assert main(argv) == 0
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "eval.json", "tokenizer"):
        assert (run / name).exists(), name
    result = json.loads((run / "eval.json").read_text())
    assert "retrieval.t2i_r1" in result["metrics"] and "itm.compositional_acc" in result["metrics"]
    assert "vqa" in result["unsupported"] and "caption" in result["unsupported"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 3
    # a second train into the same folder without --resume is refused, with --resume continues
    assert main(argv) == 2
    assert main(argv[:argv.index("--steps") + 1] + ["5"] + argv[argv.index("--steps") + 2:] + ["--resume"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5
    # eval with explicit tasks and output file
    out = tmp_path / "e.json"
    assert main(["eval", str(run), "--data", str(data), "--tasks", "retrieval,vqa", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["metrics"]) == {f"retrieval.{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert res["unsupported"] == ["vqa"]

    pipe = vlkit.load(run)
    images = [data / json.loads(line)["image"] for line in (data / "test.jsonl").read_text().splitlines()[:3]]
    emb = pipe.embed_images(images)
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    txt = pipe.embed_texts(["a red circle", "a blue square"])
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    probs = pipe.zero_shot(images, ["red circle", "blue square", "green star"])
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    ranked = pipe.retrieve("a red circle", images, k=2)
    assert len(ranked) == 2 and ranked[0][1] >= ranked[1][1]
    with pytest.raises(NotImplementedError, match="caption"):
        pipe.caption(images)
