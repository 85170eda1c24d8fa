"""``vlkit.load(path)``: a model with its tokenizer and image transform, and the high-level calls
(embed, zero-shot, match, retrieve, caption, answer) that the model supports."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .layers import quantize_int8
from .models import build_model
from .checkpoint import WEIGHTS, read_run_config


class Unsupported(NotImplementedError):
    """The model cannot do what was asked (e.g. captioning with CLIP)."""


class Pipeline:
    def __init__(self, model, tokenizer=None, transform=None, source: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.transform = transform
        self.source = source

    def __repr__(self) -> str:
        return f"Pipeline({self.model.model_name}, from {self.source!r})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's floating-point weights; images are fed in it."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Pipeline":
        """Moves the model to ``device`` and/or casts its floating-point weights to ``dtype``.
        ``torch.bfloat16`` halves the memory for inference and, where the CPU or GPU computes
        in bf16 natively, beats bf16 autocast, which casts every weight on every call
        (``benchmarks/clip_speed.py``); outputs (embeddings, probabilities) come back in fp32."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype (e.g. torch.bfloat16), got {dtype}")
        self.model.to(device=device, dtype=dtype)
        return self

    def quantize(self, kind: str = "int8") -> "Pipeline":
        """Int8 inference (``vlkit.layers.quantize_int8``): the linear layers' weights in int8
        with one scale per output channel, their inputs quantized per row on every call, the
        products in int32, which a CPU with VNNI runs at twice the bf16 rate. CLIP ViT-B/32 image
        embedding under ``torch.compile`` on a 2-core AVX-512 CPU: 1.4× the bf16-weights model
        and 1.65× bf16 autocast (``benchmarks/clip_speed.py``). Embeddings stay within a cosine
        of about 1e-3 of the float model's. In place and one-way:
        load again for the float model."""
        if kind != "int8":
            raise ValueError(f"quantize: {kind!r} is not a known kind (int8)")
        quantize_int8(self.model)
        return self

    # -- inputs --------------------------------------------------------------------------------
    def pixels(self, images) -> torch.Tensor:
        """PIL images, paths or arrays -> (B, 3, H, W) on the model's device."""
        if self.transform is None:
            raise Unsupported(f"{self.model.model_name} has no image transform")
        images = _as_list(images, "images")
        return torch.stack([self.transform(img)[0] for img in images]).to(self.device, self.dtype)

    def tokens(self, texts) -> dict:
        """Texts -> {"input_ids", "attention_mask"} (B, L), truncated to what the model takes."""
        from .data.collate import max_text_length
        if self.tokenizer is None:
            raise Unsupported(f"{self.model.model_name} has no tokenizer")
        texts = _as_list(texts, "texts")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__} {t!r:.40}")
        batch = self.tokenizer(list(texts), max_length=max_text_length(self.model.cfg))
        return {k: v.to(self.device) for k, v in batch.items()}

    def _checked(self, scores: torch.Tensor, what: str) -> torch.Tensor:
        """The model's outputs, refused when NaN or infinite (see `metrics.check_scores`)."""
        from .eval.metrics import check_scores
        return check_scores(scores, f"{self.model.model_name} {what}")

    def _need(self, name: str, task: str | None = None):
        if not hasattr(self.model, name):
            raise Unsupported(f"{self.model.model_name} does not support {task or name}")
        return getattr(self.model, name)

    # -- calls ----------------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, images, top_k: int = 1) -> list[list[tuple[str, float]]]:
        """Image classification with the model's own head: [(label, probability)] per image."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"classify: top_k must be a whole number >= 1, got {top_k!r}")
        out = self.model(self.pixels(images))
        if out.logits is None:
            raise Unsupported(f"{self.model.model_name} has no classification head")
        probs = self._checked(out.logits.float(), "class logits").softmax(-1)
        names = getattr(self.model.cfg, "class_names", None) or [str(i) for i in range(probs.shape[1])]
        values, index = probs.topk(min(top_k, probs.shape[1]), dim=-1)
        return [[(names[j], float(p)) for p, j in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, index)]

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        return self._checked(self._need("encode_image")(self.pixels(images)).float(), "image embeddings")

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        t = self.tokens(texts)
        return self._checked(self._need("encode_text")(t["input_ids"], t["attention_mask"]).float(),
                             "text embeddings")

    @torch.no_grad()
    def zero_shot(self, images, labels: Sequence[str], templates: Sequence[str] | None = None):
        """Class probabilities (B, C) over ``labels`` from prompt templates averaged per class."""
        from .eval.zeroshot import class_embeddings
        labels = _as_list(labels, "labels", strings=True)
        if templates is not None:
            templates = _as_list(templates, "templates", strings=True)
            bad = [t for t in templates if "{}" not in t]
            if bad:
                raise ValueError(f"zero_shot: each template needs a {{}} for the label, got {bad[0]!r}")
        classes = class_embeddings(self, labels, templates)
        scale = self.model.logit_scale.exp().clamp(max=100) if hasattr(self.model, "logit_scale") else 100.0
        return (scale * self.embed_images(images) @ classes.T).softmax(-1)

    @torch.no_grad()
    def match(self, images, texts) -> torch.Tensor:
        """Probability that each (image, text) pair matches, from the ITM head (pairs zipped)."""
        fn = self._need("match", "image-text matching")
        images, texts = _zipped(images, texts, "match", "texts")
        t = self.tokens(texts)
        logits = self._checked(fn(self.pixels(images), t["input_ids"], t["attention_mask"]).float(), "ITM logits")
        return logits.softmax(-1)[:, 1]

    @torch.no_grad()
    def retrieve(self, query, candidates, k: int = 5, rerank: int = 0) -> list[tuple[int, float]]:
        """Rank ``candidates`` (texts for an image query, images for a text query) by similarity,
        or, for a fusion model without embeddings, by its pair ``score`` (one pass per pair).
        ``rerank > 0`` (embeddings + ITM head, e.g. ALBEF): the top ``rerank`` by similarity are
        re-scored by ITM log-odds and ranked first (``vlkit.eval.rerank``)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"retrieve: k must be a whole number >= 1, got {k!r}")
        if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0:
            raise ValueError(f"retrieve: rerank must be a whole number >= 0, got {rerank!r}")
        candidates = _as_list(candidates, "candidates", strings=not isinstance(query, str))
        if isinstance(query, str) and not query.strip():
            raise ValueError("retrieve: the query text is empty")
        if rerank > 0:
            from .eval.rerank import rerank_query
            self._need("match", "ITM re-ranking")
            is_text = isinstance(query, str)
            q = self.tokens([query]) if is_text else {"pixel_values": self.pixels([query])}
            c = {"pixel_values": self.pixels(list(candidates))} if is_text else self.tokens(list(candidates))
            scores = self._checked(rerank_query(self.model, is_text, q, c, k=rerank), "retrieval scores")
            values, index = scores.topk(min(k, len(candidates)))
            return list(zip(index.tolist(), values.tolist()))
        if not (hasattr(self.model, "encode_image") and hasattr(self.model, "encode_text")) \
                and hasattr(self.model, "score"):
            candidates = list(candidates)
            if isinstance(query, str):
                images, texts = candidates, [query] * len(candidates)
            else:
                images, texts = [query] * len(candidates), candidates
            t = self.tokens(texts)
            scores = self._checked(self.model.score(self.pixels(images), t["input_ids"],
                                                    t["attention_mask"]).float(), "pair scores")
            values, index = scores.topk(min(k, len(candidates)))
            return list(zip(index.tolist(), values.tolist()))
        if isinstance(query, str):
            q, c = self.embed_texts([query]), self.embed_images(list(candidates))
        else:
            q, c = self.embed_images([query]), self.embed_texts(list(candidates))
        scores = (q @ c.T)[0]
        values, index = scores.topk(min(k, len(candidates)))
        return list(zip(index.tolist(), values.tolist()))

    @torch.no_grad()
    def caption(self, images, prompt: str | Sequence[str] | None = None, rerank: int | None = None,
                **kwargs) -> list[str]:
        """A caption of each image (``kwargs``: the model's ``generate`` options, e.g. num_beams,
        do_sample, top_p). ``prompt``: text the caption continues, one for all images or one per
        image (default: the model's own); the captions are returned without it. ``rerank`` K:
        draw K captions (K beams, or K samples with do_sample) and keep the one the model's
        ``score`` (matching) ranks first. With no decoding asked for (none of rerank, num_beams,
        do_sample), the model's config decides (BLIP's ``caption_rerank``; else greedy)."""
        generate = self._need("generate", "captioning")
        k = self.caption_rerank(rerank, kwargs)
        pixels = self.pixels(images)
        if prompt is not None:
            prompts = [prompt] * pixels.shape[0] if isinstance(prompt, str) else list(prompt)
            if len(prompts) != pixels.shape[0]:
                raise ValueError(f"caption: {len(prompts)} prompts for {pixels.shape[0]} images")
            kwargs["prompt_ids"] = [self.tokenizer.encode(p)[1:-1] for p in prompts]
        if not k:
            return [self.tokenizer.decode(row.tolist()) for row in generate(pixels, **kwargs)]
        score = self._need("score", "caption re-ranking")
        if "num_return_sequences" in kwargs:
            raise ValueError("caption: rerank returns one caption per image; num_return_sequences does not apply")
        if kwargs.get("num_beams", k) != k:
            raise ValueError(f"caption: rerank={k} draws {k} beams; num_beams={kwargs['num_beams']} contradicts it")
        options = dict(kwargs, num_return_sequences=k) if kwargs.get("do_sample") else \
            dict(kwargs, num_beams=k, num_return_sequences=k)
        texts = [self.tokenizer.decode(row.tolist()) for row in generate(pixels, **options)]  # image-major
        scores = []
        for start in range(0, len(texts), 256):  # every candidate with its image
            t = self.tokens(texts[start:start + 256])
            rows = torch.arange(start, min(start + 256, len(texts)), device=pixels.device) // k
            scores.append(self._checked(score(pixels[rows], t["input_ids"], t["attention_mask"]).float(),
                                        "caption scores"))
        best = torch.cat(scores).view(-1, k).argmax(-1).tolist()
        return [texts[i * k + j] for i, j in enumerate(best)]

    def caption_rerank(self, rerank: int | None = None, options: dict | None = None) -> int:
        """How many candidates ``caption`` ranks (0: none) for these arguments: ``rerank`` if
        given, none when a decoding is asked for (num_beams, do_sample), else the config's
        ``caption_rerank``."""
        if rerank is not None:
            if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0:
                raise ValueError(f"caption: rerank must be a whole number >= 0 (0: none), got {rerank!r}")
            return rerank
        if options and ({"num_beams", "do_sample"} & set(options)):
            return 0
        return int(getattr(self.model.cfg, "caption_rerank", 0) or 0)

    @torch.no_grad()
    def answer(self, images, questions, candidates: Sequence[str] | None = None, **kwargs) -> list[str]:
        """The answer to each (image, question) pair (zipped): the model's ``answer``, else the
        best of its ``vqa_logits`` over the config's ``answer_names``. A model that writes its
        answers (BLIP: ``answer_tokens``) generates them (``kwargs``: its generate options), or,
        given ``candidates``, picks the likeliest of them; a classifier picks the best-scoring
        of the ``candidates`` it knows (one outside its answers is an error)."""
        images, questions = _zipped(images, questions, "answer", "questions")
        t = self.tokens(questions)
        if candidates is not None and not hasattr(self.model, "answer_tokens"):
            vqa_logits = self._need("vqa_logits", "question answering")
            candidates = _as_list(candidates, "candidates", strings=True)
            names = list(getattr(self.model.cfg, "answer_names", None) or [])
            unknown = [c for c in candidates if c not in names]
            if unknown:
                raise ValueError(f"candidates: {unknown[0]!r} is not among {self.model.model_name}'s "
                                 f"{len(names)} answers ({', '.join(names[:8])}{' ...' if len(names) > 8 else ''})")
            logits = self._checked(vqa_logits(self.pixels(images), t["input_ids"], t["attention_mask"]),
                                   "VQA logits")
            best = logits[:, [names.index(c) for c in candidates]].argmax(-1).tolist()
            return [candidates[i] for i in best]
        if hasattr(self.model, "answer_tokens"):
            px = self.pixels(images)
            if candidates is not None:
                candidates = _as_list(candidates, "candidates", strings=True)
                c = self.tokens(candidates)
                scores = self.model.answer_scores(px, t["input_ids"], t["attention_mask"], c["input_ids"],
                                                  c["attention_mask"])
                return [candidates[i] for i in self._checked(scores, "answer scores").argmax(-1).tolist()]
            ids = self.model.answer_tokens(px, t["input_ids"], t["attention_mask"], **kwargs)
            return [self.tokenizer.decode(row.tolist()) for row in ids]
        if hasattr(self.model, "answer"):
            return self.model.answer(self.pixels(images), t["input_ids"], t["attention_mask"])
        logits = self._checked(self._need("vqa_logits", "question answering")(
            self.pixels(images), t["input_ids"], t["attention_mask"]), "VQA logits")
        names = list(getattr(self.model.cfg, "answer_names", None) or [])
        best = logits.argmax(-1).tolist()
        return [names[i] if i < len(names) else str(i) for i in best]


