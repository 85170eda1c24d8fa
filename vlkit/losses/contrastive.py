"""Image-text contrastive losses: InfoNCE (CLIP/ITC, NegCLIP hard negatives) and SigLIP.

Functions take features and the log-temperature; `ContrastiveLoss` adds the cross-process
gather (open_clip style, local rows against the global batch) and a chunked InfoNCE whose
memory grows as O(B * chunk) instead of O(B^2).

Conventions
- `logit_scale` is the *log* of the multiplicative scale (CLIP's t, scale = exp(t)); clamping
  it is the model's job. The scale multiplies the (B, D) features, never the (B, B) logits,
  so autograd does not keep a second logit-sized tensor for its gradient.
- InfoNCE: logits = exp(t) * I @ T^T, labels arange(B), loss = (CE_i2t + CE_t2i) / 2.
  `extra_text_emb` (K, D) adds negative texts to the image->text softmax only.
- SigLIP: -(1/B) * sum_ij log sigmoid(z_ij * (exp(t) * x_i . y_j + b)), z_ij = 1 iff i == j.
- Distributed: see `vlkit.collective` for the gradient convention (each rank's loss
  over its local rows; DDP averages; the mean of the rank losses is the global loss).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..collective import (all_gather_sizes, all_gather_with_grad, is_dist, rank,
                                     world_size)

__all__ = ["contrastive_loss", "local_contrastive_loss", "siglip_loss", "local_siglip_loss",
           "ContrastiveLoss"]


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.tensor(float(x), device=like.device)


def _no_autocast(fn):
    """Run an autograd.Function's forward/backward outside autocast, so the logits that the
    backward recomputes are exactly those of the forward (in >= float32)."""
    @functools.wraps(fn)
    def wrapper(ctx, first, *args):
        with torch.autocast(first.device.type, enabled=False):
            return fn(ctx, first, *args)
    return wrapper


# --------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------
def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                     extra_text_emb: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the batch. image_emb, text_emb (B, D); extra_text_emb (K, D)."""
    return local_contrastive_loss(image_emb, text_emb, logit_scale, extra_text_emb)


def local_contrastive_loss(image_all: torch.Tensor, text_all: torch.Tensor, logit_scale,
                           extra_text_all: torch.Tensor | None = None, row_start: int = 0,
                           n_rows: int | None = None, chunk_size: int | None = None
                           ) -> torch.Tensor:
    """InfoNCE of the rows [row_start, row_start + n_rows) against the whole batch.

    image_all, text_all (N, D) hold the (gathered) global batch; image row i matches text i.
    The image->text term uses rows of image_all against [text_all; extra_text_all]; the
    text->image term uses the same rows of text_all against image_all. With the defaults
    (all rows) this is the plain loss; with one rank's rows it is that rank's local loss, and
    the mean over a partition of the rows equals the full loss. `chunk_size` switches to the
    streamed form (no logit matrix larger than chunk_size x N is ever held).
    """
    n_all = image_all.shape[0]
    if text_all.shape[0] != n_all:
        raise ValueError(f"{n_all} images but {text_all.shape[0]} texts")
    n_rows = n_all - row_start if n_rows is None else n_rows
    ls = _as_tensor(logit_scale, image_all)
    cols = text_all if extra_text_all is None else torch.cat([text_all, extra_text_all], 0)
    labels = torch.arange(row_start, row_start + n_rows, device=image_all.device)
    full = row_start == 0 and n_rows == n_all

    if chunk_size is not None:
        if full:  # one pass over the (N, N+K) matrix: row and column log-sum-exp together
            return _ChunkedBlockCE.apply(image_all, cols, ls, labels, labels, 0.5, 0.5,
                                         chunk_size)
        img_rows = image_all[row_start:row_start + n_rows]
        txt_rows = text_all[row_start:row_start + n_rows]
        i2t = _ChunkedBlockCE.apply(img_rows, cols, ls, labels, None, 0.5, 0.0, chunk_size)
        # text->image for the local texts = columns of the (N, n_rows) block image_all @ txt_rows^T
        t2i = _ChunkedBlockCE.apply(image_all, txt_rows, ls, None, labels, 0.0, 0.5, chunk_size)
        return i2t + t2i

    scale = ls.exp()
    img_rows = image_all[row_start:row_start + n_rows]
    if full:  # one (N, N+K) matrix serves both directions
        logits = (scale * img_rows) @ cols.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :n_all].T, labels)) / 2
    # local rows: two (n_rows, N) blocks; no name keeps a block alive after its cross-entropy
    txt_rows = text_all[row_start:row_start + n_rows]
    i2t = F.cross_entropy((scale * img_rows) @ cols.T, labels)  # (n_rows, N + K) logits
    t2i = F.cross_entropy((scale * txt_rows) @ image_all.T, labels)  # (n_rows, N) logits
    return (i2t + t2i) / 2


