"""What an ALBEF run's fusion layers can learn from its frozen towers, on the synthetic world.

Two measurements on a trained ALBEF run (``vlkit train albef ... --out RUN``):

1. Linear probes of the image tower's output tokens (1,500 training images, 80/20 split,
   ridge regression): the row and column of every patch token (R^2), and the colour and the
   shape of each object read from the token under the object's centre (accuracy).
2. Fusion-only training: the image and text towers stay frozen (the run's weights), the fusion
   layers and the ITM head start afresh (``--reinit``) or from the run, and train on ITM with
   one of each training image's dataset negatives paired with the caption it edits
   (``--kinds`` picks the negative kinds) plus a caption of another image. Optionally
   ``--fusion-pos sincos`` (2-D position codes on the image tokens fusion attends to) and
   ``--ground W``: a grounding loss (weight W) that pulls the first fusion layer's
   cross-attention of each colour word, and of the shape word after it, onto the patches
   covered by the object of that colour (colours are unique within an image). Every
   ``--every`` steps it prints the attention mass on the right patches and the compositional
   accuracy by negative kind on the test split (the true caption scored above its negative).
   ``--train-text`` lets the text tower train as well; ``--fusion-layers N`` puts a fresh
   fusion stack of depth N on the run's towers. ``--mlm W`` adds an image-conditioned MLM loss
   on chosen words of the true caption (``--mlm-words relation,color,shape``; half of them
   masked, at least one) and prints the accuracy on relation words; ``--oracle-tokens``
   replaces the tower's tokens by ideal ones (fixed colour and shape codes on each object's
   patches), to tell the tower's part from the fusion layers'.

    python benchmarks/fusion_probe.py RUN --steps 400 --reinit --fusion-pos sincos --ground 1
    python benchmarks/fusion_probe.py RUN --steps 400 --reinit --kinds relation_flip

It runs on one CPU thread by default (``--threads``) so it can share a machine with training.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

import vlkit
from vlkit.data.synthetic import COLORS, SHAPES, SyntheticWorld
from vlkit.models import build_model
from vlkit.models.vit import _init_weights


def ridge(x_train, y_train, x_test, lam=1.0):
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    b = np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
    coef = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y_train)
    return b @ coef


def cell_of(obj, grid):
    return min(int(obj["y"] * grid), grid - 1) * grid + min(int(obj["x"] * grid), grid - 1)


def covered_cells(obj, grid):
    """Row-major indices of the patches the object's bounding square touches."""
    half = obj["extent"] / 2
    r0, r1 = int(max(0.0, obj["y"] - half) * grid), min(grid - 1, int(min(0.999, obj["y"] + half) * grid))
    c0, c1 = int(max(0.0, obj["x"] - half) * grid), min(grid - 1, int(min(0.999, obj["x"] + half) * grid))
    return [r * grid + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def token_probes(pipe, model, world, n=1500):
    recs = [world.sample(i, "train") for i in range(n)]
    with torch.no_grad():
        tokens = torch.cat([model._image(pipe.pixels([r["image"] for r in recs[i:i + 100]]))[0][:, 1:]
                            for i in range(0, n, 100)]).numpy()  # (n, N, D)
    grid = int(round(tokens.shape[1] ** 0.5))
    split = int(0.8 * n)
    # position of every token
    pos = np.stack(np.divmod(np.arange(tokens.shape[1]), grid), 1).astype(float)  # (N, 2) row, col
    x = tokens.reshape(-1, tokens.shape[-1])
    y = np.tile(pos, (n, 1))
    cut = split * tokens.shape[1]
    pred = ridge(x[:cut], y[:cut], x[cut:])
    r2 = 1 - ((pred - y[cut:]) ** 2).sum(0) / ((y[cut:] - y[cut:].mean(0)) ** 2).sum(0)
    out = {"grid": grid, "position_r2_row": round(float(r2[0]), 3), "position_r2_col": round(float(r2[1]), 3)}
    # colour and shape of each object from the token under its centre
    feats, colour, shape, train = [], [], [], []
    for i, r in enumerate(recs):
        for o in r["objects"]:
            feats.append(tokens[i, cell_of(o, grid)])
            colour.append(COLORS.index(o["color"]))
            shape.append(SHAPES.index(o["shape"]))
            train.append(i < split)
    feats, train = np.array(feats), np.array(train)
    for name, labels, k in (("colour", colour, len(COLORS)), ("shape", shape, len(SHAPES))):
        labels = np.array(labels)
        pred = ridge(feats[train], np.eye(k)[labels[train]], feats[~train]).argmax(1)
        out[f"{name}_probe_acc"] = round(float((pred == labels[~train]).mean()), 3)
        out[f"{name}_chance"] = round(float(np.bincount(labels).max() / len(labels)), 3)
    return out


class FusionProbe:
    def __init__(self, pipe, model, args):
        self.pipe, self.model, self.args = pipe, model, args
        tok = pipe.tokenizer
        self.colour_ids = {tok.token_to_id(c): c for c in COLORS}
        self.shape_ids = {tok.token_to_id(s) for s in SHAPES}
        self.kinds = set(args.kinds.split(",")) if args.kinds else None
        words = {"relation": ("left", "right", "above", "below"), "color": COLORS, "shape": SHAPES}
        self.focus = {tok.token_to_id(w) for part in args.mlm_words.split(",") if part
                      for w in words[part]}
        self.relation_ids = {tok.token_to_id(w) for w in words["relation"]}
        self.mask_id = tok.token_to_id("[MASK]")

    def masked(self, ids):
        """(masked ids, labels): each focus word of a caption is masked with probability 0.5
        (at least one per caption that has any); labels -100 elsewhere."""
        focus = torch.isin(ids, torch.tensor(sorted(self.focus)))
        chosen = focus & (torch.rand(ids.shape) < 0.5)
        first = focus & (focus.cumsum(1) == 1)
        chosen |= first & ~chosen.any(1, keepdim=True)
        return ids.masked_fill(chosen, self.mask_id), torch.where(chosen, ids, torch.full_like(ids, -100))

    def images(self, recs):
        if self.args.oracle_tokens:
            return self.oracle(recs)
        with torch.no_grad():
            return self.model._image(self.pipe.pixels([r["image"] for r in recs]))[0]

    def oracle(self, recs):
        """Ideal image tokens: each patch holds fixed random codes of the colour and shape of
        the object covering it (zero elsewhere and at [CLS]), so the tower is taken out."""
        if not hasattr(self, "_codes"):
            g = torch.Generator().manual_seed(1)
            dim = self.model.cfg.vision.dim
            self._codes = {name: torch.randn(dim, generator=g) for name in COLORS + SHAPES}
        grid = self.model.cfg.vision.image_size // self.model.cfg.vision.patch_size
        out = torch.zeros(len(recs), 1 + grid * grid, self.model.cfg.vision.dim)
        for b, r in enumerate(recs):
            for o in r["objects"]:
                cells = torch.tensor(covered_cells(o, grid)) + 1
                out[b, cells] += self._codes[o["color"]] + self._codes[o["shape"]]
        return out

    def texts(self, texts):
        """(hidden states, attention mask, input ids) of the frozen (or ``--train-text``) tower."""
        t = self.pipe.tokens(texts)
        return self.texts_from_ids(t["input_ids"], t["attention_mask"]), t["attention_mask"], t["input_ids"]

    def texts_from_ids(self, ids, mask):
        with torch.set_grad_enabled(self.args.train_text and torch.is_grad_enabled()):
            return self.model.text_features(ids, mask)

    def targets(self, recs, ids, grid):
        """(B, L, N) patch masks for colour words and the shape word after each."""
        t = torch.zeros(ids.shape[0], ids.shape[1], grid * grid)
        for b, r in enumerate(recs):
            objs = {o["color"]: o for o in r["objects"]}
            row = ids[b].tolist()
            for k, token in enumerate(row):
                colour = self.colour_ids.get(token)
                if colour in objs:
                    cells = covered_cells(objs[colour], grid)
                    t[b, k, cells] = 1
                    if k + 1 < len(row) and row[k + 1] in self.shape_ids:
                        t[b, k + 1, cells] = 1
        return t

    @torch.no_grad()
    def evaluate(self, test):
        self.model.eval()
        right = {}
        for i in range(0, len(test), 40):
            recs = test[i:i + 40]
            pairs = [(r, n) for r in recs for n in r["negatives"]]
            image_tokens = self.images([r for r, _ in pairs])
            pos = self.texts([r["captions"][n["source"]] for r, n in pairs])
            neg = self.texts([n["caption"] for _, n in pairs])
            sp = self.model.match_tokens(image_tokens, pos[0], pos[1]).log_softmax(-1)[:, 1]
            sn = self.model.match_tokens(image_tokens, neg[0], neg[1]).log_softmax(-1)[:, 1]
            for (_, n), a, b in zip(pairs, sp.tolist(), sn.tolist()):
                right.setdefault(n["kind"], []).append(a > b)
        return {k: round(sum(v) / len(v), 3) for k, v in sorted(right.items())}

    def train(self, world, test):
        args, model = self.args, self.model
        params = list(model.fusion_layers.parameters()) + list(model.itm_head.parameters())
        if args.mlm:
            params += list(model.mlm_head.parameters())
        if args.train_text:
            params += list(model.text_embed.parameters()) + list(model.text_layers.parameters())
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        rng, index, start = random.Random(args.seed), 0, time.time()
        print(json.dumps({"step": 0, **self.evaluate(test)}), flush=True)
        for step in range(1, args.steps + 1):
            model.train()
            recs = []
            while len(recs) < args.batch_size:
                r = world.sample(index, "train")
                index += 1
                pool = [n for n in r["negatives"] if self.kinds is None or n["kind"] in self.kinds]
                if pool:
                    recs.append((r, rng.choice(pool)))
            imgs = [r for r, _ in recs]
            image_tokens = self.images(imgs)
            pos = self.texts([r["captions"][n["source"]] for r, n in recs])
            neg = self.texts([n["caption"] for _, n in recs])
            other = torch.roll(torch.arange(len(recs)), 1)  # another image's caption
            fused, maps = model.fuse(pos[0], pos[1], image_tokens, return_attention=True)
            logits = torch.cat([model.itm_head(fused[:, 0]), model.match_tokens(image_tokens, neg[0], neg[1]),
                                model.match_tokens(image_tokens[other], pos[0], pos[1])])
            labels = torch.cat([torch.ones(len(recs)), torch.zeros(2 * len(recs))]).long()
            loss = F.cross_entropy(logits, labels)
            mlm_acc = None
            if args.mlm:
                masked, mlm_labels = self.masked(pos[2])
                hidden = self.texts_from_ids(masked, pos[1])
                hit = mlm_labels != -100
                mlm_logits = model.mlm_head(model.fuse(hidden, pos[1], image_tokens)[hit])
                loss = loss + args.mlm * F.cross_entropy(mlm_logits, mlm_labels[hit])
                rel = torch.isin(mlm_labels[hit], torch.tensor(sorted(self.relation_ids)))
                mlm_acc = (mlm_logits.argmax(-1) == mlm_labels[hit])[rel].float().mean().item()
            attn = maps[0]["cross"].float().mean(1)[..., 1:]  # (B, L, N), first fusion layer
            attn = attn / attn.sum(-1, keepdim=True)
            grid = int(round(attn.shape[-1] ** 0.5))
            target = self.targets(imgs, pos[2], grid)
            has = target.sum(-1) > 0
            mass = (attn[has] * target[has]).sum(-1)
            if args.ground:
                loss = loss + args.ground * -mass.clamp_min(1e-6).log().mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % args.every == 0 or step == args.steps:
                print(json.dumps({"step": step, "seconds": round(time.time() - start), "loss": round(loss.item(), 3),
                                  "attention_on_object": round(mass.mean().item(), 3),
                                  "mlm_relation_acc": mlm_acc and round(mlm_acc, 3), **self.evaluate(test)}),
                      flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kinds", default="", help="comma-separated negative kinds to train on (default all)")
    p.add_argument("--fusion-pos", default=None, choices=["", "sincos"])
    p.add_argument("--ground", type=float, default=0.0)
    p.add_argument("--mlm", type=float, default=0.0,
                   help="weight of an image-conditioned MLM loss on the --mlm-words of the true caption")
    p.add_argument("--mlm-words", default="relation", help="comma-separated: relation, color, shape")
    p.add_argument("--oracle-tokens", action="store_true",
                   help="replace the image tower's tokens by ideal ones (colour and shape codes per patch)")
    p.add_argument("--reinit", action="store_true", help="fusion layers and ITM head start afresh")
    p.add_argument("--fusion-layers", type=int, default=0,
                   help="a fresh fusion stack of this depth (implies --reinit)")
    p.add_argument("--train-text", action="store_true", help="the text tower trains too")
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-token-probes", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pipe = vlkit.load(args.run)
    model = pipe.model.eval()
    if args.fusion_pos is not None:
        model.cfg.fusion_pos = args.fusion_pos
    if args.fusion_layers:  # the run's towers under a fresh fusion stack of another depth
        config = {**model.config_dict(), "fusion_layers": args.fusion_layers, "vision_init": "", "text_init": ""}
        deeper = build_model("albef", config)
        towers = {k: v for k, v in model.state_dict().items()
                  if not k.startswith(("fusion_layers.", "itm_head.", "momentum."))}
        missing = deeper.load_state_dict(towers, strict=False).missing_keys
        assert all(k.startswith(("fusion_layers.", "itm_head.", "momentum.")) for k in missing), missing
        pipe.model = model = deeper.eval()
    elif args.reinit:  # in place: the momentum copy and fuse() hold these very modules
        model.fusion_layers.apply(_init_weights)
        model.itm_head.apply(_init_weights)
        model.mlm_head.apply(_init_weights)
    world = SyntheticWorld()
    if not args.no_token_probes:
        print(json.dumps({"token_probes": token_probes(pipe, model, world)}), flush=True)
    test = [r for r in world.records("test", args.test) if r["negatives"]]
    FusionProbe(pipe, model, args).train(world, test)


if __name__ == "__main__":
    main()
