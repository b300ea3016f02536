"""Alignment: transforms recovered from ORB matches, maps back in the photo's frame, flags, model file, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rotated import make_rotated_category, part_template, photograph

from defectscope.cli.commands import main
from defectscope.components.align import Aligner, AlignResult, make_aligner
from defectscope.data.images import load_image, load_mask, preprocess
from defectscope.data.layouts import good_images, load_category
from defectscope.data.loader import iter_batches
from defectscope.detectors import make_detector
from defectscope.errors import DefectscopeError
from defectscope.evaluation.evaluate import evaluate_detector
from defectscope.fitting import fit_detector
from defectscope.io import load_model, load_model_with_extras, save_model

SIZE = 160


@pytest.fixture(scope="module")
def part() -> tuple[np.ndarray, np.ndarray]:
    return part_template(0)


@pytest.fixture(scope="module")
def reference(part) -> tuple[np.ndarray, np.ndarray]:
    """The part at angle 0, centred: (image, template -> photo matrix)."""
    image, _, matrix = photograph(*part, 0.0, (0.0, 0.0), SIZE, np.random.default_rng(0))
    return image, matrix


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rotated_category(
        tmp_path_factory.mktemp("rotated"), n_train=12, n_test_good=6, n_test_defect=6, size=SIZE, seed=1
    )


def _expected(matrix_photo: np.ndarray, matrix_ref: np.ndarray) -> np.ndarray:
    """photo -> reference = (template -> reference) o (template -> photo)^-1, as (2, 3)."""
    full = lambda m: np.vstack([m, [0.0, 0.0, 1.0]])  # noqa: E731
    return (full(matrix_ref) @ np.linalg.inv(full(matrix_photo)))[:2]


def _corner_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance between where two affine maps send the image corners (pixels)."""
    corners = np.array([[0, 0, 1], [SIZE, 0, 1], [0, SIZE, 1], [SIZE, SIZE, 1]], dtype=np.float64).T
    return float(np.abs(a @ corners - b @ corners).max())


@pytest.mark.parametrize("angle", [23.0, 141.0, 260.0, 318.0])
def test_rigid_recovers_rotation_and_shift(part, reference, angle: float) -> None:
    aligner = Aligner.from_image("rigid", reference[0])
    image, _, matrix = photograph(*part, angle, (5.0, -4.0), SIZE, np.random.default_rng(int(angle)))
    result = aligner.estimate(image)
    assert result.aligned and result.inliers >= aligner.min_inliers
    assert _corner_error(result.matrix, _expected(matrix, reference[1])) < 2.0
    np.testing.assert_allclose(np.linalg.det(result.matrix[:, :2]), 1.0, atol=1e-9)  # no scale by default
    assert abs((result.angle - angle + 180) % 360 - 180) < 1.5  # undoes the part's turn


@pytest.mark.parametrize("quarter", [0, 1, 2, 3])
def test_rot90_picks_the_quarter_turn(part, reference, quarter: int) -> None:
    aligner = Aligner.from_image("rot90", reference[0])
    image, _, matrix = photograph(*part, 90.0 * quarter, (0.0, 0.0), SIZE, np.random.default_rng(quarter))
    result = aligner.estimate(image)
    assert result.aligned
    assert result.angle == 90.0 * quarter
    assert _corner_error(result.matrix, _expected(matrix, reference[1])) < 1.0
    warped = aligner.warp_image(image, result)
    assert np.abs(warped.astype(float) - reference[0].astype(float)).mean() < 6.0  # noise-level difference


def test_unalignable_image_is_flagged_and_left_as_is(reference) -> None:
    aligner = Aligner.from_image("rigid", reference[0])
    blank = np.full((SIZE, SIZE, 3), 90, np.uint8)
    out, result = aligner(blank)
    assert not result.aligned and result.matrix is None
    assert out is blank
    amap = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    assert aligner.map_to_original(amap, result) is amap


