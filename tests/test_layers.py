import pytest
import torch

from vlkit.layers import (Attention, KVCache, PostNormBlock, PreNormBlock, Transformer, fused_attention,
                          interpolate_pos_embed, padding_mask, pool_eot, pool_mean)
from vlkit.layers.embeddings import ImageEmbeddings, PatchEmbed

torch.manual_seed(0)


def _pad_mask(b, m, lengths):
    mask = torch.zeros(b, m, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_equals_plain_path(causal, padded):
    attn = Attention(32, 4).eval()
    x = torch.randn(3, 7, 32)
    mask = padding_mask(_pad_mask(3, 7, [7, 5, 2])) if padded else None
    with fused_attention(True):
        fused = attn(x, mask=mask, causal=causal)
    with fused_attention(False):
        plain = attn(x, mask=mask, causal=causal)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    out, maps = attn(x, mask=mask, causal=causal, return_attention=True)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)
    assert maps.shape == (3, 4, 7, 7)
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 4, 7))
    if causal:
        assert maps.triu(1).abs().max() == 0
    if padded:  # nothing attends to padding
        assert maps[2, :, :, 2:].abs().max() == 0


def test_padding_changes_nothing_for_real_tokens():
    attn = Attention(16, 2).eval()
    x = torch.randn(1, 4, 16)
    padded = torch.cat([x, torch.randn(1, 3, 16)], dim=1)
    mask = padding_mask(_pad_mask(1, 7, [4]))
    torch.testing.assert_close(attn(padded, mask=mask)[:, :4], attn(x), atol=1e-6, rtol=0)


def test_cross_attention_shapes_and_mask():
    attn = Attention(32, 4, context_dim=20).eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 20)
    out, maps = attn(x, context=ctx, return_attention=True)
    assert out.shape == (2, 5, 32) and maps.shape == (2, 4, 5, 9)
    mask = padding_mask(_pad_mask(2, 9, [9, 3]))
    with fused_attention(True):
        fused = attn(x, context=ctx, mask=mask)
    with fused_attention(False):
        plain = attn(x, context=ctx, mask=mask)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="context"):
        attn(x)


@pytest.mark.parametrize("block_cls", [PreNormBlock, PostNormBlock])
def test_kv_cache_matches_full_recomputation(block_cls):
    blocks = [block_cls(32, 4, 64, context_dim=24).eval() for _ in range(2)]
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 24)

    def run(seq, cache=None):
        for b in blocks:
            seq = b(seq, causal=True, context=ctx, cache=cache)
        return seq

    full = run(x)
    cache = KVCache()
    steps = [run(x[:, :3], cache)] + [run(x[:, i:i + 1], cache) for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    # beam reordering keeps each row's cache with it, the cross-attention keys included
    cache = KVCache()
    run(x[:, :5], cache)
    cache.reorder(torch.tensor([1, 0]))
    last = run(x[[1, 0], 5:6], cache)
    torch.testing.assert_close(last, full[[1, 0], 5:6], atol=1e-5, rtol=0)
    # two beams of one image: the image's cross-attention keys (one row, computed once) stay
    # (static=False) and serve both beams; each beam's self-attention keys move with it
    image = ctx[:1]

    def run_on(seq, context, cache=None):
        for b in blocks:
            seq = b(seq, causal=True, context=context, cache=cache)
        return seq
    full = run_on(x, image.expand(2, -1, -1))
    cache = KVCache()
    run_on(x[:, :5], image, cache)
    cache.reorder(torch.tensor([1, 0]), static=False)
    last = run_on(x[[1, 0], 5:6], image, cache)
    torch.testing.assert_close(last, full[[1, 0], 5:6], atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_cls", [PreNormBlock, PostNormBlock])
def test_blocks(block_cls):
    plain = block_cls(32, 4, 64).eval()
    x = torch.randn(2, 6, 32)
    assert plain(x).shape == x.shape and not plain.has_cross
    cross = block_cls(32, 4, 64, context_dim=16).eval()
    ctx = torch.randn(2, 3, 16)
    y = cross(x, context=ctx)
    assert y.shape == x.shape and cross.has_cross
    assert not torch.allclose(y, cross(x, context=torch.randn(2, 3, 16)))  # context matters
    with pytest.raises(ValueError):
        cross(x)
    out, maps = cross(x, context=ctx, return_attention=True)
    torch.testing.assert_close(out, y, atol=1e-6, rtol=0)
    assert maps["cross"].shape == (2, 4, 6, 3) and maps["self"].shape == (2, 4, 6, 6)


def test_post_norm_output_is_normalised():
    block = PostNormBlock(32, 4, 64).eval()
    y = block(torch.randn(2, 6, 32) * 5)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)


def test_patch_embed_and_interpolation():
    emb = ImageEmbeddings(image_size=32, patch_size=8, dim=16)
    assert emb(torch.randn(2, 3, 32, 32)).shape == (2, 17, 16)
    assert emb(torch.randn(2, 3, 48, 64)).shape == (2, 1 + 6 * 8, 16)
    pos = torch.randn(1, 1 + 16, 8)
    same = interpolate_pos_embed(pos, (4, 4), (4, 4))
    assert same is pos
    big = interpolate_pos_embed(pos, (4, 4), (8, 8))
    assert big.shape == (1, 65, 8)
    torch.testing.assert_close(big[:, 0], pos[:, 0])
    constant = torch.ones(1, 17, 8)
    torch.testing.assert_close(interpolate_pos_embed(constant, (4, 4), (6, 6)), torch.ones(1, 37, 8))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        emb(torch.randn(1, 3, 30, 32))
    conv = PatchEmbed(8, 16, stem="conv")
    tokens, grid = conv(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 64, 16) and grid == (8, 8)


def test_pooling():
    x = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    ids = torch.tensor([[5, 9, 2, 0], [5, 7, 8, 2]])
    torch.testing.assert_close(pool_eot(x, ids, eot_token_id=2), torch.stack([x[0, 2], x[1, 3]]))
    torch.testing.assert_close(pool_eot(x, ids), torch.stack([x[0, 1], x[1, 2]]))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool_mean(x, mask), torch.stack([x[0, :2].mean(0), x[1].mean(0)]))
    with pytest.raises(ValueError, match="end-of-text"):
        pool_eot(x, torch.zeros(2, 4, dtype=torch.long), eot_token_id=2)


