"""Decode one image, normalise it to an RGB JPEG with shorter side ``image_size``; runs in worker processes.

Pure function of (file bytes, options): the same input gives the same bytes in any process, which is
what makes the shards identical for any ``--workers``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from data_prep.plan import Item
from data_prep.shards import sample_bytes

_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class EncodeOptions:
    image_size: int = 320
    quality: int = 90
    max_pixels: int = 100_000_000
    min_size: int = 32
    max_aspect: float = 3.0


class Skip(Exception):
    """This image cannot be used; ``reason`` is a short code for the summary, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Encoded:
    """What a batch of items becomes: their tar members back to back, and per item its size or why it was skipped.

    One bytes object per batch (not a list of per-image objects) keeps pickling and the pipe to the
    parent cheap; the parent slices ``blob`` by ``sizes`` and writes the slices as they are.
    """

    blob: bytes
    sizes: tuple[int, ...]  # bytes of each item's members in blob; 0 for a skipped item
    skips: tuple[tuple[str, str] | None, ...]  # (reason, detail) of each skipped item, None when written


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha flattened on white, 16-bit scaled (not clipped) to 8-bit."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT:
        # convert("L") would clip 16-bit values at 255 (an all-white image); scale 0..65535 -> 0..255.
        return im.convert("I").point(lambda v: v * (1 / 257)).convert("L").convert("RGB")
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return im.convert("RGB")


def _crop_box(w: int, h: int, max_aspect: float) -> tuple[int, int, int, int]:
    """Centre crop of the long side so that long/short <= max_aspect (panoramas, banners)."""
    if w > h * max_aspect:
        cw = round(h * max_aspect)
        x = (w - cw) // 2
        return x, 0, x + cw, h
    if h > w * max_aspect:
        ch = round(w * max_aspect)
        y = (h - ch) // 2
        return 0, y, w, y + ch
    return 0, 0, w, h


def encode_image(data: bytes, opts: EncodeOptions) -> tuple[bytes, dict]:
    """JPEG bytes and metadata for one source image; raises Skip for anything unusable."""
    with warnings.catch_warnings():
        # Pillow warns above its own pixel limit; ours (--max-pixels) is checked explicitly below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Skip("not_an_image", "not a readable image (unknown format or corrupt header)") from None
        except Image.DecompressionBombError as e:
            raise Skip("too_large", f"decompression bomb: {e}") from None
        w, h = im.size
        meta = {"original_size": [w, h], "mode": im.mode, "format": im.format}
        if w * h > opts.max_pixels:
            raise Skip("too_large", f"{w}x{h} = {w * h:,} pixels is over --max-pixels {opts.max_pixels:,}")
        if min(w, h) < opts.min_size:
            raise Skip("too_small", f"{w}x{h} is smaller than --min-size {opts.min_size} px")
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            meta["frames"] = frames  # animated GIF/WebP: the first frame is used
        draft_scale = 1.0  # original pixels per decoded pixel
        if im.format == "JPEG" and opts.image_size < min(w, h):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the shorter side stays >= image_size.
            s = opts.image_size / min(w, h)
            drafted = im.draft(None, (math.ceil(w * s), math.ceil(h * s)))
            if drafted is not None:
                draft_scale = w / drafted[1][2]
        try:
            im.load()
        except OSError as e:
            raise Skip("truncated" if "truncated" in str(e) else "corrupt", f"{e}") from None
        orientation = im.getexif().get(0x0112, 1)
        if orientation != 1:
            ImageOps.exif_transpose(im, in_place=True)
            meta["exif_orientation"] = orientation
            if orientation in (5, 6, 7, 8):  # quarter turns swap width and height
                w, h = h, w
        im = to_rgb(im)
        # Geometry in original pixels, so the output size does not depend on the draft scale's rounding.
        box = _crop_box(w, h, opts.max_aspect)
        cw, ch = box[2] - box[0], box[3] - box[1]
        if (cw, ch) != (w, h):
            meta["cropped_to_aspect"] = opts.max_aspect
        s = opts.image_size / min(cw, ch)
        size = (max(1, round(cw * s)), max(1, round(ch * s)))
        decoded_box = tuple(v / draft_scale for v in box)
        if size != im.size or decoded_box != (0, 0, *im.size):
            im = im.resize(size, Image.Resampling.BICUBIC, box=decoded_box, reducing_gap=3.0)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=opts.quality)
        meta["size"] = list(im.size)
        return out.getvalue(), meta


def encode_item(src: str, item: Item, opts: EncodeOptions) -> bytes | tuple[str, str]:
    """Read, verify and encode one planned item into its three tar members, or (reason, detail) of why not.

    Every failure becomes a skip, never an exception.
    """
    try:
        data = Path(src, item.rel).read_bytes()
    except OSError as e:
        return ("unreadable", f"{type(e).__name__}: {e.strerror or e}")
    if hashlib.sha256(data).hexdigest() != item.sha256:
        return ("changed", "the file changed while catdog-prep was running")
    try:
        jpg, meta = encode_image(data, opts)
    except Skip as e:
        return (e.reason, e.detail)
    except Exception as e:  # noqa: BLE001 -- a decoder bug on one odd file must not stop the run
        return ("decode_error", f"{type(e).__name__}: {e}")
    meta.update(
        {
            "key": item.key,
            "class": item.class_name,
            "label": item.label,
            "split": item.split,
            "source": item.rel,
            "sha256": item.sha256,
        }
    )
    return sample_bytes(item.key, jpg, str(item.label).encode(), json.dumps(meta, sort_keys=True).encode())


def encode_batch(args: tuple[str, list[Item], EncodeOptions]) -> Encoded:
    """Pool entry point: several items per task so inter-process overhead stays small."""
    src, items, opts = args
    parts, sizes, skips = [], [], []
    for it in items:
        r = encode_item(src, it, opts)
        if isinstance(r, bytes):
            parts.append(r)
            sizes.append(len(r))
            skips.append(None)
        else:
            sizes.append(0)
            skips.append(r)
    return Encoded(b"".join(parts), tuple(sizes), tuple(skips))
