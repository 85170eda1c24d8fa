"""Run folders and checkpoints: safetensors + JSON, written atomically, verified on load.

A run folder holds ``config.json`` (model name + config), ``model.safetensors`` (the latest
weights), ``metrics.jsonl`` and ``checkpoints/step-XXXXXXXX/`` folders with the full training
state: ``model.safetensors``, ``optimizer.safetensors`` (tensors), ``state.json`` (everything
else: step, data position, scheduler, RNG states) and ``manifest.json`` (SHA-256 of each file),
written last. A checkpoint folder is built under a temporary name and renamed into place, so a
crash never leaves a half-written checkpoint under a real name; one whose files do not match
their manifest is reported and the previous one is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class WeightsError(ValueError):
    """A weights file that cannot be used: unreadable, corrupt (its checksum does not match) or
    holding NaN or infinite values. The message names the file (and the tensor)."""


CHECKSUM_KEY = "vlkit_sha256"  # safetensors metadata: the digest of the weights' names and bytes


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def nonfinite(tensors: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(name, non-finite count, size) of the first floating-point tensor holding NaN or
    infinite values, in name order; None when all are finite."""
    for k in sorted(tensors):
        t = tensors[k]
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                return k, bad, t.numel()
    return None


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise a `WeightsError` naming ``source`` and the first tensor with NaN or inf values."""
    found = nonfinite(tensors)
    if found is not None:
        name, bad, n = found
        raise WeightsError(f"{source}: tensor {name} holds {bad} NaN or infinite value(s) of {n} "
                           "(diverged or corrupt weights); refusing to use them")


def read_weights(path: str | Path, check: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is missing, empty, truncated or not
    safetensors, whose checksum (written by `save_weights`) does not match, or (``check``)
    that holds NaN or infinite values, is a `WeightsError` naming it."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file (0 bytes), not safetensors weights")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own and several builtin errors
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt: "
                           f"{detail})") from None
    digest = metadata.get(CHECKSUM_KEY)
    if digest is not None and tensors_digest(tensors) != digest:
        raise WeightsError(f"{path}: the weights do not match the checksum written with them "
                           "(the file is corrupt)")
    if check:
        check_finite(tensors, str(path))
    return tensors


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(tmp: Path) -> None:
    """Remove a temporary file or folder left by a failed write (e.g. a full disk)."""
    try:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a folder in the way ...: the old file stays as it was
        _discard(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    fsync_dir(path.parent)


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write model weights atomically, with their checksum in the file's metadata; NaN or
    infinite weights are refused (never exported or checkpointed as a result)."""
    check_finite(tensors, str(path))
    atomic_save_tensors(path, tensors, {CHECKSUM_KEY: tensors_digest(tensors)})


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tensors that share storage (tied weights) cloned, as safetensors needs."""
    state, seen = {}, {}
    for k, v in model.state_dict().items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        state[k] = v.clone() if ptr in seen else v
        seen[ptr] = k
    return state


def save_run_config(run: Path, model_name: str, model_config: dict, extra: dict | None = None) -> None:
    from ._version import __version__
    obj = {"model": model_name, "config": model_config, "vlkit_version": __version__}
    obj.update(extra or {})
    atomic_write_json(run / CONFIG, obj)


def read_run_config(run: str | Path) -> dict:
    path = Path(run) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {CONFIG} (not a vlkit run folder)")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if "model" not in obj or "config" not in obj:
        raise ValueError(f"{path}: not a vlkit run config (needs 'model' and 'config')")
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- optimizer state <-> (tensors, json) ------------------------------------------------------

def _split_state(obj, prefix: str, tensors: dict):
    """Replace tensors inside a nested structure by {"__tensor__": key} references."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split_state(k, f"{prefix}.k{i}", tensors),
                              _split_state(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.copy())
        return {"__ndarray__": prefix}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def _join_state(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_join_state(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_join_state(k, tensors): _join_state(v, tensors) for k, v in obj["__dict__"]}
        return {k: _join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1], int(np_state[2]), int(np_state[3]), float(np_state[4])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- checkpoints ------------------------------------------------------------------------------

def checkpoint_dirs(run: str | Path) -> list[Path]:
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def save_checkpoint(run: str | Path, step: int, model: torch.nn.Module, optimizer, state: dict,
                    keep_last: int = 3, model_tensors: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically (temporary folder, fsync, rename) and prune old ones.

    ``model_tensors`` / ``optimizer_state`` replace ``model_state(model)`` and
    ``optimizer.state_dict()`` (e.g. full state dicts gathered from sharded parameters).
    A ``state["rng_ranks"]`` list holds one RNG state per rank of a distributed run."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:  # a failed write (a full disk, NaN weights) leaves no temporary folder and no new checkpoint
        tensors: dict[str, torch.Tensor] = {}
        full_state = dict(state)
        full_state["optimizer"] = _split_state(optimizer.state_dict() if optimizer_state is None
                                               else optimizer_state, "opt", tensors)
        full_state["rng"] = _split_state(rng_state(), "rng", tensors)
        if "rng_ranks" in full_state:
            full_state["rng_ranks"] = _split_state(full_state["rng_ranks"], "rngr", tensors)
        save_weights(tmp / WEIGHTS, model_state(model) if model_tensors is None else model_tensors)
        atomic_save_tensors(tmp / "optimizer.safetensors", tensors)
        atomic_write_json(tmp / "state.json", full_state)
        manifest = {name: _sha256(tmp / name) for name in (WEIGHTS, "optimizer.safetensors", "state.json")}
        atomic_write_json(tmp / "manifest.json", manifest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        _discard(tmp)
        raise
    fsync_dir(root)
    for old in checkpoint_dirs(run)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest.json is corrupt"
    for name, digest in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest whole checkpoint; torn or corrupt newer ones are skipped with a warning."""
    for path in reversed(checkpoint_dirs(run)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is unusable ({problem}); trying the previous one",
                      stacklevel=2)
    return None


def read_checkpoint(path: Path, rank: int = 0) -> tuple[dict, dict, dict]:
    """(model tensors, optimizer state, rest of the state) of a checkpoint; sets this process's
    RNG state (rank ``rank``'s own where the checkpoint has one per rank)."""
    weights = read_weights(path / WEIGHTS)
    tensors = load_file(str(path / "optimizer.safetensors"))
    state = json.loads((path / "state.json").read_text())
    optim = _join_state(state.pop("optimizer"), tensors)
    rng = _join_state(state.pop("rng"), tensors)
    per_rank = _join_state(state.pop("rng_ranks", None), tensors)
    if per_rank is not None and rank < len(per_rank):
        rng = per_rank[rank]
    set_rng_state(rng)
    if rank > 0 and (per_rank is None or rank >= len(per_rank)):
        # a run resumed on more ranks than it had: derive a distinct stream for this rank
        random.seed(random.random() + rank)
        np.random.seed((int(np.random.randint(2**31)) + rank) % 2**32)
        torch.manual_seed(int(torch.randint(2**62, ())) + rank)
    return weights, optim, state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, rank: int = 0) -> dict:
    """Restore model, optimizer and RNG states; returns the rest of the saved state."""
    weights, optim, state = read_checkpoint(path, rank)
    model.load_state_dict(weights, strict=True)
    optimizer.load_state_dict(optim)
    return state