def _as_list(items, what: str, strings: bool | None = False) -> list:
    """One item or a sequence of them -> a non-empty list. ``strings``: True, every item must
    be a non-empty string (a bare string is refused: it would be iterated as characters)."""
    from PIL import Image
    if strings and isinstance(items, str):
        raise TypeError(f"{what}: a list of strings, got one string {items!r:.40} "
                        f"(write [{items!r:.40}])")
    if isinstance(items, (str, Path, Image.Image)) or not hasattr(items, "__iter__") \
            or hasattr(items, "shape"):  # one image (a path, PIL image, array) or text
        items = [items]
    items = list(items)
    if not items:
        raise ValueError(f"no {what} given (an empty list)")
    if strings:
        for x in items:
            if not isinstance(x, str) or not x.strip():
                raise ValueError(f"{what}: each must be a non-empty string, got {x!r:.40}")
    return items


def _zipped(images, texts, call: str, what: str) -> tuple[list, list]:
    """Pairs zipped: the same number of images and texts (one image or text goes with all)."""
    images, texts = _as_list(images, "images"), _as_list(texts, what)
    if len(images) == 1 and len(texts) > 1:
        images = images * len(texts)
    elif len(texts) == 1 and len(images) > 1:
        texts = texts * len(images)
    if len(images) != len(texts):
        raise ValueError(f"{call}: {len(images)} images and {len(texts)} {what}; pairs are zipped, "
                         "so give as many of each (or one of either)")
    return images, texts