class _ChunkedBlockCE(torch.autograd.Function):
    """Cross-entropy over the rows and/or columns of S = exp(t) * A @ B^T, streamed by rows.

    loss = w_row * mean_i [lse_j S_ij - S_{i, row_target_i}]
         + w_col * mean_{j < Nc} [lse_i S_ij - S_{col_target_j, j}]
    Forward keeps A, B, t and the per-row / per-column log-sum-exp; backward recomputes each
    (chunk, Nb) block of logits and accumulates dA, dB and dt. Peak extra memory O(chunk * Nb).
    """

    @staticmethod
    @_no_autocast
    def forward(ctx, a, b, logit_scale, row_target, col_target, w_row, w_col, chunk):
        if chunk < 1:
            raise ValueError("chunk_size must be >= 1")
        acc = torch.promote_types(a.dtype, torch.float32)  # compute in >= float32
        scale = logit_scale.detach().to(acc).exp()
        n_a = a.shape[0]
        n_c = 0 if col_target is None else col_target.shape[0]
        b32 = b.to(acc)
        lse_row = None if row_target is None else a.new_empty(n_a, dtype=acc)
        lse_col = None if col_target is None else torch.full((n_c,), float("-inf"),
                                                             dtype=acc, device=a.device)
        for r0 in range(0, n_a, chunk):
            s = (scale * a[r0:r0 + chunk].to(acc)) @ b32.T  # (c, Nb)
            if lse_row is not None:
                lse_row[r0:r0 + chunk] = torch.logsumexp(s, 1)
            if lse_col is not None:
                lse_col = torch.logaddexp(lse_col, torch.logsumexp(s[:, :n_c], 0))
            del s
        loss = torch.zeros((), dtype=acc, device=a.device)
        if row_target is not None:
            pos = scale * (a.to(acc) * b32[row_target]).sum(1)
            loss = loss + w_row * (lse_row - pos).mean()
        if col_target is not None:
            pos = scale * (a[col_target].to(acc) * b32[:n_c]).sum(1)
            loss = loss + w_col * (lse_col - pos).mean()
        ctx.save_for_backward(a, b, logit_scale, row_target, col_target, lse_row, lse_col)
        ctx.w_row, ctx.w_col, ctx.chunk = w_row, w_col, chunk
        return loss.to(a.dtype)

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx, grad):
        a, b, logit_scale, row_target, col_target, lse_row, lse_col = ctx.saved_tensors
        acc = lse_row.dtype if lse_row is not None else lse_col.dtype
        scale = logit_scale.detach().to(acc).exp()
        n_a, chunk = a.shape[0], ctx.chunk
        grad = grad.to(acc)
        a32, b32 = a.to(acc), b.to(acc)
        da = torch.empty_like(a32)
        db = torch.zeros_like(b32)
        dt = torch.zeros((), dtype=acc, device=a.device)
        if row_target is not None:
            g_row = grad * (ctx.w_row / n_a)
        if col_target is not None:
            n_c = col_target.shape[0]
            g_col = grad * (ctx.w_col / n_c)
            cols = torch.arange(n_c, device=a.device)
        for r0 in range(0, n_a, chunk):
            a_c = a32[r0:r0 + chunk]
            c = a_c.shape[0]
            s = (scale * a_c) @ b32.T  # (c, Nb) logits, recomputed
            if row_target is not None:  # g = dloss/dS for this block
                g = (s - lse_row[r0:r0 + c, None]).exp_().mul_(g_row)
                g[torch.arange(c, device=a.device), row_target[r0:r0 + c]] -= g_row
            else:
                g = torch.zeros_like(s)
            if col_target is not None:
                g[:, :n_c].add_((s[:, :n_c] - lse_col[None, :]).exp_().mul_(g_col))
                hit = (col_target >= r0) & (col_target < r0 + c)
                g.index_put_((col_target[hit] - r0, cols[hit]), -g_col, accumulate=True)
            dt += torch.vdot(g.flatten(), s.flatten())  # dS/dt = S
            da[r0:r0 + c] = scale * (g @ b32)
            db += scale * (g.T @ a_c)
            del s, g
        dt = dt.reshape(logit_scale.shape).to(logit_scale.dtype)
        return (da.to(a.dtype), db.to(b.dtype), dt if ctx.needs_input_grad[2] else None,
                None, None, None, None, None)