def test_reference_without_keypoints_is_refused() -> None:
    with pytest.raises(DefectscopeError, match="keypoints.*--align-ref"):
        make_aligner("rigid", np.full((64, 64, 3), 128, np.uint8), reference="flat.png")
    assert make_aligner("none", None) is None
    with pytest.raises(DefectscopeError, match="none, rot90, rigid"):
        make_aligner("affine", None)


@pytest.mark.parametrize("grid", [(64, 64), (48, 80)])
def test_map_goes_back_to_the_original_frame(reference, grid) -> None:
    """A spot in the photo, warped to the reference frame and its map warped back, lands on the spot
    (on a square grid, and on a non-square one as an (H, W) input or keep-aspect gives)."""
    aligner = Aligner.from_image("rigid", reference[0])
    # a 200 x 240 photo (not square, not the reference size); a pure rotation + shift, photo -> reference
    matrix = np.array([[0.8, -0.6, 20.0], [0.6, 0.8, -30.0]])
    result = AlignResult(matrix, True, 99, 36.87, (200, 240))
    y, x = 100, 120  # lands at (56, 122) in the 160 x 160 reference frame
    spot = np.zeros((200, 240), np.float32)
    spot[y - 3 : y + 4, x - 3 : x + 4] = 1.0
    warped = aligner.warp_image(np.repeat((spot * 255).astype(np.uint8)[..., None], 3, axis=2), result)
    s_h, s_w = grid
    ref_map = np.asarray(
        Image.fromarray(warped[..., 0].astype(np.float32)).resize((s_w, s_h), Image.Resampling.BILINEAR)
    )
    back = aligner.map_to_original(ref_map, result)
    assert back.shape == (s_h, s_w)
    cy, cx = np.unravel_index(np.argmax(back), back.shape)
    # the spot's centre in the photo, resized to s_h x s_w like the map
    assert abs(cy - ((y + 0.5) * s_h / 200 - 0.5)) <= 1.5 and abs(cx - ((x + 0.5) * s_w / 240 - 0.5)) <= 1.5


