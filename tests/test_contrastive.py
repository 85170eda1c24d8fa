"""Contrastive losses: naive references, chunked == plain (loss and gradients), and a real
2-process gloo run checked against the single-process loss and gradients."""
import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from vlkit.losses import (ContrastiveLoss, contrastive_loss, local_contrastive_loss,
                          siglip_loss)
from vlkit.losses.contrastive import _ChunkedBlockCE, _ChunkedSigLIP
from vlkit import collective as vdist


def _feats(b, d, k=0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    txt = torch.nn.functional.normalize(txt + 0.5 * img, dim=-1)  # some real alignment
    extra = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=-1)
    return img, txt, extra


def _naive_infonce(img, txt, logit_scale, extra=None):
    """Loops over rows with an explicit max-shifted log-sum-exp, in float64."""
    img, txt = img.double(), txt.double()
    cols = txt if extra is None else torch.cat([txt, extra.double()])
    s = math.exp(float(logit_scale))
    b = img.shape[0]

    def nll(row_logits, target):
        m = max(row_logits)
        lse = m + math.log(sum(math.exp(v - m) for v in row_logits))
        return lse - row_logits[target]

    i2t = sum(nll([s * float(img[i] @ c) for c in cols], i) for i in range(b)) / b
    t2i = sum(nll([s * float(txt[j] @ im) for im in img], j) for j in range(b)) / b
    return (i2t + t2i) / 2


def _naive_siglip(img, txt, logit_scale, logit_bias):
    s, bias = math.exp(float(logit_scale)), float(logit_bias)
    img, txt = img.double(), txt.double()
    b = img.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            x = z * (s * float(img[i] @ txt[j]) + bias)
            total += math.log1p(math.exp(-x))  # -log sigmoid(x)
    return total / b


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# --------------------------------------------------------------------------------------------
# Plain losses against direct computations
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 5])
def test_infonce_matches_naive(k):
    img, txt, extra = _feats(12, 8, k)
    ls = torch.tensor(math.log(1 / 0.07))
    got = contrastive_loss(img, txt, ls, extra if k else None)
    want = _naive_infonce(img, txt, ls, extra if k else None)
    assert abs(got.item() - want) < 1e-5


def test_infonce_extra_negatives_only_in_image_to_text():
    img, txt, extra = _feats(6, 4, 3)
    ls = torch.tensor(2.0)
    s = ls.exp()
    i2t = torch.nn.functional.cross_entropy(s * img @ torch.cat([txt, extra]).T, torch.arange(6))
    t2i = torch.nn.functional.cross_entropy(s * txt @ img.T, torch.arange(6))
    assert torch.allclose(contrastive_loss(img, txt, ls, extra), (i2t + t2i) / 2, atol=1e-6)
    # a hard negative identical to the true caption raises the loss
    assert contrastive_loss(img, txt, ls, txt.clone()) > contrastive_loss(img, txt, ls)


def test_siglip_matches_naive():
    img, txt, _ = _feats(9, 6)
    ls, lb = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    assert abs(siglip_loss(img, txt, ls, lb).item() - _naive_siglip(img, txt, ls, lb)) < 1e-5
    ls, lb = torch.tensor(1.5), torch.tensor(0.3)
    assert abs(siglip_loss(img, txt, ls, lb).item() - _naive_siglip(img, txt, ls, lb)) < 1e-5


