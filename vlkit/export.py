"""ONNX export of the image and text towers of the dual encoders (CLIP, VLMo in dual mode) and of
ViT: ``OUT/image.onnx``, ``OUT/text.onnx`` (not for ViT), ``OUT/onnx.json`` (inputs, outputs,
preprocessing) and ``OUT/tokenizer/``.

Each tower is traced with ``torch.onnx.export(dynamo=True)`` (``torch.export`` then ONNX
Script; the path torch >= 2.9 takes by default) with a dynamic batch size, and, for the text
towers, a dynamic sequence length from 1 up to the model's maximum (its position embeddings):
pad a batch to its longest text, or to the maximum, as you like. Image inputs are normalised
pixels (B, 3, S, S) as the pipeline's transform makes them. The text wrapper computes what
``encode_text`` computes without its shortcuts that read lengths off the data (running only
the positions that decide the output): the whole padded sequence under its padding mask, then
the end-of-text token. After writing, each file is run with ``onnxruntime`` at two batch sizes
(and two text lengths) and compared with the PyTorch model's own ``encode_image`` /
``encode_text`` (ViT: pooled feature and logits); a difference over ``TOLERANCE`` is an error.
The folder is built beside ``OUT`` and renamed into place when whole.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .layers import padding_mask

TOLERANCE = 1e-4
MIN_OPSET = 18  # the torch.export-based exporter's oldest
EXTERNAL_DATA_BYTES = 1_500_000_000  # ONNX protobufs stop at 2 GB: larger weights go beside the file


class ExportError(ValueError):
    """A model or output that cannot be exported."""


class ImageTower(nn.Module):
    """pixel_values (B, 3, S, S) -> the model's normalised image embedding (B, E)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode_image(pixel_values)