def image_transform(model, overrides: dict | None = None):
    from .data.transforms import ImageTransform
    spec = model.image_spec()
    spec.update(overrides or {})
    return ImageTransform(spec["size"], mean=tuple(spec["mean"]), std=tuple(spec["std"]))


# weight names from before the compositional objectives moved into vlkit/objectives/
RENAMED_KEYS = (("geometry_head.", "relation_grounding.geometry_head."),
                ("forcing_steps_done", "attention_forcing.steps_done"))


def upgrade_keys(state: dict, expected) -> dict:
    """``state`` with the weight names of earlier vlkit versions renamed to those the model
    expects (``RENAMED_KEYS``); ALBEF's attention forcing, which read the model's own step
    count, gets that count as its clock. Names the model expects as they are stay."""
    expected = set(expected)
    for old, new in RENAMED_KEYS:
        for key in [k for k in state if k.startswith(old) and k not in expected]:
            renamed = new + key[len(old):]
            if renamed in expected and renamed not in state:
                state[renamed] = state.pop(key)
    clock = "attention_forcing.steps_done"
    if clock in expected and clock not in state and "steps_done" in state:
        state[clock] = state["steps_done"].clone()
    return state


def load_weights(model, path: Path) -> None:
    """Weights from a vlkit safetensors file: an unreadable or corrupt file (checksum), NaN or
    infinite values, or keys and shapes that do not fit are errors naming the file."""
    from .checkpoint import read_weights
    from .convert.common import load_strict
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {WEIGHTS}")
    state = upgrade_keys(read_weights(path, check=False), model.state_dict())
    load_strict(model, state, str(path))


