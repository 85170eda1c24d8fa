"""A searchable image index: every image under some folders embedded by a dual encoder (CLIP,
ALBEF's or BLIP's ITC, VLMo), searched by text with an exact inner product.

An index is a folder::

    manifest.json        what is in it (written last, atomically: the commit point)
    chunks/000000.npy    (n, D) float32 image embeddings, L2-normalised
    chunks/000000.json   the n images: [root number, path relative to that root]

``manifest.json`` names the model (its source folder and a SHA-256 fingerprint of its weights),
the embedding width, the indexed folders' absolute roots, the chunks and the files that could
not be read. Images are embedded in batches and committed a chunk at a time, so a stopped run
continues after its last chunk; an image already in the index is never embedded again. Adding
to, or searching, an index with a model whose weights differ is refused.

Search is exact: NumPy's inner product, or faiss's flat inner-product index when ``faiss`` is
installed (``pip install 'vlkit[faiss]'``), with the same results.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
CHUNKS = "chunks"
FORMAT = "vlkit-image-index"
VERSION = 1
SHOWN_SKIPPED = 20  # unreadable files listed in the command's output (all are in the manifest)


class IndexMismatch(ValueError):
    """An index used with a model other than the one that built it."""


# ---- the model ------------------------------------------------------------------------------

def check_dual_encoder(pipe) -> None:
    """A ValueError unless ``pipe`` embeds both images and texts into one space."""
    model = pipe.model
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise ValueError(f"{pipe.source}: {model.model_name} does not embed images and texts into one "
                         "space; an image index needs a dual encoder (clip, albef, vlmo, blip)")
    if pipe.tokenizer is None or pipe.transform is None:
        raise ValueError(f"{pipe.source}: the model has no tokenizer or image transform")


def fingerprint(pipe) -> str:
    """SHA-256 of the model's weights (names, dtypes, shapes and bytes)."""
    from .checkpoint import tensors_digest
    return tensors_digest(pipe.model.state_dict())


def model_record(pipe) -> dict:
    return {"source": str(Path(pipe.source).resolve()), "name": pipe.model.model_name,
            "fingerprint": fingerprint(pipe)}


def check_model(manifest: dict, record: dict, where: str) -> None:
    """An `IndexMismatch` when ``record`` (`model_record`) has other weights than the index's."""
    built = manifest["model"]
    if record["fingerprint"] != built["fingerprint"]:
        raise IndexMismatch(f"{where} was built with {built['name']} from {built['source']} (weights "
                            f"{built['fingerprint'][:12]}); {record['source']} has other weights "
                            f"({record['fingerprint'][:12]}): use the index's model, or build a new index")


# ---- files ----------------------------------------------------------------------------------