def test_inference_reuses_stacked_projections_until_a_weight_changes():
    from vlkit.layers import Attention
    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        first = attn(x)
        assert torch.equal(attn(x), first)  # the cached stack gives the same result
        attn.k.weight.add_(0.5)  # an in-place update (as an optimiser step) bumps the version
        changed = attn(x)
    assert not torch.allclose(changed, first)
    with torch.enable_grad():
        assert torch.allclose(attn(x), changed, atol=1e-6)  # the autograd path agrees
    fresh = Attention(16, 2).eval()
    fresh.load_state_dict(attn.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x), changed, atol=1e-6)
        attn.load_state_dict(Attention(16, 2).state_dict())  # copy_ into the same storage
        assert not torch.allclose(attn(x), changed)


def test_evaluation_between_fused_optimizer_steps_sees_the_new_weights():
    """The fused AdamW kernel updates parameters in place without bumping their version
    counters, so the inference cache must not outlive a return to training mode: a model
    evaluated, trained one fused step and evaluated again (a learning curve) gives what a fresh
    copy of the new weights gives; training-mode passes without autograd do not cache."""
    from vlkit.layers import Attention
    torch.manual_seed(0)
    attn = Attention(16, 2)
    opt = torch.optim.AdamW(attn.parameters(), lr=0.1, fused=True)
    x = torch.randn(2, 5, 16)
    for _ in range(2):
        attn.eval()
        with torch.no_grad():
            before = attn(x)
        assert attn._stacked
        attn.train()
        assert attn._stacked == {}
        attn(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            attn(x)
        assert attn._stacked == {}  # training mode, autograd off: no cache
        attn.eval()
        fresh = Attention(16, 2).eval()
        fresh.load_state_dict(attn.state_dict())
        with torch.no_grad():
            after = attn(x)
            assert not torch.allclose(after, before)
            torch.testing.assert_close(after, fresh(x), rtol=0, atol=1e-6)


def test_attention_inference_traces_as_one_graph():
    """Under torch.compile the stacked q/k/v weights are built in the graph, not taken from the
    inference cache (whose pointer checks would break the graph, and whose tensor could be a
    CUDA-graph output a later replay overwrites): fullgraph tracing succeeds, matches eager and
    leaves the cache empty."""
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 5, 32)
    traced = torch.compile(attn, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = traced(x)
        assert attn._stacked == {}
        want = attn(x)  # eager inference fills the cache
    assert attn._stacked
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_attention_guide_forces_the_chosen_heads_and_rows():
    """AttentionGuide: the guided heads read their values through (1-w)·own + w·target in the
    rows where the target has mass (normalised); other heads and rows are untouched, and the
    maps returned are the heads' own."""
    from vlkit.layers import AttentionGuide, plain_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    out, own = plain_attention(q, k, v)
    target = torch.zeros(2, 2, 4, 5)
    target[:, :, 1, 2] = 2.0               # row 1: all on key 2 (normalised from mass 2)
    target[:, :, 3, 0] = target[:, :, 3, 4] = 1.0  # row 3: half on key 0, half on key 4
    for w in (1.0, 0.25):
        got, maps = plain_attention(q, k, v, guide=AttentionGuide(1, target, w))
        torch.testing.assert_close(maps, own)
        mixed = own.clone()
        for row in (1, 3):
            mixed[:, 1:3, row] = (1 - w) * own[:, 1:3, row] + w * target[:, :, row] / target[:, :, row].sum(-1, keepdim=True)
        torch.testing.assert_close(got, mixed @ v)
        torch.testing.assert_close(got[:, 0], out[:, 0])
        torch.testing.assert_close(got[:, :, [0, 2]], out[:, :, [0, 2]])
    torch.testing.assert_close(plain_attention(q, k, v, guide=AttentionGuide(1, target, 0.0))[0], out)
    with pytest.raises(ValueError, match="does not fit"):
        plain_attention(q, k, v, guide=AttentionGuide(2, target, 1.0))
    # through a block and a stack: only the named layer is guided
    block = PostNormBlock(8, 2, 16, context_dim=8)
    stack = Transformer([block, PostNormBlock(8, 2, 16, context_dim=8)]).eval()
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 5, 8)
    plain, _ = stack.forward_with_maps_of(x, [0], context=ctx)
    guide = AttentionGuide(0, torch.zeros(2, 1, 4, 5).index_fill_(3, torch.tensor([2]), 1.0), 1.0)
    forced, maps = stack.forward_with_maps_of(x, [0], context=ctx, guides={0: {"cross": guide}})
    assert (forced - plain).abs().max() > 1e-3
    _, own_maps = stack.forward_with_maps_of(x, [0], context=ctx)
    torch.testing.assert_close(maps[0]["cross"], own_maps[0]["cross"])
    with pytest.raises(ValueError, match="guides for layers"):
        stack.forward_with_maps_of(x, [0], context=ctx, guides={1: {"cross": guide}})


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("causal,padded,cross", [(False, False, False), (True, False, False),
                                                 (True, True, False), (False, True, True)])