# --------------------------------------------------------------------------------------------
# SigLIP
# --------------------------------------------------------------------------------------------
def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                logit_bias) -> torch.Tensor:
    """Pairwise sigmoid loss (Zhai et al. 2023), summed over all B^2 pairs and divided by B."""
    return local_siglip_loss(image_emb, text_emb, logit_scale, logit_bias)


def _siglip_logits(img, txt, scale, bias, diag: int):
    """Logits (n, m) of one block and the signs z (+1 where j == i + diag, else -1)."""
    logits = (scale * img) @ txt.T + bias
    rows = torch.arange(img.shape[0], device=img.device)[:, None]
    cols = torch.arange(txt.shape[0], device=img.device)[None, :]
    return logits, torch.where(cols == rows + diag, 1.0, -1.0).to(logits.dtype)


def local_siglip_loss(image_emb: torch.Tensor, text_all: torch.Tensor, logit_scale, logit_bias,
                      row_start: int = 0, chunk_size: int | None = None) -> torch.Tensor:
    """SigLIP of the local images (n, D) against all texts (N, D); image i matches text
    row_start + i. Normalised by n, so the mean over ranks is the global loss.
    `chunk_size` streams over text chunks (custom autograd function, memory O(n * chunk))."""
    ls = _as_tensor(logit_scale, image_emb)
    bias = _as_tensor(logit_bias, image_emb)
    if chunk_size is not None:
        return _ChunkedSigLIP.apply(image_emb, text_all, ls, bias, row_start, chunk_size)
    logits, z = _siglip_logits(image_emb, text_all, ls.exp(), bias, row_start)
    return -F.logsigmoid(z * logits).sum() / image_emb.shape[0]


class _ChunkedSigLIP(torch.autograd.Function):
    """SigLIP summed over (n, chunk) blocks of texts; backward recomputes each block."""

    @staticmethod
    @_no_autocast
    def forward(ctx, img, txt, logit_scale, logit_bias, row_start, chunk):
        if chunk < 1:
            raise ValueError("chunk_size must be >= 1")
        scale = logit_scale.detach().exp()
        total = img.new_zeros((), dtype=torch.promote_types(img.dtype, torch.float32))
        for j0 in range(0, txt.shape[0], chunk):
            logits, z = _siglip_logits(img, txt[j0:j0 + chunk], scale, logit_bias, row_start - j0)
            total += -F.logsigmoid(z * logits).sum()
        ctx.save_for_backward(img, txt, logit_scale, logit_bias)
        ctx.row_start, ctx.chunk = row_start, chunk
        return (total / img.shape[0]).to(img.dtype)

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx, grad):
        img, txt, logit_scale, logit_bias = ctx.saved_tensors
        scale, chunk, n = logit_scale.detach().exp(), ctx.chunk, img.shape[0]
        d_img, d_txt = torch.zeros_like(img), torch.empty_like(txt)
        d_scale = img.new_zeros(()); d_bias = img.new_zeros(())
        for j0 in range(0, txt.shape[0], chunk):
            t_c = txt[j0:j0 + chunk]
            logits, z = _siglip_logits(img, t_c, scale, logit_bias, ctx.row_start - j0)
            g = (-z * torch.sigmoid(-z * logits)) * (grad / n)  # d loss / d logits, (n, c)
            d_scale += torch.vdot(g.flatten(), (logits - logit_bias).flatten())  # dl/dt = l - b
            d_bias += g.sum()
            d_img += scale * (g @ t_c)
            d_txt[j0:j0 + chunk] = scale * (g.T @ img)
        return (d_img, d_txt, d_scale.reshape(logit_scale.shape).to(logit_scale.dtype),
                d_bias.reshape(logit_bias.shape).to(logit_bias.dtype), None, None)