def walk_folder(root: Path, exclude: Path | None = None) -> list[str]:
    """Every regular file (or link to one) under ``root``, as sorted POSIX paths relative to it;
    hidden files and folders, links to folders and ``exclude`` (the index itself) are left out."""
    found = []
    exclude = exclude.resolve() if exclude is not None else None
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and (here / d).resolve() != exclude]
        for name in files:
            if not name.startswith(".") and (here / name).is_file():
                found.append((here / name).relative_to(root).as_posix())
    return sorted(found)


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, links resolved, lies within ``root`` (links resolved)."""
    return path.resolve().is_relative_to(root.resolve())


def read_image(root: Path, rel: str):
    """The image at ``root / rel`` as RGB, or a ValueError naming it (not an image, corrupt,
    too many pixels, or a link that leads out of ``root``)."""
    from .data.transforms import load_image
    path = root / rel
    if not inside(path, root):
        raise ValueError(f"{path}: a link that leads out of {root}")
    return load_image(path)


# ---- the index on disk ----------------------------------------------------------------------

def _atomic_npy(path: Path, array: np.ndarray) -> None:
    from .checkpoint import atomic_write_bytes
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (not a vlkit image index; build one with vlkit index)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vlkit image index manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: index format version {manifest.get('version')!r}; this vlkit reads {VERSION}")
    for key in ("model", "dim", "roots", "chunks", "skipped"):
        if key not in manifest:
            raise ValueError(f"{path}: no {key!r} field")
    return manifest


@dataclass
class ImageIndex:
    folder: Path
    manifest: dict
    embeddings: np.ndarray            # (N, D) float32
    entries: list[tuple[int, str]]    # (root number, relative path) of each row
    _faiss: object = field(default=None, repr=False)

    @property
    def roots(self) -> list[Path]:
        return [Path(r) for r in self.manifest["roots"]]

    def __len__(self) -> int:
        return len(self.entries)

    def path(self, i: int) -> Path:
        root, rel = self.entries[i]
        return self.roots[root] / rel

    def search(self, query: np.ndarray, k: int, backend: str = "auto") -> list[tuple[int, float]]:
        """The ``k`` rows with the largest inner product with ``query`` (D,): [(row, score)],
        best first (ties by row). ``backend``: "numpy", "faiss" or "auto" (faiss when installed)."""
        if backend not in ("auto", "numpy", "faiss"):
            raise ValueError(f"search backend must be auto, numpy or faiss, got {backend!r}")
        if len(self) == 0:
            raise ValueError(f"{self.folder}: the index holds no images")
        k = min(k, len(self))
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if backend == "faiss" or (backend == "auto" and faiss_available()):
            rows, scores = self._search_faiss(query, k)
        else:
            rows, scores = _search_numpy(self.embeddings, query[0], k)
        order = np.lexsort((rows, -scores))
        return [(int(rows[i]), float(scores[i])) for i in order]

    def _search_faiss(self, query: np.ndarray, k: int):
        import faiss
        if self._faiss is None:
            flat = faiss.IndexFlatIP(self.embeddings.shape[1])
            flat.add(self.embeddings)
            self._faiss = flat
        scores, rows = self._faiss.search(query, k)
        return rows[0], scores[0]


def _search_numpy(embeddings: np.ndarray, query: np.ndarray, k: int):
    scores = embeddings @ query  # (N,)
    rows = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return rows, scores[rows]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def open_index(folder: str | Path) -> ImageIndex:
    """An index folder read back: its chunks' embeddings stacked and their images' paths; a
    missing or malformed chunk is a ValueError naming the file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    dim = int(manifest["dim"])
    arrays, entries = [], []
    for chunk in manifest["chunks"]:
        emb_path, paths_path = folder / chunk["embeddings"], folder / chunk["paths"]
        try:
            emb = np.load(emb_path, allow_pickle=False)
            paths = json.loads(paths_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}: chunk {chunk['embeddings']} cannot be read ({e})") from None
        if emb.dtype != np.float32 or emb.shape != (chunk["count"], dim) or len(paths) != chunk["count"]:
            raise ValueError(f"{emb_path}: holds {emb.shape} {emb.dtype} embeddings and {len(paths)} paths; "
                             f"the manifest says {chunk['count']} of width {dim} (float32)")
        if not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and 0 <= e[0] < len(manifest["roots"])
                   and isinstance(e[1], str) for e in paths):
            raise ValueError(f"{paths_path}: each entry must be [root number, relative path]")
        arrays.append(emb)
        entries.extend((r, p) for r, p in paths)
    embeddings = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
    return ImageIndex(folder, manifest, embeddings, entries)


# ---- building -------------------------------------------------------------------------------

def _new_manifest(record: dict, dim: int) -> dict:
    from ._version import __version__
    return {"format": FORMAT, "version": VERSION, "vlkit_version": __version__, "model": record,
            "dim": dim, "roots": [], "count": 0, "chunks": [], "skipped": []}


def _check_out(out: Path) -> None:
    from .train.runfolder import check_output_path
    check_output_path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not an index folder")
    if out.is_dir() and not (out / MANIFEST).is_file() \
            and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ValueError(f"--out {out}: a folder that is not a vlkit image index (no {MANIFEST}); "
                         "give a new folder or an existing index")