def test_forward_at_equals_the_full_stack_at_those_positions(fused, causal, padded, cross):
    """Transformer.forward_at: the last block for one position per row only, with the same
    output and the same gradients as running the whole stack and reading that position."""
    torch.manual_seed(1)
    ctx_dim = 24 if cross else None
    stack = Transformer([PreNormBlock(32, 4, 64, context_dim=ctx_dim) for _ in range(3)])
    x = torch.randn(3, 7, 32, requires_grad=True)
    kw = {}
    if padded:
        kw["mask"] = padding_mask(_pad_mask(3, 7, [7, 5, 3]))
    if cross:
        kw["context"] = torch.randn(3, 4, 24)
    index = torch.tensor([6, 4, 2])
    with fused_attention(fused):
        full = stack(x, causal=causal, **kw)[torch.arange(3), index]
        at = stack.forward_at(x, index, causal=causal, **kw)
        cls = stack.forward_at(x, 0, causal=causal, **kw)
    assert at.shape == (3, 1, 32)
    torch.testing.assert_close(at[:, 0], full, atol=1e-5, rtol=0)
    torch.testing.assert_close(cls[:, 0], stack(x, causal=causal, **kw)[:, 0], atol=1e-5, rtol=0)
    g_full, = torch.autograd.grad(full.square().sum(), x)
    g_at, = torch.autograd.grad(at.square().sum(), x)
    torch.testing.assert_close(g_at, g_full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cross-attention"):
        Attention(32, 4, context_dim=24).forward_at(x, 0)


def test_bf16_cpu_training_takes_the_plain_path_and_agrees_with_the_fused_kernel(monkeypatch):
    """bf16 attention on the CPU that records gradients over short sequences goes the plain way
    (the fused kernel's bf16 backward is several times slower there); fp32, inference and long
    sequences keep the fused kernel. Outputs and gradients agree to bf16 precision."""
    import torch.nn.functional as F

    from vlkit.layers import attention as attention_module
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape) or sdpa(*a, **kw))
    attn = Attention(32, 4)
    x = torch.randn(3, 9, 32)
    mask = padding_mask(_pad_mask(3, 9, [9, 6, 3]))

    def run(dtype, grad=True, tokens=9):
        xi = (x if tokens == 9 else torch.randn(1, tokens, 32)).clone().requires_grad_(grad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = attn(xi, mask=mask if tokens == 9 else None)
        if grad:
            out.float().square().sum().backward()
        return out, xi.grad

    calls.clear()
    plain_out, plain_grad = run(torch.bfloat16)
    assert calls == []                                  # bf16 + gradients + 9 tokens: plain
    run(torch.float32)
    assert len(calls) == 1                              # fp32: fused
    with torch.no_grad():
        run(torch.bfloat16, grad=False)
    assert len(calls) == 2                              # no gradients: fused
    run(torch.bfloat16, tokens=attention_module.PLAIN_BF16_CPU_MAX_TOKENS + 1)
    assert len(calls) == 3                              # past the bound: fused
    use_fused = attention_module.use_fused
    with fused_attention(False):                        # the global switch still turns it off
        assert not use_fused(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
    attn.zero_grad()
    fused_x = x.clone().requires_grad_(True)
    monkeypatch.setattr(attention_module, "use_fused", lambda q, k: True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_out = attn(fused_x, mask=mask)
    fused_out.float().square().sum().backward()
    assert len(calls) == 4
    torch.testing.assert_close(plain_out.float(), fused_out.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(plain_grad, fused_x.grad, atol=5e-2, rtol=5e-2)