# --------------------------------------------------------------------------------------------
# Module with the cross-process gather
# --------------------------------------------------------------------------------------------
class ContrastiveLoss(nn.Module):
    """Image-text contrastive loss with open_clip-style feature gathering.

    kind: "infonce" (CLIP/ITC; optional NegCLIP `extra_text_emb`) or "siglip" (needs
        `logit_bias`).
    gather: under torch.distributed, all-gather features (with gradient) so negatives come
        from the global batch; ignored without a process group.
    local_loss: each rank computes only its own rows against the global batch (labels offset
        by the rows of the ranks before it); otherwise every rank computes the full global
        loss. Either way the mean over ranks of the returned loss is the single-process loss
        of the global batch, and with DDP's gradient averaging the gradients are the
        single-process ones.
    chunk_size: stream the logits in blocks of chunk_size rows (InfoNCE) or text columns
        (SigLIP) with custom autograd functions; loss and gradients equal the plain form.
    Ranks may hold different numbers of extra texts (and batch sizes, but the equality with
    the single-process loss under DDP's plain averaging needs equal batch sizes).
    """

    def __init__(self, kind: str = "infonce", gather: bool = True,
                 chunk_size: int | None = None, local_loss: bool = True):
        super().__init__()
        if kind not in ("infonce", "siglip"):
            raise ValueError(f"kind must be 'infonce' or 'siglip', got {kind!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.kind, self.gather, self.chunk_size, self.local_loss = (kind, gather, chunk_size,
                                                                    local_loss)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                extra_text_emb: torch.Tensor | None = None, logit_bias=None) -> torch.Tensor:
        if self.kind == "siglip":
            if logit_bias is None:
                raise ValueError("siglip needs logit_bias")
            if extra_text_emb is not None:
                raise ValueError("extra_text_emb is only supported for kind='infonce'")
        if not (self.gather and is_dist() and world_size() > 1):
            if self.kind == "siglip":
                return local_siglip_loss(image_emb, text_emb, logit_scale, logit_bias,
                                         chunk_size=self.chunk_size)
            return local_contrastive_loss(image_emb, text_emb, logit_scale, extra_text_emb,
                                          chunk_size=self.chunk_size)

        # one small exchange: (batch, extra texts) per rank; sizes may differ between ranks
        n = image_emb.shape[0]
        k = 0 if extra_text_emb is None else extra_text_emb.shape[0]
        sizes = all_gather_sizes([n, k], image_emb.device)
        b_sizes, k_sizes = [s[0] for s in sizes], [s[1] for s in sizes]
        row_start = sum(b_sizes[:rank()])  # labels of the local rows are offset by this
        text_all = all_gather_with_grad(text_emb, b_sizes)  # (W*B, D)
        if self.kind == "siglip":
            if self.local_loss:
                return local_siglip_loss(image_emb, text_all, logit_scale, logit_bias,
                                         row_start=row_start, chunk_size=self.chunk_size)
            return local_siglip_loss(all_gather_with_grad(image_emb, b_sizes), text_all,
                                     logit_scale, logit_bias, chunk_size=self.chunk_size)

        image_all = all_gather_with_grad(image_emb, b_sizes)
        extra_all = None
        if any(k_sizes):  # every rank joins the gather, with an empty slice if it has none
            extra = text_emb[:0] if extra_text_emb is None else extra_text_emb
            extra_all = all_gather_with_grad(extra, k_sizes)  # (sum K, D)
        if self.local_loss:
            return local_contrastive_loss(image_all, text_all, logit_scale, extra_all,
                                          row_start=row_start, n_rows=n,
                                          chunk_size=self.chunk_size)
        return local_contrastive_loss(image_all, text_all, logit_scale, extra_all,
                                      chunk_size=self.chunk_size)
