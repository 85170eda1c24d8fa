"""CapFilt (BLIP, Li et al. 2022): bootstrap a dataset's captions with a captioner and a filter.

For every training record the captioner (a run that captions, e.g. BLIP) writes ``samples``
nucleus-sampled captions; the filter (a run with an ITM head) scores every original and
synthetic caption against the image, and those it judges matched (match probability above
``threshold``) are kept. The new dataset folder holds the kept captions (``caption`` the first
of them, ``captions`` all) with the record's other fields (grounding spans and negatives
re-indexed to the kept captions), and copies of the images; a record
with no caption left is dropped. The val and test splits are copied as they are. The report
(``capfilt.json`` in the new folder, and returned) counts what was kept and dropped, and
``capfilt.jsonl`` lists, per training record, each caption with its source, probability and
verdict.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..data.collate import _is_index


def _read(folder: Path, split: str) -> list[dict]:
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def _image(folder: Path, rec: dict, where: str) -> Path:
    path = (folder / str(rec.get("image", ""))).resolve()
    if not rec.get("image") or folder.resolve() not in path.parents or not path.is_file():
        raise ValueError(f"{where}: image {rec.get('image')!r} is not a file inside {folder}")
    return path


def _with_captions(rec: dict, kept: list[str]) -> dict:
    """The record with ``kept`` as its captions, and what indexes its captions re-indexed to match:
    ``captions_grounding`` (a synthetic caption has no spans: []) and each negative's ``source``
    (a negative whose source caption was dropped goes with it)."""
    originals = rec.get("captions") or [rec["caption"]]
    row = {**rec, "caption": kept[0], "captions": kept}
    table = rec.get("captions_grounding")
    if isinstance(table, list) and len(table) == len(originals):
        row["captions_grounding"] = [table[originals.index(c)] if c in originals else [] for c in kept]
    else:
        row.pop("captions_grounding", None)
    if rec.get("negatives"):
        negatives = []
        for n in rec["negatives"]:
            source = n.get("source") if isinstance(n, dict) else None
            if _is_index(source):
                if not 0 <= source < len(originals) or originals[source] not in kept:
                    continue
                n = {**n, "source": kept.index(originals[source])}
            negatives.append(n)
        row["negatives"] = negatives
    return row


def capfilt(data: str | Path, captioner: str | Path, filter: str | Path, out: str | Path,
            samples: int = 1, top_p: float = 0.9, threshold: float = 0.5, max_new_tokens: int = 30,
            batch_size: int = 32, seed: int = 0) -> dict:
    """Write the bootstrapped dataset to ``out`` and return the report (see the module doc)."""
    from ..pipeline import load
    data, out = Path(data), Path(out)
    if not (data / "train.jsonl").is_file():
        raise ValueError(f"{data}: no train.jsonl (a dataset folder)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty")
    if samples < 1 or not 0 < top_p <= 1 or not 0 <= threshold <= 1:
        raise ValueError("capfilt: samples >= 1, top_p in (0, 1] and threshold in [0, 1]")
    cap, filt = load(captioner), load(filter)
    if not hasattr(cap.model, "generate"):
        raise ValueError(f"--captioner {captioner}: a {cap.model.model_name} cannot caption")
    if not hasattr(filt.model, "match"):
        raise ValueError(f"--filter {filter}: a {filt.model.model_name} has no ITM head")
    generator = torch.Generator().manual_seed(seed)
    records = _read(data, "train")
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = dict(records=len(records), records_kept=0, original_kept=0, original_dropped=0,
                  synthetic_kept=0, synthetic_dropped=0)
    kept_rows, details = [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        paths = [_image(data, r, f"{data}/train.jsonl line {start + i + 1}") for i, r in enumerate(chunk)]
        synthetic = cap.caption([str(p) for p in paths], do_sample=True, top_p=top_p, max_new_tokens=max_new_tokens,
                                num_return_sequences=samples, generator=generator)
        for i, (rec, path) in enumerate(zip(chunk, paths)):
            texts = [(c, "original") for c in (rec.get("captions") or [rec["caption"]])]
            texts += [(c, "synthetic") for c in synthetic[i * samples:(i + 1) * samples] if c.strip()]
            probs = filt.match([str(path)] * len(texts), [t for t, _ in texts]).tolist()
            verdicts = [dict(caption=t, source=s, p_match=round(p, 4), kept=p > threshold)
                        for (t, s), p in zip(texts, probs)]
            for v in verdicts:
                counts[f"{v['source']}_{'kept' if v['kept'] else 'dropped'}"] += 1
            details.append({"image": rec["image"], "captions": verdicts})
            kept = list(dict.fromkeys(v["caption"] for v in verdicts if v["kept"]))
            if kept:
                counts["records_kept"] += 1
                kept_rows.append(_with_captions(rec, kept))
    for split in ("train", "val", "test"):
        rows = kept_rows if split == "train" else _read(data, split)
        if split != "train" and not (data / f"{split}.jsonl").is_file():
            continue
        for row in rows:
            src = _image(data, row, f"{data}/{split}.jsonl")
            dst = out / src.relative_to(data.resolve())
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = dict(counts, data=str(data), captioner=str(captioner), filter=str(filter), samples=samples,
                  top_p=top_p, threshold=threshold, seed=seed)
    (out / "capfilt.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "capfilt.jsonl").write_text("".join(json.dumps(d) + "\n" for d in details), encoding="utf-8")
    return report
