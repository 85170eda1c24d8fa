"""The README is a front door that works: short, the set-up commands first, every `vlkit`
command it shows accepted as written, its Python quickstart running on a tiny model, and every
relative link in it and in docs/ pointing at a file (and heading) that exists."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
SETUP = ["bash scripts/demo.sh", "bash scripts/test.sh"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def code_blocks(text: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def command_lines(block: str) -> list[str]:
    """Shell lines of a code block, continuations joined, comments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.split(r"\s#\s|^#", line, maxsplit=1)[0].strip()
        if line:
            out.append(line)
    return out


def readme_commands() -> list[list[str]]:
    """Every `vlkit ...` command of the README: in its bash blocks and in inline code."""
    text = README.read_text()
    lines = [line for block in code_blocks(text, "bash") for line in command_lines(block)]
    prose = FENCE.sub("", text)
    lines += re.findall(r"`(vlkit [^`]+)`", prose)
    commands = []
    for line in lines:
        words = shlex.split(line.replace("|", " "))  # "synthetic|DIR" is a choice, not a pipe
        if words and words[0] == "vlkit" and words[1:] and words not in commands:
            commands.append(words)
    return commands


def help_argv(words: list[str]) -> tuple[str, ...]:
    """`vlkit SUB [POSITIONAL ...] --help`: the words before the first option, then --help."""
    lead = []
    for w in words[1:]:
        if w.startswith("-"):
            break
        lead.append(w)
    return (*lead, "--help")


COMMANDS = readme_commands()


# (a) -------------------------------------------------------------------------------------------
def test_readme_is_at_most_200_lines_and_begins_with_the_setup_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines"
    first = FENCE.search(text)
    before = [line for line in text[:first.start()].splitlines() if line.strip()]
    assert all(line.startswith("# ") for line in before), f"prose before the set-up commands: {before}"
    lines = command_lines(first.group(2))
    assert lines[:2] == SETUP, f"the README must begin with {SETUP}, got {lines[:2]}"
    # CI runs the README's test command
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


# (b) -------------------------------------------------------------------------------------------
HELP_RUNNER = """
import contextlib, io, json, sys
from vlkit.cli import main  # what `python -m vlkit` runs
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    results.append([code, out.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def helps() -> dict:
    """`vlkit ... --help` for every README command, as `python -m vlkit` runs it, in one fresh
    process (one import of torch instead of one per command)."""
    argvs = list(dict.fromkeys(help_argv(c) for c in COMMANDS))
    proc = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(argvs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {argv: tuple(result) for argv, result in zip(argvs, json.loads(proc.stdout))}


def test_the_readme_shows_the_commands_a_user_needs():
    shown = {tuple(c[1:3]) for c in COMMANDS} | {(c[1],) for c in COMMANDS}
    for needed in [("train", "--recipe"), ("eval",), ("recipes",)]:
        assert needed in shown, f"the README shows no `vlkit {' '.join(needed)}` command"


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c)[:70] for c in COMMANDS])
def test_every_readme_command_is_accepted(words, helps):
    argv = help_argv(words)
    code, out = helps[argv]
    assert code == 0, f"`vlkit {' '.join(argv)}` exited {code}:\n{out[-600:]}"
    missing = [w.split("=", 1)[0] for w in words if w.startswith("--")
               and not re.search(rf"(^|[\s\[,]){re.escape(w.split('=', 1)[0])}\b", out)]
    assert not missing, f"`vlkit {' '.join(argv)}` does not take {missing} shown in `{' '.join(words)}`"


# (c) -------------------------------------------------------------------------------------------
TINY_CLIP = ["--set", 'vision={"image_size": 32, "patch_size": 16, "dim": 32, "depth": 1, "heads": 2}',
             "--set", "vision.mlp_dim=64", "--set", "embed_dim=16",
             "--set", 'text={"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "context_length": 48, '
                      '"act": "gelu"}']


def test_the_python_quickstart_runs_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    """The quickstart reads `runs/clip` and `data/world`: the test makes both, small, in a
    temporary folder and runs the code as written there."""
    from vlkit.cli import main
    blocks = [b for b in code_blocks(README.read_text(), "python") if "vlkit.load(" in b]
    assert len(blocks) == 1, "the README needs one Python quickstart block calling vlkit.load"
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out", "data/world", "--num", "20", "--image-size", "32"]) == 0
    assert main(["train", "clip", "--data", "data/world", "--out", "runs/clip", "--steps", "1",
                 "--batch-size", "8", "--no-eval", "--no-progress", *TINY_CLIP]) == 0
    namespace = {"__name__": "readme_quickstart"}
    exec(compile(blocks[0], "README.md (Python quickstart)", "exec"), namespace)
    assert type(namespace["pipe"]).__name__ == "Pipeline"


# (d) -------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(page):
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_headline_table_is_the_one_the_recorded_runs_render():
    """The README's headline figures are copied by scripts/results_table.py from the run records
    in docs/runs/, never typed: the table between the markers is exactly what the script prints,
    and every record names its recipe, seed, machine, steps and metrics."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import results_table
    finally:
        sys.path.pop(0)
    records = results_table.load_records()
    assert records, "no run records in docs/runs/"
    for rec in records:
        assert {"recipe", "seed", "machine", "precision", "steps", "metrics"} <= rec.keys()
        assert rec["metrics"] and all(isinstance(v, (int, float)) for v in rec["metrics"].values())
    text = README.read_text()
    start, end = "<!-- results_table.py -->\n", "<!-- /results_table.py -->"
    assert start in text and end in text, "the README lost its results_table.py markers"
    shown = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert shown == results_table.table(records)