class CLIPTextTower(nn.Module):
    """(input_ids, attention_mask) (B, L) -> CLIP's normalised text embedding (B, E)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        text, cfg = self.model.text, self.model.cfg.text
        x = text.embed(input_ids)  # (B, L, D)
        x = text.norm(text.encoder(x, mask=padding_mask(attention_mask), causal=cfg.causal))
        if cfg.eot_token_id is None:  # the largest id ends the text (original CLIP vocabulary)
            index = input_ids.argmax(dim=-1)
        else:
            index = (input_ids == cfg.eot_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), index]  # (B, D)
        return F.normalize(self.model.text_proj(pooled), dim=-1)


class TextTower(nn.Module):
    """(input_ids, attention_mask) -> ``encode_text`` (VLMo's dual-mode text pass)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.encode_text(input_ids, attention_mask)


class ViTTower(nn.Module):
    """pixel_values -> (pooled feature (B, D), class logits (B, C) when the ViT has a head)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values)
        return (out.pooled, out.logits) if out.logits is not None else (out.pooled,)


def _vit_reference(model, pixel_values):
    out = model(pixel_values)
    return [out.pooled] + ([out.logits] if out.logits is not None else [])


def towers(model) -> dict:
    """{file name: spec} of the towers exported for ``model``: the wrapper, its input and output
    names, and the PyTorch call its outputs are checked against."""
    name = model.model_name
    image = dict(inputs=["pixel_values"], reference=lambda px: [model.encode_image(px)])
    text = dict(inputs=["input_ids", "attention_mask"], outputs=["text_embeds"],
                reference=lambda ids, mask: [model.encode_text(ids, mask)])
    if name == "clip":
        return {"image.onnx": dict(image, module=ImageTower(model).eval(), outputs=["image_embeds"]),
                "text.onnx": dict(text, module=CLIPTextTower(model).eval())}
    if name == "vlmo":
        return {"image.onnx": dict(image, module=ImageTower(model).eval(), outputs=["image_embeds"]),
                "text.onnx": dict(text, module=TextTower(model).eval())}
    if name == "vit":
        outputs = ["pooled"] + (["logits"] if model.head is not None else [])
        return {"image.onnx": dict(inputs=["pixel_values"], outputs=outputs, module=ViTTower(model).eval(),
                                   reference=lambda px: _vit_reference(model, px))}
    raise ExportError(f"ONNX export covers the image and text towers of clip, vlmo and vit, not {name}")


def max_text_length(model) -> int:
    cfg = model.cfg
    return cfg.text.context_length if hasattr(cfg, "text") else cfg.max_text_len


def _inputs(model, names: list[str], batch: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Example inputs: random pixels; token ids with an end-of-text token and padding after it
    in the last row (ids drawn below the end token's, which for original CLIP is the largest)."""
    g = torch.Generator().manual_seed(seed)
    if names == ["pixel_values"]:
        size = model.image_spec()["size"]
        return (torch.randn(batch, 3, size, size, generator=g),)
    vocab = model.cfg.text.vocab_size if hasattr(model.cfg, "text") else model.cfg.vocab_size
    eot = getattr(getattr(model.cfg, "text", None), "eot_token_id", 0)
    end = vocab - 1 if eot is None else eot
    ids = torch.randint(1, vocab - 1, (batch, length), generator=g)
    ids[ids == end] = 1
    mask = torch.ones(batch, length, dtype=torch.long)
    ends = [length - 1] * (batch - 1) + [max(1, length // 2)]
    for row, e in enumerate(ends):
        ids[row, e] = end
        ids[row, e + 1:] = 0
        mask[row, e + 1:] = 0
    return ids, mask


def _dynamic(names: list[str], max_len: int) -> dict:
    batch = torch.export.Dim("batch", min=1, max=4096)
    if names == ["pixel_values"]:
        return {"pixel_values": {0: batch}}
    length = torch.export.Dim("sequence", min=1, max=max_len)
    return {n: {0: batch, 1: length} for n in names}


def _quiet_exporter() -> None:
    """The exporter's notes (e.g. that torchvision's operators are not registered) are not the user's."""
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _export(spec: dict, model, path: Path, opset: int) -> None:
    import contextlib
    import io
    import warnings
    max_len = max_text_length(model) if "input_ids" in spec["inputs"] else 0
    example = _inputs(model, spec["inputs"], 2, min(8, max_len) if max_len else 0, seed=0)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    _quiet_exporter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(spec["module"], example, str(path), input_names=spec["inputs"],
                              output_names=spec["outputs"], dynamic_shapes=_dynamic(spec["inputs"], max_len),
                              opset_version=opset, dynamo=True, external_data=large, verbose=False)
        except Exception as e:  # noqa: BLE001 - torch.export and ONNX Script raise many kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{path.name}: torch.onnx.export failed ({type(e).__name__}: {first})") from e


def check_onnx(spec: dict, model, path: Path) -> tuple[float, dict[str, int]]:
    """The largest |onnxruntime - PyTorch| over two batch sizes (and, for text, two lengths),
    and each output's width."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    max_len = max_text_length(model) if "input_ids" in spec["inputs"] else 0
    worst, widths = 0.0, {}
    for batch, length, seed in ((1, min(5, max_len), 1), (3, max_len, 2)):
        inputs = _inputs(model, spec["inputs"], batch, length, seed)
        got = session.run(spec["outputs"], {n: t.numpy() for n, t in zip(spec["inputs"], inputs)})
        with torch.no_grad():
            want = spec["reference"](*inputs)
        for name, g, w in zip(spec["outputs"], got, want):
            if tuple(g.shape) != tuple(w.shape):
                raise ExportError(f"{path.name}: output {name} has shape {tuple(g.shape)}, PyTorch's {tuple(w.shape)}")
            worst = max(worst, float((torch.from_numpy(g) - w.float()).abs().max()))
            widths[name] = int(g.shape[1])
    if worst > TOLERANCE:
        raise ExportError(f"{path.name}: onnxruntime's outputs differ from PyTorch's by {worst:.2e} "
                          f"(more than {TOLERANCE:g})")
    return worst, widths


def _describe(spec: dict, model, widths: dict[str, int]) -> dict:
    size = model.image_spec()["size"]
    shapes = {"pixel_values": ["batch", 3, size, size], "input_ids": ["batch", "sequence"],
              "attention_mask": ["batch", "sequence"]}
    dtypes = {"pixel_values": "float32", "input_ids": "int64", "attention_mask": "int64"}
    return {"inputs": {n: {"shape": shapes[n], "dtype": dtypes[n]} for n in spec["inputs"]},
            "outputs": {n: {"shape": ["batch", widths[n]], "dtype": "float32"} for n in spec["outputs"]}}


def export_onnx(source: str | Path, out: str | Path, opset: int = 18) -> dict:
    """Export the towers of the run or Hugging Face folder ``source`` to the folder ``out``;
    returns what ``onnx.json`` holds."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                          "pip install 'vlkit[export]'") from None
    import onnx

    from .convert.folders import check_new_folder, new_folder
    from .pipeline import load
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset must be {MIN_OPSET} to {onnx.defs.onnx_opset_version()} (the exporter "
                          f"writes opset {MIN_OPSET} or later), got {opset}")
    check_new_folder(out, "--onnx")
    pipe = load(source)
    model = pipe.model.float().eval()
    specs = towers(model)
    with new_folder(out, "--onnx") as stage:
        files = {}
        for name, spec in specs.items():
            _export(spec, model, stage / name, opset)
            worst, widths = check_onnx(spec, model, stage / name)
            files[name] = {**_describe(spec, model, widths), "max_abs_diff": worst}
        info = {"model": model.model_name, "source": str(Path(source).resolve()), "opset": opset,
                "files": files, "tolerance": TOLERANCE,
                "image": {"size": pipe.transform.size, "mean": pipe.transform.mean, "std": pipe.transform.std}}
        if "text.onnx" in files:
            info["text"] = {"max_length": max_text_length(model),
                            "tokenizer": "tokenizer/" if pipe.tokenizer is not None else None}
            if pipe.tokenizer is not None:
                pipe.tokenizer.save(stage / "tokenizer")
        (stage / "onnx.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
