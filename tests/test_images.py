"""load_image / load_mask / preprocess on odd formats and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import write_bad_images, write_odd_images

from defectscope.data.images import IMAGE_EXTENSIONS, load_image, load_mask, preprocess
from defectscope.errors import DefectscopeError, ImageLoadError

ODD_NAMES = [
    "gray",
    "rgba",
    "la",
    "palette",
    "palette_transparent",
    "png16",
    "tif16",
    "png16_12bit",
    "tif_float",
    "cmyk",
    "exif6",
    "exif8",
    "multiframe",
    "upper_ext",
    "bmp",
    "tif_rgb",
]
BAD_NAMES = ["truncated", "empty", "text", "garbage_jpeg", "folder", "missing"]


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_odd_images(tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_bad_images(tmp_path_factory.mktemp("bad"))


def test_extensions_are_lower_case_with_dot() -> None:
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} <= set(IMAGE_EXTENSIONS)


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_formats_load_as_rgb_uint8(odd: dict[str, Path], name: str) -> None:
    image = load_image(odd[name])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    expected = (60, 30) if name.startswith("exif") else (20, 30)
    assert image.shape[:2] == expected


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    for ext in (".png", ".bmp", ".tif", ".TIFF"):
        path = tmp_path / f"x{ext}"
        Image.fromarray(rgb).save(path, format="TIFF" if ext == ".TIFF" else None)
        np.testing.assert_array_equal(load_image(path), rgb)


def test_grayscale_repeats_the_channel(odd: dict[str, Path]) -> None:
    image = load_image(odd["gray"])
    gray = np.asarray(Image.open(odd["gray"]))
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], gray)


def test_palette_matches_its_rgb_conversion(odd: dict[str, Path]) -> None:
    np.testing.assert_array_equal(load_image(odd["palette"]), np.asarray(Image.open(odd["palette"]).convert("RGB")))


def test_alpha_is_composited_over_black(odd: dict[str, Path]) -> None:
    image = load_image(odd["rgba"])  # left half fully transparent (200, 200, 200), right half opaque
    assert (image[:, :15] == 0).all()
    assert (image[:, 15:] == 200).all()
    transparent = load_image(odd["palette_transparent"])  # left half is the transparent index
    assert (transparent[:, :15] == 0).all()
    assert (transparent[:, 15:] == (10, 200, 30)).all()
    la = load_image(odd["la"])  # opaque LA: same as the gray values
    np.testing.assert_array_equal(la[..., 0], np.asarray(Image.open(odd["la"]))[..., 0])


@pytest.mark.parametrize("name", ["png16", "tif16"])
def test_16bit_is_scaled_by_bit_depth(odd: dict[str, Path], name: str) -> None:
    raw = np.asarray(Image.open(odd[name])).astype(np.float64)
    image = load_image(odd[name])
    assert raw.max() == 65535
    assert image[0].max() == 0 and image[-1].min() == 255
    np.testing.assert_array_equal(image[..., 0], np.rint(raw * 255 / 65535).astype(np.uint8))
    assert len(np.unique(image[..., 0])) == 20  # the ramp keeps all its levels (no clipping at 255)


def test_12bit_values_in_16bit_file_are_not_stretched(odd: dict[str, Path]) -> None:
    image = load_image(odd["png16_12bit"])
    assert image.max() == round(4095 * 255 / 65535)  # 16, not 255


def test_float_tiff_in_unit_range_scales_by_255(odd: dict[str, Path]) -> None:
    raw = np.asarray(Image.open(odd["tif_float"]))
    np.testing.assert_array_equal(load_image(odd["tif_float"])[..., 1], np.rint(raw * 255).astype(np.uint8))


def test_float_tiff_out_of_range_is_stretched(tmp_path: Path) -> None:
    raw = np.array([[-10.0, 0.0], [10.0, np.nan]], dtype=np.float32)
    Image.fromarray(raw, mode="F").save(tmp_path / "f.tif")
    image = load_image(tmp_path / "f.tif")[..., 0]
    assert image[0, 0] == 0 and image[1, 0] == 255 and image[0, 1] == 128


def test_cmyk_is_close_to_source_rgb(odd: dict[str, Path]) -> None:
    image = load_image(odd["cmyk"]).astype(int)
    reference = np.asarray(Image.open(odd["upper_ext"]), dtype=int)
    assert np.abs(image - reference).mean() < 20  # JPEG + CMYK round trip, but the same picture


def test_exif_orientation_is_applied(odd: dict[str, Path]) -> None:
    # stored 60 wide x 30 high, top red / bottom blue
    rot6 = load_image(odd["exif6"]).astype(int)  # 6: rotate 90 deg clockwise -> top goes right
    assert rot6.shape[:2] == (60, 30)
    assert rot6[:, 22:, 0].mean() > 200 and rot6[:, 22:, 2].mean() < 50
    assert rot6[:, :8, 2].mean() > 200 and rot6[:, :8, 0].mean() < 50
    rot8 = load_image(odd["exif8"]).astype(int)  # 8: rotate 90 deg counter-clockwise -> top goes left
    assert rot8.shape[:2] == (60, 30)
    assert rot8[:, :8, 0].mean() > 200 and rot8[:, 22:, 2].mean() > 200


def test_multiframe_gives_first_frame(odd: dict[str, Path]) -> None:
    assert Image.open(odd["multiframe"]).n_frames == 2
    assert (load_image(odd["multiframe"]) == 255).all()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_files_raise_with_path_in_one_line(bad: dict[str, Path], name: str) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_image(bad[name])
    message = str(info.value)
    assert message.startswith(f"{bad[name]}: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    "name, words",
    [
        ("empty", "empty (0 bytes)"),
        ("text", "not an image file"),
        ("truncated", "truncated or corrupt"),
        ("missing", "not found"),
        ("folder", "folder"),
    ],
)
def test_bad_file_messages_say_what_is_wrong(bad: dict[str, Path], name: str, words: str) -> None:
    with pytest.raises(ImageLoadError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_image(bad[name])


def test_bad_masks_raise_too(bad: dict[str, Path]) -> None:
    with pytest.raises(ImageLoadError, match="truncated"):
        load_mask(bad["truncated"])


def test_load_mask_grayscale_and_rgb(tmp_path: Path) -> None:
    mask = np.zeros((12, 16), np.uint8)
    mask[2:5, 3:9] = 255
    mask[8, 1] = 1  # any non-zero value counts
    Image.fromarray(mask).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), mask > 0)
    rgb = np.zeros((12, 16, 3), np.uint8)
    rgb[4, 5, 2] = 7  # only the blue channel set
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out = load_mask(tmp_path / "rgb.png")
    assert out.dtype == bool and out.shape == (12, 16) and out.sum() == 1 and out[4, 5]


def test_load_mask_resizes_with_nearest(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    big = load_mask(tmp_path / "m.png", size=(16, 32))
    assert big.shape == (16, 32) and big.dtype == bool
    expected = np.zeros((16, 32), bool)
    expected[:8, :16] = True
    np.testing.assert_array_equal(big, expected)
    assert set(np.unique(load_mask(tmp_path / "m.png", size=(5, 3)))) <= {False, True}


def test_preprocess_shape_and_normalisation() -> None:
    image = np.full((40, 60, 3), (255, 0, 51), np.uint8)
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.25, 0.2)
    x = preprocess(image, 32, mean, std)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = [(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (0.2 - 0.1) / 0.2]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((32, 32), expected[c]), atol=1e-5)


def test_preprocess_matches_torch_reference_resize() -> None:
    image = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    x = preprocess(image, 24, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    ref = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    ref = torch.nn.functional.interpolate(ref, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)[0]
    assert torch.allclose(x, ref, atol=1e-6)
    # antialiasing: a fine checkerboard downsampled 4x averages to ~0.5, not aliased to 0 or 1
    board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    small = preprocess(board, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert (small - 0.5).abs().max() < 0.05


def test_preprocess_same_size_is_only_normalised() -> None:
    image = np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = preprocess(image, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.allclose(x, torch.from_numpy(image).permute(2, 0, 1).float() / 255)


def test_preprocess_rejects_wrong_input() -> None:
    with pytest.raises(DefectscopeError):
        preprocess(np.zeros((8, 8), np.uint8), 4, (0, 0, 0), (1, 1, 1))
    with pytest.raises(DefectscopeError):
        preprocess(np.zeros((8, 8, 3), np.float32), 4, (0, 0, 0), (1, 1, 1))
    with pytest.raises(DefectscopeError):
        preprocess(np.zeros((8, 8, 3), np.uint8), 4, (0, 0), (1, 1))
