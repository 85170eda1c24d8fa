import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.data.transforms import (CLIP_MEAN, CLIP_STD, HALF, ImageError, ImageTransform,
                                   center_crop, hflip, load_image, normalize,
                                   random_resized_crop, resize, swap_left_right, to_tensor)


def gradient_image(w=40, h=30):
    """Distinct pixels everywhere: R grows with x, G with y."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :, 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[:, :, 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    a[:, :, 2] = 77
    return Image.fromarray(a)


# ----------------------------------------------------------------------------- captions
@pytest.mark.parametrize("before, after", [
    ("a red circle left of a blue square", "a red circle right of a blue square"),
    ("the star is to the right of the cross", "the star is to the left of the cross"),
    ("Left and RIGHT and Right", "Right and LEFT and Left"),
    ("leftover brightness, righteous", "leftover brightness, righteous"),
    ("left-hand side, right.", "right-hand side, left."),
])
def test_swap_left_right(before, after):
    assert swap_left_right(before) == after
    assert swap_left_right(after) == before


def test_swap_left_right_list():
    assert swap_left_right(["left", "above"]) == ["right", "above"]


# ----------------------------------------------------------------------------- functional ops
def test_resize_shorter_side_keeps_aspect():
    img = gradient_image(40, 30)
    out = resize(img, 15)
    assert out.size == (20, 15)
    assert resize(gradient_image(30, 40), 15).size == (15, 20)
    assert resize(img, (8, 12)).size == (12, 8)  # (h, w)


def test_center_crop_takes_the_middle():
    img = gradient_image(40, 30)
    out = center_crop(img, 10)
    assert out.size == (10, 10)
    a, b = np.asarray(img), np.asarray(out)
    assert np.array_equal(b, a[10:20, 15:25])
    assert center_crop(gradient_image(6, 6), 10).size == (10, 10)  # padded


def test_hflip_mirrors_pixels():
    img = gradient_image()
    a, b = np.asarray(img), np.asarray(hflip(img))
    assert np.array_equal(b, a[:, ::-1])
    assert not np.array_equal(a, b)


def test_random_resized_crop_size_and_reproducible():
    img = gradient_image(50, 40)
    a = random_resized_crop(img, 16, rng=random.Random(3))
    b = random_resized_crop(img, 16, rng=random.Random(3))
    c = random_resized_crop(img, 16, rng=random.Random(4))
    assert a.size == (16, 16)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_to_tensor_and_normalize_values():
    a = np.array([[[0, 128, 255]]], np.uint8)
    t = to_tensor(Image.fromarray(a))
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    assert torch.allclose(t.flatten(), torch.tensor([0.0, 128 / 255, 1.0]))
    n = normalize(t, HALF, HALF)
    assert torch.allclose(n.flatten(), torch.tensor([-1.0, 128 / 255 * 2 - 1, 1.0]), atol=1e-6)
    n = normalize(t, CLIP_MEAN, CLIP_STD)
    expect = (torch.tensor([0.0, 128 / 255, 1.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(n.flatten(), expect, atol=1e-6)
    assert torch.allclose(normalize(t[None], HALF, HALF), normalize(t, HALF, HALF)[None])


# ----------------------------------------------------------------------------- ImageTransform
def test_eval_transform_matches_functional_pipeline(tmp_path):
    img = gradient_image(40, 30)
    tf = ImageTransform(16, CLIP_MEAN, CLIP_STD)
    t, cap = tf(img, "a caption left")
    assert t.shape == (3, 16, 16) and cap == "a caption left"
    ref = normalize(to_tensor(center_crop(resize(img, 16), 16)), CLIP_MEAN, CLIP_STD)
    assert torch.allclose(t, ref, atol=1e-5)
    # numpy array and path inputs give the same tensor
    assert torch.allclose(tf(np.asarray(img))[0], t)
    img.save(tmp_path / "x.png")
    assert torch.allclose(tf(tmp_path / "x.png")[0], t)
    assert torch.allclose(tf(str(tmp_path / "x.png"))[0], t)


def test_train_transform_reproducible_and_flip_swaps_caption():
    img = gradient_image(48, 48)
    tf = ImageTransform(24, HALF, HALF, train=True, scale=(0.6, 1.0), hflip=True)
    a, ca = tf(img, "red left of blue", random.Random(7))
    b, cb = tf(img, "red left of blue", random.Random(7))
    assert torch.equal(a, b) and ca == cb
    flips = {True: 0, False: 0}
    for seed in range(40):
        t, cap = tf(img, ["red left of blue", "leftover"], random.Random(seed))
        # the red channel grows with x: mirrored iff it decreases left to right
        mirrored = bool(t[0, :, 0].mean() > t[0, :, -1].mean())
        assert cap == (["red right of blue", "leftover"] if mirrored else ["red left of blue", "leftover"])
        flips[mirrored] += 1
    assert flips[True] >= 8 and flips[False] >= 8


def test_train_transform_without_flip_never_mirrors():
    img = gradient_image(48, 48)
    tf = ImageTransform(24, HALF, HALF, train=True, hflip=False)
    for seed in range(20):
        t, cap = tf(img, "left", random.Random(seed))
        assert cap == "left" and t[0, :, 0].mean() < t[0, :, -1].mean()


# ----------------------------------------------------------------------------- loading
def test_exif_rotated_jpeg_is_upright(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 high, left half red
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (20, 40)
    b = np.asarray(img).astype(int)
    assert b[5, 10, 0] > 200 and b[5, 10, 2] < 60      # top is red (was left)
    assert b[35, 10, 2] > 200 and b[35, 10, 0] < 60    # bottom is blue (was right)


def test_modes_are_converted_to_rgb(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "l.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "i16.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.new("LA", (8, 8), (10, 255)).save(tmp_path / "la.png")
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.save(tmp_path / "p.png")
    px = {name: np.asarray(load_image(tmp_path / name)).astype(int)[4, 4]
          for name in ("l.png", "cmyk.jpg", "i16.png", "rgba.png", "la.png", "p.png")}
    for name in px:
        assert load_image(tmp_path / name).mode == "RGB", name
    assert list(px["l.png"]) == [100, 100, 100]
    assert px["cmyk.jpg"][0] > 200 and px["cmyk.jpg"][1] < 60 and px["cmyk.jpg"][2] < 60
    assert list(px["i16.png"]) == [128, 128, 128]      # scaled to 8 bits, not clipped to 255
    assert list(px["rgba.png"]) == [255, 255, 255]     # fully transparent -> white
    assert list(px["la.png"]) == [10, 10, 10]
    assert list(px["p.png"]) == [0, 255, 0]


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(ImageError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(ImageError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    gradient_image(64, 64).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match=str(tmp_path.name)):
        load_image(tmp_path)  # a directory
    assert issubclass(ImageError, ValueError)


def test_decompression_bomb_guard(tmp_path):
    gradient_image(40, 30).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="big.png"):
        load_image(tmp_path / "big.png", max_pixels=1000)
    assert load_image(tmp_path / "big.png", max_pixels=1200).size == (40, 30)
