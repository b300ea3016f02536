"""Synthetic test data: an MVTec AD-style category and image files in odd or broken formats.

Good images are one texture distribution: a woven pattern of two gratings with a random
sub-period shift, a smooth random shading and pixel noise, mapped onto a fixed brown
palette. Defective images are good images with a drawn defect: ``scratch`` (a thin line
of dark blue-grey) or ``spot`` (a filled reddish blob). Defects cover about 1-3 % of the
image, so global colour statistics barely move, but they are plainly visible locally.
Everything is deterministic for a ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot")

_DARK = np.array([92.0, 70.0, 48.0])
_LIGHT = np.array([196.0, 168.0, 122.0])


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8 good-looking texture."""
    period = 12.0
    dy, dx = rng.uniform(0, period, size=2)  # small random shift of the pattern
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    weave = 0.5 + 0.25 * np.sin(2 * np.pi * (x + dx) / period) * np.sin(2 * np.pi * (y + dy) / period)
    weave += 0.1 * np.sin(2 * np.pi * (x + y + dx) / (period * 2.5))
    coarse = rng.normal(0.0, 1.0, size=(6, 6)).astype(np.float32)
    shade = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    t = np.clip(weave + 0.06 * shade + rng.normal(0.0, 0.04, size=(size, size)), 0.0, 1.0)
    rgb = _DARK + t[..., None] * (_LIGHT - _DARK) + rng.normal(0.0, 3.0, size=(size, size, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``kind`` on a copy of ``image``; return (image, uint8 0/255 mask)."""
    size = image.shape[0]
    canvas = Image.fromarray(image)
    mask = Image.new("L", (size, size), 0)
    draw, mdraw = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    margin = size * 0.15
    if kind == "scratch":
        x0, y0 = rng.uniform(margin, size - margin, size=2)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.3, 0.45) * size
        x1 = float(np.clip(x0 + length * np.cos(angle), 2, size - 3))
        y1 = float(np.clip(y0 + length * np.sin(angle), 2, size - 3))
        width = max(2, int(round(size / 50)))
        colour = tuple(int(c) for c in rng.integers(30, 60, size=3) + np.array([0, 10, 40]))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)
        mdraw.line([(x0, y0), (x1, y1)], fill=255, width=width)
    elif kind == "spot":
        cx, cy = rng.uniform(margin, size - margin, size=2)
        rx, ry = rng.uniform(0.05, 0.08, size=2) * size
        colour = tuple(int(c) for c in np.array([150, 45, 40]) + rng.integers(-15, 16, size=3))
        box = [(cx - rx, cy - ry), (cx + rx, cy + ry)]
        draw.ellipse(box, fill=colour)
        mdraw.ellipse(box, fill=255)
    else:
        raise ValueError(f"unknown defect type {kind!r}")
    return np.asarray(canvas).copy(), np.asarray(mask).copy()


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def make_mvtec_category(
    root: Path,
    name: str = "synthetic",
    n_train: int = 24,
    n_test_good: int = 8,
    n_test_defect: int = 8,
    size: int = 128,
    seed: int = 0,
    ext: str = ".png",
) -> Path:
    """Write an MVTec AD-layout category under ``root/name`` and return its folder.

    train/good/NNN<ext>, test/good/NNN<ext>, test/{scratch,spot}/NNN<ext> (defects split
    as evenly as possible, scratch first), ground_truth/<type>/NNN_mask.png (0/255, PNG
    whatever ``ext`` is).
    """
    folder = Path(root) / name
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _save(_texture(rng, size), folder / "train" / "good" / f"{i:03d}{ext}")
    for i in range(n_test_good):
        _save(_texture(rng, size), folder / "test" / "good" / f"{i:03d}{ext}")
    counts = {"scratch": (n_test_defect + 1) // 2, "spot": n_test_defect // 2}
    for kind in DEFECT_TYPES:
        (folder / "test" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(counts[kind]):
            image, mask = _draw_defect(_texture(rng, size), kind, rng)
            _save(image, folder / "test" / kind / f"{i:03d}{ext}")
            _save(mask, folder / "ground_truth" / kind / f"{i:03d}_mask.png")
    return folder


def _exif_jpeg(path: Path, orientation: int) -> None:
    """A 60 x 30 (W x H) JPEG, top half red and bottom half blue, with an EXIF Orientation tag."""
    stored = np.zeros((30, 60, 3), dtype=np.uint8)
    stored[:15] = (255, 0, 0)
    stored[15:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif.tobytes())


def write_odd_images(folder: Path) -> dict[str, Path]:
    """Write valid images in unusual formats; return {name: path}.

    gray (L PNG), rgba (left half transparent), la, palette (P), palette_transparent (left
    half the transparent index, grey (120, 120, 120); right half (10, 200, 30)),
    png16 / tif16 (16-bit gradient, top-left 0 and bottom-right 65535, row 0 all 0,
    last row all 65535), png16_12bit (a 12-bit ramp 0..4095 stored in 16 bits), tif_float
    (float32 in [0, 1]), cmyk (JPEG), exif6 / exif8 (see :func:`_exif_jpeg`), multiframe
    (2-frame TIFF; first frame white), upper_ext (RGB named .PNG), bmp, tif_rgb.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    paths: dict[str, Path] = {}

    def out(name: str, filename: str) -> Path:
        paths[name] = folder / filename
        return paths[name]

    Image.fromarray(rgb[..., 0]).save(out("gray", "gray.png"))
    rgba = np.dstack([np.full((20, 30, 3), 200, np.uint8), np.zeros((20, 30), np.uint8)])
    rgba[:, 15:, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(out("rgba", "rgba.png"))
    Image.fromarray(np.dstack([rgb[..., 0], np.full((20, 30), 255, np.uint8)]), mode="LA").save(out("la", "la.png"))
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(out("palette", "palette.png"))
    indices = np.zeros((20, 30), np.uint8)
    indices[:, 15:] = 1
    pal = Image.fromarray(indices, mode="P")
    pal.putpalette([120, 120, 120, 10, 200, 30])
    pal.save(out("palette_transparent", "palette_t.png"), transparency=0)
    ramp = np.linspace(0, 65535, 20).round().astype(np.uint16)[:, None].repeat(30, axis=1)
    Image.fromarray(ramp).save(out("png16", "png16.png"))
    Image.fromarray(ramp).save(out("tif16", "tif16.tif"))
    ramp12 = np.linspace(0, 4095, 20).round().astype(np.uint16)[:, None].repeat(30, axis=1)
    Image.fromarray(ramp12).save(out("png16_12bit", "png16_12bit.png"))
    Image.fromarray(np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30), mode="F").save(out("tif_float", "f.tif"))
    Image.fromarray(rgb).convert("CMYK").save(out("cmyk", "cmyk.jpg"), quality=95)
    _exif_jpeg(out("exif6", "exif6.jpg"), 6)
    _exif_jpeg(out("exif8", "exif8.jpg"), 8)
    frames = [Image.new("RGB", (30, 20), (255, 255, 255)), Image.new("RGB", (30, 20), (0, 0, 0))]
    frames[0].save(out("multiframe", "multi.tif"), save_all=True, append_images=frames[1:])
    Image.fromarray(rgb).save(out("upper_ext", "upper.PNG"))
    Image.fromarray(rgb).save(out("bmp", "rgb.bmp"))
    Image.fromarray(rgb).save(out("tif_rgb", "rgb.tif"))
    return paths


def write_bad_images(folder: Path) -> dict[str, Path]:
    """Write files that must fail to load; return {name: path}.

    truncated (a PNG cut in half), empty (0 bytes .png), text (a text file named .png),
    garbage_jpeg (a JPEG header followed by junk), folder (a directory named .png),
    missing (a path that does not exist).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    full = folder / "_full.png"
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    full.unlink()
    paths = {
        "truncated": folder / "truncated.png",
        "empty": folder / "empty.png",
        "text": folder / "text.png",
        "garbage_jpeg": folder / "garbage.jpg",
        "folder": folder / "dir.png",
        "missing": folder / "missing.png",
    }
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("this is not an image\n")
    paths["garbage_jpeg"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    paths["folder"].mkdir(exist_ok=True)
    return paths
