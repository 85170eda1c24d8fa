import pytest
import torch
from torch import nn

import vlkit
from vlkit.layers import Attention, Int8Linear, quantize_int8
from vlkit.layers.int8 import quantize_weight


def test_int8_linear_is_the_quantized_product_computed_exactly():
    """Int8Linear = (x quantized per row) · (W quantized per output channel)ᵀ, rescaled: the
    int32 product against the same sums in float64 of the same integers, and close to the float
    layer (per-row int8 keeps the output within a few per mille of its norm)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    x = torch.randn(2, 5, 64) * torch.linspace(0.1, 10, 5)[:, None]  # rows of very different scale
    q = Int8Linear(lin)
    with torch.no_grad():
        out = q(x)
        w8, sw = quantize_weight(lin.weight)
        rows = x.reshape(-1, 64).double()
        sx = rows.abs().amax(1, keepdim=True) / 127
        ref = (torch.round(rows / sx) @ w8.double().T) * sx * sw.double() + lin.bias.double()
        torch.testing.assert_close(out.reshape(-1, 40).double(), ref, rtol=1e-6, atol=1e-6)
        full = lin(x)
        rel = (out - full).norm(dim=-1) / full.norm(dim=-1)
        assert rel.max() < 0.02
        assert out.dtype == x.dtype and out.shape == (2, 5, 40)
        assert q(x.bfloat16()).dtype == torch.bfloat16
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    q.to(torch.bfloat16)  # a cast after quantizing keeps the scales and the bias in fp32
    assert q.weight_scale.dtype == q.bias.dtype == torch.float32 and q.weight_int8.dtype == torch.int8
    with torch.no_grad():
        torch.testing.assert_close(q(x), out)
    with pytest.raises(RuntimeError, match="inference"):
        q(x.requires_grad_())


def test_attention_stacks_int8_projections_like_float_ones():
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 6, 32)
    quantize_int8(attn)
    assert isinstance(attn.q, Int8Linear) and isinstance(attn.proj, Int8Linear)
    with torch.no_grad():
        stacked = attn(x)  # q, k and v as one int8 product over stacked weights (cached)
        separate = attn.proj(torch.nn.functional.scaled_dot_product_attention(
            *(attn._heads(layer(x)) for layer in (attn.q, attn.k, attn.v))).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(stacked, separate, atol=1e-6, rtol=0)


def test_quantized_clip_embeds_as_the_float_model():
    torch.manual_seed(0)
    model = vlkit.create_model("clip", "tiny").eval()
    px, ids = torch.randn(4, 3, 64, 64), torch.randint(1, 500, (4, 12))
    ids[:, -1] = 511
    with torch.no_grad():
        img, txt = model.encode_image(px), model.encode_text(ids)
        n = quantize_int8(model)
        img8, txt8 = model.encode_image(px), model.encode_text(ids)
    assert n == sum(1 for m in model.modules() if isinstance(m, Int8Linear)) >= 3 * 6 * 2
    assert not any(type(m) is nn.Linear for m in model.modules())
    cos = torch.cat([(img * img8).sum(-1), (txt * txt8).sum(-1)])  # unit vectors
    assert cos.min() > 0.999
    assert not torch.equal(img, img8)  # the int8 path ran


def test_quantize_leaves_odd_sizes_float_and_refuses_a_model_with_nothing_to_quantize():
    net = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 3))
    assert quantize_int8(net) == 1
    assert isinstance(net[0], Int8Linear) and type(net[1]) is nn.Linear
    with pytest.raises(ValueError, match="no linear layer"):
        quantize_int8(nn.Sequential(nn.Linear(5, 3)))