class _Writer:
    """Commits embedded images a chunk at a time: the chunk's two files, then the manifest."""

    def __init__(self, out: Path, manifest: dict):
        self.out, self.manifest = out, manifest
        self.rows: list[np.ndarray] = []
        self.entries: list[list] = []

    def add(self, emb: np.ndarray, entries: list[tuple[int, str]]) -> None:
        self.rows.append(emb)
        self.entries.extend([r, p] for r, p in entries)

    def pending(self) -> int:
        return len(self.entries)

    def commit(self) -> None:
        from .checkpoint import atomic_write_bytes, atomic_write_json
        if self.entries:
            name = f"{CHUNKS}/{len(self.manifest['chunks']):06d}"
            (self.out / CHUNKS).mkdir(parents=True, exist_ok=True)
            _atomic_npy(self.out / f"{name}.npy", np.concatenate(self.rows))
            atomic_write_bytes(self.out / f"{name}.json", json.dumps(self.entries).encode())
            self.manifest["chunks"].append({"embeddings": f"{name}.npy", "paths": f"{name}.json",
                                            "count": len(self.entries)})
            self.manifest["count"] += len(self.entries)
            self.rows, self.entries = [], []
        atomic_write_json(self.out / MANIFEST, self.manifest)


def _progress(total: int, show: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="index", unit="img", mininterval=1.0, dynamic_ncols=True, file=sys.stderr,
                disable=not show or bool(os.environ.get("VLKIT_NO_PROGRESS")))


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_index(pipe, folders, out: str | Path, batch_size: int = 32, chunk_size: int = 1024,
                progress: bool = True) -> dict:
    """Embed the images under ``folders`` that ``out`` does not hold yet and add them to it
    (a new index when ``out`` has none). Unreadable files are skipped and listed (in the
    manifest: all of the index's; in the result: those under ``folders``). Returns
    {"added", "already", "count", "skipped": [{"path", "error"}], "seconds", "roots"}."""
    from .train.runfolder import run_lock
    start = time.time()
    out = Path(out)
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch size and chunk size must be at least 1, got {batch_size} and {chunk_size}")
    roots = [_checked_folder(f) for f in folders]
    if not roots:
        raise ValueError("give at least one folder of images to index")
    check_dual_encoder(pipe)
    _check_out(out)
    record = model_record(pipe)
    with run_lock(out):
        if (out / MANIFEST).is_file():
            manifest = read_manifest(out)
            check_model(manifest, record, str(out))
            done = set(open_index(out).entries)
        else:
            manifest, done = _new_manifest(record, 0), set()
        numbers = _root_numbers(manifest, roots)
        manifest["skipped"] = [s for s in manifest["skipped"] if s["root"] not in numbers.values()]
        todo = [(numbers[r], rel) for r in roots for rel in walk_folder(r, exclude=out)]
        todo = [e for e in dict.fromkeys(todo) if e not in done]
        writer = _Writer(out, manifest)
        chunk_size = max(chunk_size // batch_size, 1) * batch_size
        try:
            skipped = _embed_all(pipe, todo, writer, batch_size, chunk_size, progress)
        except KeyboardInterrupt:  # keep what was embedded: a run started again goes on from there
            writer.commit()
            raise
        writer.commit()
    found = [{"path": str(Path(manifest["roots"][s["root"]]) / s["path"]), "error": s["error"]}
             for s in manifest["skipped"] if s["root"] in numbers.values()]
    return {"added": len(todo) - skipped, "already": len(done), "count": manifest["count"],
            "skipped": found, "seconds": time.time() - start, "roots": [str(r) for r in roots]}


def _checked_folder(folder) -> Path:
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not path.is_dir():
        raise ValueError(f"{folder}: not a folder (vlkit index takes folders of images)")
    return path.resolve()


def _root_numbers(manifest: dict, roots: list[Path]) -> dict[Path, int]:
    """Each root's number in the manifest's list of roots (new ones appended)."""
    numbers = {}
    for root in roots:
        if str(root) not in manifest["roots"]:
            manifest["roots"].append(str(root))
        numbers[root] = manifest["roots"].index(str(root))
    return numbers


def _embed_all(pipe, todo: list[tuple[int, str]], writer: _Writer, batch_size: int, chunk_size: int,
               progress: bool) -> int:
    """Embed ``todo`` in batches into ``writer``, committing every ``chunk_size`` images;
    unreadable files go to the manifest's skipped list. Returns how many were skipped."""
    roots = [Path(r) for r in writer.manifest["roots"]]
    skipped = 0
    bar = _progress(len(todo), progress)
    try:
        for batch in _batches(todo, batch_size):
            images, entries = [], []
            for root, rel in batch:
                try:
                    images.append(read_image(roots[root], rel))
                    entries.append((root, rel))
                except ValueError as e:
                    writer.manifest["skipped"].append({"root": root, "path": rel, "error": str(e)})
                    skipped += 1
            if images:
                emb = pipe.embed_images(images).cpu().numpy().astype(np.float32)  # (b, D)
                _check_width(writer.manifest, emb.shape[1])
                writer.add(emb, entries)
            if writer.pending() >= chunk_size:
                writer.commit()
            bar.update(len(batch))
    finally:
        bar.close()
    return skipped


def _check_width(manifest: dict, dim: int) -> None:
    if manifest["dim"] == 0:
        manifest["dim"] = dim
    elif manifest["dim"] != dim:
        raise IndexMismatch(f"the model embeds into {dim} dimensions; the index holds {manifest['dim']}")


def index_folders(model: str | Path, folders, out: str | Path, batch_size: int = 32,
                  progress: bool = True) -> dict:
    """``vlkit index``: load ``model`` and `build_index`."""
    from .pipeline import load
    return build_index(load(model), folders, out, batch_size=batch_size, progress=progress)


def report_lines(report: dict, out: str | Path) -> list[str]:
    """The summary ``vlkit index`` prints."""
    lines = [f"indexed {report['added']} new images in {report['seconds']:.1f} s; {out} holds "
             f"{report['count']} ({report['already']} were there before)"]
    skipped = report["skipped"]
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''} "
                     f"(all listed in {Path(out) / MANIFEST}):")
        lines += [f"  {s['error']}" for s in skipped[:SHOWN_SKIPPED]]
        if len(skipped) > SHOWN_SKIPPED:
            lines.append(f"  ... and {len(skipped) - SHOWN_SKIPPED} more")
    return lines