def test_loader_applies_the_hook_and_keeps_its_records(rotated: Path) -> None:
    paths = good_images(rotated)[:5]

    def flip(image: np.ndarray) -> tuple[np.ndarray, str]:
        return np.ascontiguousarray(image[:, ::-1]), f"flipped {image.shape[1]}"

    batches = list(iter_batches(paths, 64, (0.5,) * 3, (0.5,) * 3, batch_size=2, transform=flip))
    assert [len(b.transforms) for b in batches] == [2, 2, 1]
    assert all(t == f"flipped {SIZE}" for b in batches for t in b.transforms)
    direct = preprocess(np.ascontiguousarray(load_image(paths[0])[:, ::-1]), 64, (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(batches[0].images[0], direct)
    assert all(b.transforms == [] for b in iter_batches(paths, 64, (0.5,) * 3, (0.5,) * 3, batch_size=2))


def _iou(amap: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the map's top-|mask| pixels with the mask."""
    k = int(mask.sum())
    top = np.zeros(amap.size, bool)
    top[np.argsort(amap.ravel())[-k:]] = True
    top = top.reshape(amap.shape)
    return float((top & mask).sum() / (top | mask).sum())


def test_padim_with_rigid_alignment_beats_no_alignment(rotated: Path) -> None:
    """The issue's acceptance test: image AUROC clearly higher, heatmaps on the drawn defect."""
    split = load_category(rotated)
    train = good_images(rotated)
    aligner = make_aligner("rigid", load_image(train[0]))
    results = {}
    for mode, al in (("none", None), ("rigid", aligner)):
        detector = make_detector("padim", image_size=96, d_reduced=60)  # the rigid one is used below
        meta = fit_detector(detector, train, aligner=al)
        results[mode] = evaluate_detector(detector, split, meta["threshold"], aligner=al)
        if al is not None:
            assert meta["training"]["alignment"]["n_unaligned"] == 0
    none, rigid = results["none"]["image_auroc"], results["rigid"]["image_auroc"]
    assert rigid >= 0.95 and rigid - none >= 0.3, (none, rigid)
    assert results["rigid"]["alignment"] == {"mode": "rigid", "n_unaligned": 0, "unaligned": []}
    assert all(r["aligned"] for r in results["rigid"]["images"])

    # heatmaps in the photo's own frame: rescore the defective images keeping the maps
    from defectscope.scoring import score_paths

    defective = [s for s in split.test if s.label == 1]
    ious, wrong_frame = [], []
    for sample, result in zip(
        defective, score_paths(detector, [s.path for s in defective], 0.0, keep_maps=True, aligner=aligner)
    ):
        mask = load_mask(sample.mask_path, size=(96, 96))
        ious.append(_iou(result.map, mask))
        unwarped = detector.predict(preprocess(aligner(load_image(sample.path))[0], 96, *detector.input_stats)[None])
        wrong_frame.append(_iou(unwarped.maps[0], mask))
    assert np.mean(ious) >= 0.3 and min(ious) > 0.05, ious
    assert np.mean(ious) > np.mean(wrong_frame) + 0.2, (ious, wrong_frame)  # the warp back is what puts it there


def test_model_file_keeps_the_reference(rotated: Path, tmp_path: Path) -> None:
    train = good_images(rotated)
    aligner = make_aligner("rot90", load_image(train[0]), reference=str(train[0]))
    detector = make_detector("padim", image_size=64, d_reduced=20)
    meta = fit_detector(detector, train[:4], aligner=aligner)
    meta["align"] = aligner.config()
    path = save_model(tmp_path / "m.dsm", detector, meta, extra_tensors=aligner.tensors())
    _loaded, meta2, extras = load_model_with_extras(path)
    assert set(extras) == {"align.keypoints", "align.descriptors"}
    again = Aligner.from_model(meta2["align"], extras)
    assert again.mode == "rot90" and again.ref_size == aligner.ref_size
    np.testing.assert_array_equal(again.keypoints, aligner.keypoints)
    np.testing.assert_array_equal(again.descriptors, aligner.descriptors)
    assert Aligner.from_model(meta2["align"], extras, mode="rigid").mode == "rigid"
    assert Aligner.from_model(meta2["align"], extras, mode="none") is None
    assert load_model(path)[0].n_train_ == 4  # the detector's state is untouched by the extra tensors
    with pytest.raises(DefectscopeError, match="fitted without alignment"):
        Aligner.from_model(None, {}, mode="rigid")
    with pytest.raises(ValueError, match="must start with"):
        save_model(tmp_path / "bad.dsm", detector, meta, extra_tensors={"mean": torch.zeros(1)})


def test_cli_fit_and_predict_flag_unaligned_images(rotated: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "aligned.dsm"
    code = main(
        [
            "fit",
            str(rotated),
            "-o",
            str(model),
            "--method",
            "padim",
            "--image-size",
            "64",
            "--d-reduced",
            "20",
            "--align",
            "rigid",
            "--no-progress",
        ]
    )
    assert code == 0
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 80, np.uint8)).save(blank)
    photo = sorted((rotated / "test" / "spot").glob("*.png"))[0]
    capsys.readouterr()
    code = main(["predict", str(model), str(photo), str(blank), "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["aligned"] for r in rows] == [True, False]
    assert "scored unaligned" in err
    code = main(["predict", str(model), str(photo), str(blank), "--no-progress"])
    lines = capsys.readouterr()[0].splitlines()
    assert [line.rsplit(",", 1)[1] for line in lines] == ["1", "0"]  # the aligned column
    code = main(["predict", str(model), str(photo), "--align", "none", "--json", "--no-progress"])
    assert "aligned" not in json.loads(capsys.readouterr()[0])

    plain = tmp_path / "plain.dsm"
    assert (
        main(
            [
                "fit",
                str(rotated),
                "-o",
                str(plain),
                "--method",
                "padim",
                "--image-size",
                "64",
                "--d-reduced",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["predict", str(plain), str(photo), "--align", "rigid", "--no-progress"]) == 2
    assert "fitted without alignment" in capsys.readouterr()[1]


# ------------------------------------------------------------------ silhouette alignment (no keypoints)
@pytest.mark.parametrize("angle", [0.0, 37.0, 123.0, 200.0, 311.0])
def test_silhouette_alignment_recovers_any_angle_and_shift(angle: float) -> None:
    """The L-shaped part turned and shifted: the silhouette pose puts it back onto the reference
    (the reference's outline and the aligned image's outline overlap almost entirely)."""
    import cv2

    from defectscope.components.align import make_aligner

    rng = np.random.default_rng(1)
    part, silhouette = part_template(0)
    reference, _, _ = photograph(part, silhouette, 0.0, (0.0, 0.0), 192, rng)
    photo, _, _ = photograph(part, silhouette, angle, (5.0, -4.0), 192, rng)
    aligner = make_aligner("silhouette", reference)
    warped, result = aligner(photo)
    assert result.aligned
    # cv2 turns counter-clockwise as displayed; result.angle is in pixel coordinates (y down): the same number mod 360
    assert abs((result.angle - angle + 180) % 360 - 180) < 3.0

    def outline(image: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1] > 0

    a, b = outline(reference), outline(warped)
    assert (a & b).sum() / (a | b).sum() > 0.9


def test_silhouette_alignment_is_stored_and_refuses_an_empty_reference(tmp_path: Path) -> None:
    from defectscope.components.align import Aligner, make_aligner

    rng = np.random.default_rng(2)
    part, silhouette = part_template(0)
    reference, _, _ = photograph(part, silhouette, 0.0, (0.0, 0.0), 160, rng)
    aligner = make_aligner("silhouette", reference)
    again = Aligner.from_model(aligner.config(), aligner.tensors())
    assert again is not None and again.pose == pytest.approx(aligner.pose)
    with pytest.raises(DefectscopeError, match="no elongated part found"):
        make_aligner("silhouette", np.full((64, 64, 3), 90, np.uint8))


def test_align_auto_picks_the_candidate_that_aligns_best_and_says_so(rotated: Path, tmp_path: Path, capsys) -> None:
    from defectscope.io import read_metadata

    model = tmp_path / "auto.dsmodel"
    assert (
        main(
            [
                "fit",
                str(rotated),
                "-o",
                str(model),
                "--method",
                "padim",
                "--image-size",
                "64",
                "--d-reduced",
                "20",
                "--align",
                "auto",
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr()[1]
    auto = read_metadata(model)["align"]["auto"]
    scores = {m: c["ncc"] for m, c in auto["candidates"].items() if "ncc" in c}
    assert set(auto["candidates"]) == {"silhouette", "rigid"}  # not the +ecc refinements (see AUTO_CANDIDATES)
    assert scores[auto["chosen"]] == max(scores.values()), auto  # (a tie keeps the earlier candidate)
    assert read_metadata(model)["align"]["mode"] == auto["chosen"]
    assert f"--align auto: chose {auto['chosen']}" in err


def test_silhouette_refuses_round_parts_and_noise_and_scales_other_resolutions() -> None:
    """A disc has no axis and noise is no part: not aligned (flagged), never turned at random. A photo at
    twice the resolution is scaled onto the reference's part."""
    import cv2

    from defectscope.components.align import make_aligner, silhouette_pose

    disc = np.full((160, 160, 3), 60, np.uint8)
    cv2.circle(disc, (80, 80), 40, (200, 200, 200), -1)
    assert silhouette_pose(disc) is None
    noise = np.random.default_rng(0).integers(80, 100, (160, 160, 3)).astype(np.uint8)
    assert silhouette_pose(noise) is None
    rng = np.random.default_rng(3)
    part, silhouette = part_template(0)
    reference, _, _ = photograph(part, silhouette, 0.0, (0.0, 0.0), 192, rng)
    aligner = make_aligner("silhouette", reference)
    assert not aligner(disc[:, :, :])[1].aligned
    big = cv2.resize(photograph(part, silhouette, 70.0, (0.0, 0.0), 192, rng)[0], (384, 384))
    warped, result = aligner(big)
    assert result.aligned and warped.shape == reference.shape
    a = silhouette_pose(reference)
    b = silhouette_pose(warped)
    assert b is not None and abs(b[3] / a[3] - 1) < 0.05  # same part size after alignment


def test_align_auto_counts_failures_against_a_candidate() -> None:
    from defectscope.components.align import Aligner, alignment_quality

    rng = np.random.default_rng(4)
    part, silhouette = part_template(0)
    reference, _, _ = photograph(part, silhouette, 0.0, (0.0, 0.0), 192, rng)
    aligner = Aligner.from_image("silhouette", reference)
    blank = [np.full((192, 192, 3), 70, np.uint8)] * 3  # cannot be aligned: no part
    assert alignment_quality(aligner, reference, blank) == (0.0, 3)


# ------------------------------------------------------------------ ECC refinement
def _photo_and_truth(angle: float, shift: tuple[float, float], seed: int = 1):
    """(reference, photo, the exact photo -> reference matrix) of the L-shaped part at 192 x 192."""
    rng = np.random.default_rng(seed)
    part, silhouette = part_template(0)
    reference, _, m_ref = photograph(part, silhouette, 0.0, (0.0, 0.0), 192, rng)
    photo, _, m_photo = photograph(part, silhouette, angle, shift, 192, rng)
    return reference, photo, _expected(m_photo, m_ref)


@pytest.mark.parametrize(
    "mode,angle", [("silhouette", 37.0), ("silhouette", 123.0), ("silhouette", 311.0), ("rigid", 200.0)]
)
def test_ecc_refined_pose_is_at_least_as_close_as_the_first_pose(mode: str, angle: float) -> None:
    """Known turn and shift: the ECC-refined pose is no further from the truth than the first pose
    (here it is 5-10x closer: silhouette/rigid 0.1-0.8 px, refined <= 0.05 px at the corners)."""
    reference, photo, truth = _photo_and_truth(angle, (5.0, -4.0))
    first = Aligner.from_image(mode, reference).estimate(photo)
    refined = Aligner.from_image(f"{mode}+ecc", reference).estimate(photo)
    assert first.aligned and first.refined is None
    assert refined.aligned and refined.refined is True and refined.as_dict()["refined"] is True
    assert _corner_error(refined.matrix, truth) <= _corner_error(first.matrix, truth) + 0.05
    assert _corner_error(refined.matrix, truth) < 0.2
    assert abs((refined.angle - angle + 180) % 360 - 180) < 0.2


def test_ecc_corrects_a_pose_several_degrees_off() -> None:
    import cv2

    reference, photo, truth = _photo_and_truth(70.0, (3.0, 2.0))
    aligner = Aligner.from_image("silhouette+ecc", reference)
    off = np.vstack([cv2.getRotationMatrix2D((95.5, 95.5), 5.0, 1.0), [0, 0, 1]])
    off[:2, 2] += (3.0, -2.0)
    start = AlignResult((off @ np.vstack([truth, [0, 0, 1]]))[:2], True, 1, 0.0, (192, 192))
    assert _corner_error(start.matrix, truth) > 10
    result = aligner.refine(photo, start)
    assert result.refined is True and _corner_error(result.matrix, truth) < 0.5


def test_ecc_failure_keeps_the_first_pose_and_says_so() -> None:
    import cv2

    reference, photo, truth = _photo_and_truth(70.0, (3.0, 2.0))
    aligner = Aligner.from_image("silhouette+ecc", reference)
    start = AlignResult(np.eye(2, 3), True, 1, 0.0, (192, 192))
    flat = aligner.refine(np.full((192, 192, 3), 70, np.uint8), start)  # nothing to correlate: ECC raises
    assert flat.refined is False and "did not converge" in flat.refine_note
    assert flat.aligned and np.array_equal(flat.matrix, start.matrix)
    # a move beyond the limits (the pose 5 degrees off, at most 1 degree allowed) is refused
    strict = Aligner.from_image("silhouette+ecc", reference, ecc_max_angle=1.0)
    off = np.vstack([cv2.getRotationMatrix2D((95.5, 95.5), 5.0, 1.0), [0, 0, 1]])
    start = AlignResult((off @ np.vstack([truth, [0, 0, 1]]))[:2], True, 1, 0.0, (192, 192))
    far = strict.refine(photo, start)
    assert far.refined is False and "implausibly far" in far.refine_note and np.array_equal(far.matrix, start.matrix)
    # end to end: the image is warped by the silhouette pose, and the record says ECC was not used
    still = Aligner.from_image("silhouette+ecc", reference, ecc_max_angle=0.0, ecc_max_shift=0.0)
    warped, result = still(photo)
    plain = Aligner.from_image("silhouette", reference).estimate(photo)
    assert result.aligned and result.refined is False and np.array_equal(result.matrix, plain.matrix)
    assert np.array_equal(warped, still.warp_image(photo, plain))
    assert result.as_dict()["refined"] is False and "implausibly far" in result.as_dict()["refine_note"]


def test_ecc_mode_is_stored_and_overridable() -> None:
    reference, photo, _ = _photo_and_truth(40.0, (0.0, 0.0))
    aligner = Aligner.from_image("silhouette+ecc", reference, ecc_size=96)
    config, tensors = aligner.config(), aligner.tensors()
    assert tensors["align.ecc_reference"].shape == (96, 96) and config["ecc"]["ecc_size"] == 96
    again = Aligner.from_model(config, tensors)
    assert again.mode == "silhouette+ecc" and again.ecc_size == 96
    np.testing.assert_array_equal(again.ecc_reference, aligner.ecc_reference)
    np.testing.assert_array_equal(again.estimate(photo).matrix, aligner.estimate(photo).matrix)
    assert Aligner.from_model(config, tensors, mode="silhouette").estimate(photo).refined is None
    with pytest.raises(DefectscopeError, match="fitted with --align silhouette\\+ecc"):
        Aligner.from_model(config, tensors, mode="rigid")
    plain = Aligner.from_image("silhouette", reference)
    with pytest.raises(DefectscopeError, match="no ECC reference"):
        Aligner.from_model(plain.config(), plain.tensors(), mode="silhouette+ecc")


def test_cli_align_choices_follow_the_modes() -> None:
    from defectscope.cli.options import ALIGN_CHOICES
    from defectscope.components.align import ALIGN_MODES

    assert list(ALIGN_MODES) == ALIGN_CHOICES


def test_cli_fit_and_predict_with_ecc_record_the_refinement(rotated: Path, tmp_path: Path, capsys) -> None:
    from defectscope.io import read_metadata

    model = tmp_path / "ecc.dsm"
    assert (
        main(
            [
                "fit",
                str(rotated),
                "-o",
                str(model),
                "--method",
                "padim",
                "--image-size",
                "64",
                "--d-reduced",
                "20",
                "--align",
                "silhouette+ecc",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = read_metadata(model)
    assert meta["align"]["mode"] == "silhouette+ecc"
    alignment = meta["training"]["alignment"]
    assert alignment["n_unrefined"] == len(alignment["unrefined"]) <= 2
    photo = sorted((rotated / "test" / "spot").glob("*.png"))[0]
    capsys.readouterr()
    assert main(["predict", str(model), str(photo), "--json", "--no-progress"]) == 0
    row = json.loads(capsys.readouterr()[0])
    assert row["aligned"] is True and isinstance(row["align_refined"], bool)