def load(path: str | Path, device: str | torch.device | None = None) -> Pipeline:
    """A pipeline from a vlkit run folder or a Hugging Face model folder."""
    from .convert.common import read_hf_config
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    raw = read_hf_config(path)
    if "model" in raw and "config" in raw:
        model = build_saved_model(path, read_run_config(path))
        load_weights(model, path / WEIGHTS)
        tokenizer = _tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else None
        transform = image_transform(model)
    elif "model_type" in raw:
        from .convert import load_hf
        model, tokenizer, transform_overrides = load_hf(path, raw)
        transform = image_transform(model, transform_overrides)
    else:
        raise ValueError(f"{path / 'config.json'}: neither a vlkit run nor a Hugging Face model config")
    pipe = Pipeline(model, tokenizer, transform, str(path))
    return pipe.to(device) if device is not None else pipe


def build_saved_model(run: str | Path, saved: dict):
    """The model a run folder's config (``read_run_config``) describes; a config that does not
    build one (a field of the wrong type, null, a size no layer takes) is a ValueError naming
    the file and the field."""
    source = Path(run) / "config.json"
    if not isinstance(saved.get("model"), str) or not isinstance(saved.get("config"), dict):
        raise ValueError(f"{source}: \"model\" must be a model name and \"config\" an object")
    try:
        return build_model(saved["model"], saved["config"])
    except (ValueError, RuntimeError) as e:  # torch refuses impossible sizes with a RuntimeError
        raise ValueError(f"{source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _tokenizer(folder: Path):
    from .tokenizers import load_tokenizer
    return load_tokenizer(folder)