# ---- searching ------------------------------------------------------------------------------

def search_index(index: ImageIndex, pipe, query: str, k: int = 10, backend: str = "auto") -> list[dict]:
    """The ``k`` images of ``index`` nearest to the text ``query``: [{"rank", "score", "path",
    "root", "rel"}], best first."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the search text is empty")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(index) == 0:
        raise ValueError(f"{index.folder}: the index holds no images")
    q = pipe.embed_texts([query])[0].cpu().numpy()  # (D,)
    if q.shape[0] != index.embeddings.shape[1]:
        raise IndexMismatch(f"the model embeds into {q.shape[0]} dimensions; {index.folder} holds "
                            f"{index.embeddings.shape[1]}")
    results = []
    for rank, (row, score) in enumerate(index.search(q, k, backend), start=1):
        root, rel = index.entries[row]
        results.append({"rank": rank, "score": score, "path": str(index.path(row)), "root": root, "rel": rel})
    return results


def load_for_index(index: ImageIndex, model: str | Path | None = None):
    """The pipeline to search ``index`` with: ``model``, else the one that built it; its
    weights must be the index's."""
    from .pipeline import load
    source = model if model is not None else index.manifest["model"]["source"]
    if model is None and not Path(source).is_dir():
        raise FileNotFoundError(f"{index.folder} was built with {source}, which is not there; give --model")
    pipe = load(source)
    check_dual_encoder(pipe)
    check_model(index.manifest, model_record(pipe), str(index.folder))
    return pipe


def search_command(index: str | Path, query: str, k: int = 10, model: str | Path | None = None) -> dict:
    """``vlkit search``: {"index", "query", "model", "backend", "results"}."""
    idx = open_index(index)
    pipe = load_for_index(idx, model)
    backend = "faiss" if faiss_available() else "numpy"
    results = search_index(idx, pipe, query, k, backend)
    return {"index": str(index), "query": query, "model": pipe.source, "backend": backend,
            "results": [{"rank": r["rank"], "score": r["score"], "path": r["path"]} for r in results]}


def print_results(res: dict, file=None) -> None:
    file = file or sys.stdout
    print(f"{'rank':>4s}  {'score':>7s}  path", file=file)
    for r in res["results"]:
        print(f"{r['rank']:4d}  {r['score']:7.4f}  {r['path']}", file=file)


__all__ = ["ImageIndex", "IndexMismatch", "build_index", "index_folders", "open_index", "search_index",
           "search_command", "load_for_index", "walk_folder", "read_image", "inside", "faiss_available"]
