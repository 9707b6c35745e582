"""Image normalisation on real photos: EXIF rotation, CMYK, grayscale, alpha, 16-bit, GIF, WebP, odd names."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prep_helpers import read_shards, real_photos, skipped_by_path

from data_prep.encode import EncodeOptions, encode_image
from data_prep.prepare import PrepArgs, run

OPTS = EncodeOptions(image_size=64, quality=95)


@pytest.fixture(scope="module")
def photo(real_data: Path) -> Image.Image:
    """A real landscape photo (500x374) as RGB."""
    p = real_photos(real_data, "train", "cat", 1)[0]
    im = Image.open(p).convert("RGB")
    assert im.width > im.height
    return im


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _decode(jpg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpg)), dtype=np.float32)


def _like(reference: Image.Image, jpg: bytes) -> float:
    """Mean absolute difference between an output JPEG and the reference resized the same way."""
    out = Image.open(io.BytesIO(jpg))
    ref = reference.convert("RGB").resize(out.size, Image.Resampling.BICUBIC)
    return float(np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32)).mean())


def test_plain_jpeg_keeps_aspect_and_original_size(photo):
    jpg, meta = encode_image(_save(photo, "JPEG", quality=95), OPTS)
    w, h = photo.size
    assert meta["original_size"] == [w, h]
    assert meta["size"] == [round(w * 64 / h), 64]
    assert _like(photo, jpg) < 6


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    jpg, meta = encode_image(_save(photo, "JPEG", quality=95, exif=exif), OPTS)
    upright = photo.transpose(Image.Transpose.ROTATE_270)
    assert meta["exif_orientation"] == 6 and meta["size"][0] < meta["size"][1]
    assert _like(upright, jpg) < 6
    assert _like(upright.transpose(Image.Transpose.ROTATE_180), jpg) > 20  # really the right way round


def test_cmyk_grayscale_and_bmp_become_rgb(photo):
    jpg, meta = encode_image(_save(photo.convert("CMYK"), "JPEG", quality=95), OPTS)
    assert meta["mode"] == "CMYK" and Image.open(io.BytesIO(jpg)).mode == "RGB"
    assert _like(photo, jpg) < 8
    gray = photo.convert("L")
    jpg, _ = encode_image(_save(gray, "JPEG", quality=95), OPTS)
    px = _decode(jpg)
    assert px.shape[2] == 3 and np.abs(px[..., 0] - px[..., 2]).max() < 8
    jpg, _ = encode_image(_save(photo, "BMP"), OPTS)
    assert _like(photo, jpg) < 6


def test_rgba_and_palette_transparency_flatten_on_white(photo):
    rgba = photo.convert("RGBA")
    alpha = Image.new("L", photo.size, 255)
    alpha.paste(0, (0, 0, photo.width // 2, photo.height))  # left half fully transparent
    rgba.putalpha(alpha)
    px = _decode(encode_image(_save(rgba, "PNG"), OPTS)[0])
    assert px[:, : px.shape[1] // 2 - 4].mean() > 250  # white, not black
    assert px[:, px.shape[1] // 2 + 4 :].mean() < 200  # the photo
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    px = _decode(encode_image(_save(pal, "PNG", transparency=0), OPTS)[0])
    assert px.shape[2] == 3


def test_16bit_png_is_scaled_not_clipped(photo):
    gray = np.asarray(photo.convert("L"), dtype=np.uint16) * 257  # the same picture on a 0..65535 scale
    im16 = Image.fromarray(gray)
    assert im16.mode == "I;16"
    jpg, meta = encode_image(_save(im16, "PNG"), OPTS)
    assert meta["mode"].startswith("I")
    assert _like(photo.convert("L"), jpg) < 6  # clipping at 255 would give an almost white image


def test_animated_gif_uses_first_frame_and_webp_works(photo):
    black = Image.new("RGB", photo.size)
    gif = _save(photo, "GIF", save_all=True, append_images=[black], duration=100, loop=0)
    jpg, meta = encode_image(gif, OPTS)
    assert meta["frames"] == 2
    assert _like(photo, jpg) < 25  # GIF's 256-colour palette; the black second frame would be ~100 off
    jpg, meta = encode_image(_save(photo, "WEBP", quality=95), OPTS)
    assert meta["format"] == "WEBP" and _like(photo, jpg) < 6


def test_big_jpeg_uses_draft_and_panorama_is_cropped_to_max_aspect(photo):
    big = photo.resize((2000, 1496))
    jpg, meta = encode_image(_save(big, "JPEG", quality=95), OPTS)
    assert meta["original_size"] == [2000, 1496] and meta["size"] == [86, 64]
    assert _like(photo, jpg) < 6
    strip = photo.resize((1500, 100))
    jpg, meta = encode_image(_save(strip, "JPEG", quality=95), OPTS)
    assert meta["size"] == [192, 64] and meta["cropped_to_aspect"] == 3.0
    centre = strip.crop((600, 0, 900, 100))
    assert _like(centre, jpg) < 8


def test_all_formats_and_odd_names_in_one_run(photo, tmp_path: Path):
    src = tmp_path / "src"
    files = {
        "cat/chat noir é.jpg": _save(photo, "JPEG"),
        "cat/猫 1.JPEG": _save(photo.rotate(90, expand=True), "JPEG"),
        "cat/alpha.PNG": _save(photo.convert("RGBA"), "PNG"),
        "cat/anim.gif": _save(photo, "GIF", save_all=True, append_images=[Image.new("RGB", photo.size)]),
        "dog/cmyk.jpg": _save(photo.convert("CMYK"), "JPEG"),
        "dog/gray.jpeg": _save(photo.convert("L"), "JPEG"),
        "dog/deep.png": _save(Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257), "PNG"),
        "dog/photo.webp": _save(photo, "WEBP"),
        "dog/photo.bmp": _save(photo, "BMP"),
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    out = tmp_path / "out"
    summary = run(PrepArgs(src=src, out=out, image_size=64, workers=1, progress=False), log=lambda _: None)
    assert summary["counts"]["written"] == len(files) and not skipped_by_path(out)
    samples = read_shards(out)
    assert {s["json"]["source"] for s in samples.values()} == set(files)
    for key, s in samples.items():
        assert key.replace("_", "").replace("-", "").isalnum() and key.isascii()
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.mode == "RGB" and min(im.size) == 64