def test_local_rows_partition_full_loss():
    """Mean of the losses of a partition into equal row blocks = the full loss (what DDP
    averages), plain and chunked."""
    img, txt, extra = _feats(24, 8, 6)
    ls = torch.tensor(2.5)
    full = contrastive_loss(img, txt, ls, extra)
    for chunk in (None, 5):
        parts = [local_contrastive_loss(img, txt, ls, extra, row_start=r0, n_rows=6,
                                        chunk_size=chunk) for r0 in range(0, 24, 6)]
        assert torch.allclose(torch.stack(parts).mean(), full, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Chunked == plain
# --------------------------------------------------------------------------------------------
def _loss_and_grads(fn, *tensors):
    leaves = _leaves(*tensors)
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("chunk", [1, 7, 16, 37, 64, 500])
@pytest.mark.parametrize("k", [0, 9])
def test_chunked_equals_plain(chunk, k):
    b, d = 64, 32
    img, txt, extra = _feats(b, d, k, seed=1)
    ls = torch.tensor(math.log(1 / 0.07))
    args = (img, txt, ls, extra) if k else (img, txt, ls)

    l0, g0 = _loss_and_grads(lambda *a: local_contrastive_loss(*a), *args)
    l1, g1 = _loss_and_grads(lambda *a: local_contrastive_loss(*a, chunk_size=chunk), *args)
    assert abs(l0.item() - l1.item()) <= 1e-5
    for a, b_ in zip(g0, g1):
        assert (a - b_).abs().max().item() <= 1e-5


@pytest.mark.parametrize("chunk", [3, 10, 64])
def test_chunked_local_rows_equal_plain(chunk):
    img, txt, extra = _feats(40, 16, 4, seed=2)
    ls = torch.tensor(3.0)

    def f(c):
        return lambda i, t, s, e: local_contrastive_loss(i, t, s, e, row_start=10, n_rows=10,
                                                         chunk_size=c)

    l0, g0 = _loss_and_grads(f(None), img, txt, ls, extra)
    l1, g1 = _loss_and_grads(f(chunk), img, txt, ls, extra)
    assert abs(l0.item() - l1.item()) <= 1e-5
    for a, b_ in zip(g0, g1):
        assert (a - b_).abs().max().item() <= 1e-5


def test_chunked_function_gradcheck_float64():
    img, txt, extra = _feats(7, 3, 2, seed=3, dtype=torch.float64)
    ls = torch.tensor(0.8, dtype=torch.float64)
    lab = torch.arange(7)
    a, b, s = _leaves(img, torch.cat([txt, extra]), ls)
    assert torch.autograd.gradcheck(
        lambda a, b, s: _ChunkedBlockCE.apply(a, b, s, lab, lab, 0.5, 0.5, 3), (a, b, s))
    a, b, s = _leaves(img, txt[2:5], ls)  # column CE of a (7, 3) block, targets rows 2..4
    assert torch.autograd.gradcheck(
        lambda a, b, s: _ChunkedBlockCE.apply(a, b, s, None, lab[2:5], 0.0, 0.5, 2), (a, b, s))


def test_chunked_siglip_function_gradcheck_float64():
    img, txt, _ = _feats(11, 3, seed=5, dtype=torch.float64)
    args = _leaves(img[:5], txt, torch.tensor(0.4, dtype=torch.float64),
                   torch.tensor(-0.7, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, s, c: _ChunkedSigLIP.apply(a, b, s, c, 4, 3),
                                    args)


def test_chunked_siglip_equals_plain():
    img, txt, _ = _feats(30, 8, seed=4)
    ls, lb = torch.tensor(2.3), torch.tensor(-1.7)
    l0, g0 = _loss_and_grads(lambda *a: ContrastiveLoss("siglip")(*a[:3], logit_bias=a[3]),
                             img, txt, ls, lb)
    l1, g1 = _loss_and_grads(
        lambda *a: ContrastiveLoss("siglip", chunk_size=7)(*a[:3], logit_bias=a[3]),
        img, txt, ls, lb)
    assert abs(l0.item() - l1.item()) <= 1e-5
    for a, b_ in zip(g0, g1):
        assert (a - b_).abs().max().item() <= 1e-5


def test_chunked_runs_in_float32_under_autocast():
    img, txt, _ = _feats(20, 8, seed=6)
    ls = torch.tensor(3.0)
    want = contrastive_loss(img, txt, ls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ContrastiveLoss(chunk_size=6)(img, txt, ls)
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) <= 1e-5


def test_module_without_process_group_is_plain_loss():
    img, txt, extra = _feats(10, 8, 3)
    ls = torch.tensor(2.0)
    want = contrastive_loss(img, txt, ls, extra)
    for local in (True, False):
        assert torch.allclose(ContrastiveLoss(local_loss=local)(img, txt, ls, extra), want)
    assert torch.allclose(ContrastiveLoss(chunk_size=3)(img, txt, ls, extra), want, atol=1e-6)
    with pytest.raises(ValueError):
        ContrastiveLoss(kind="nope")
    with pytest.raises(ValueError):
        ContrastiveLoss(kind="siglip")(img, txt, ls)


def test_distributed_helpers_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert not vdist.is_dist() and vdist.rank() == 0 and vdist.world_size() == 1
    assert vdist.all_gather_with_grad(x) is x
    y = vdist.all_gather_no_grad(x)
    assert torch.equal(y, x) and not y.requires_grad


# --------------------------------------------------------------------------------------------
# Two real processes (gloo) against the single-process loss on the same global batch
# --------------------------------------------------------------------------------------------
WORLD, LOCAL_B, DIM = 2, 6, 8
CASES = [  # (kind, local_loss, chunk_size, extra texts on rank 0 and rank 1; 0 = None)
    ("infonce", True, None, (3, 3)),
    ("infonce", True, 4, (3, 1)),  # ranks with different numbers of hard negatives
    ("infonce", False, None, (0, 0)),
    ("infonce", False, 5, (2, 0)),  # rank 1 has none: it still joins the gather
    ("infonce", True, None, (0, 2)),
    ("siglip", True, None, (0, 0)),
    ("siglip", False, 4, (0, 0)),
]


def _global_batch(k_per_rank):
    img, txt, extra = _feats(WORLD * LOCAL_B, DIM, sum(k_per_rank), seed=7)
    return img, txt, extra, torch.tensor(2.7), torch.tensor(-3.0)


def _run_case(kind, local, chunk, img, txt, extra, ls, lb):
    loss_fn = ContrastiveLoss(kind=kind, local_loss=local, chunk_size=chunk)
    leaves = _leaves(img, txt, extra, ls, lb)
    i, t, e, s, b = leaves
    if kind == "siglip":
        loss = loss_fn(i, t, s, logit_bias=b)
    else:
        loss = loss_fn(i, t, s, e if e.shape[0] else None)
    loss.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return loss.detach(), grads


def _worker(rank, world, port, out_dir):
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = []
        sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        for kind, local, chunk, ks in CASES:
            img, txt, extra, ls, lb = _global_batch(ks)
            ex = slice(sum(ks[:rank]), sum(ks[:rank + 1]))
            results.append(_run_case(kind, local, chunk, img[sl], txt[sl], extra[ex], ls, lb))
        img = _global_batch((0, 0))[0]
        gathered = vdist.all_gather_no_grad(img[sl].clone().requires_grad_())
        uneven = vdist.all_gather_no_grad(img[:rank + 1])  # rank r sends r + 1 rows
        torch.save({"results": results, "rank": vdist.rank(), "world": vdist.world_size(),
                    "gather_ok": torch.equal(gathered, img) and not gathered.requires_grad
                    and torch.equal(uneven, torch.cat([img[:1], img[:2]]))},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_two_processes_match_single_process(tmp_path):
    ctx = mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD,
                   join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("distributed workers timed out")
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [o["rank"] for o in out] == list(range(WORLD))
    assert all(o["world"] == WORLD and o["gather_ok"] for o in out)

    for c, (kind, local, chunk, ks) in enumerate(CASES):
        # single process, plain form, on the global batch (extras concatenated in rank order)
        want_loss, want_grads = _run_case(kind, True, None, *_global_batch(ks))
        losses = torch.stack([o["results"][c][0] for o in out])
        # DDP averages over ranks: the mean of the rank losses is the global loss ...
        assert torch.allclose(losses.mean(), want_loss, atol=1e-5), c
        if not local:  # ... and without local_loss every rank holds the global loss itself
            assert torch.allclose(losses, want_loss.expand(WORLD), atol=1e-5), c
        for gi in range(5):  # image, text, extra, logit_scale, logit_bias
            per_rank = [o["results"][c][1][gi] for o in out]
            if gi < 3:  # per-rank feature slices, divided by W as DDP's averaging does
                got = torch.cat(per_rank) / WORLD
            else:  # replicated parameters: DDP averages their gradients
                got = torch.stack(per_rank).mean(0)
            assert got.shape == want_grads[gi].shape, (c, gi)
            assert torch.allclose(got, want_grads[gi], rtol=0, atol=1e-5), (c, gi)
