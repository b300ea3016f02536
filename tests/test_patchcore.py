"""PatchCore: accuracy on synthetic defects and reference checks of its scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscope.components.embedding import layer_scales, weigh_layers
from defectscope.data.images import load_image, preprocess
from defectscope.data.layouts import mvtec_category
from defectscope.detectors.patchcore import PatchCore
from defectscope.evaluation.metrics import image_auroc

SIZE = 128


def _tensors(paths, detector):
    mean, std = detector.input_stats
    return torch.stack([preprocess(load_image(p), SIZE, mean, std) for p in paths])


@pytest.fixture(scope="module")
def fitted(synthetic_category):
    split = mvtec_category(synthetic_category)
    det = PatchCore(image_size=SIZE, coreset_ratio=0.25, seed=0)
    det.fit(_tensors(split.train, det))
    test = _tensors([s.path for s in split.test], det)
    labels = np.array([s.label for s in split.test])
    return det, split, test, labels


def test_synthetic_image_auroc(fitted):
    det, _, test, labels = fitted
    pred = det.predict(test)
    assert pred.scores.shape == (len(labels),)
    assert pred.maps.shape == (len(labels), SIZE, SIZE)
    assert image_auroc(labels, pred.scores) >= 0.95


def test_map_peaks_on_defect(fitted, synthetic_category):
    from defectscope.data.images import load_mask

    det, split, test, _labels = fitted
    pred = det.predict(test)
    hits = 0
    defective = [i for i, s in enumerate(split.test) if s.label == 1]
    for i in defective:
        mask = load_mask(split.test[i].mask_path, size=(SIZE, SIZE))
        y, x = np.unravel_index(pred.maps[i].argmax(), pred.maps[i].shape)
        # the hottest pixel lies on (or within a few pixels of) the drawn defect
        ys, xs = np.nonzero(mask)
        hits += np.min(np.hypot(ys - y, xs - x)) <= 6
    assert hits >= 0.8 * len(defective)


def test_scores_invariant_to_batch_size(fitted):
    det, _, test, _ = fitted
    whole = det.predict(test)
    batched = det.predict([test[i : i + 3] for i in range(0, len(test), 3)])
    np.testing.assert_allclose(batched.scores, whole.scores, rtol=1e-4, atol=1e-5)  # float32 rounding only
    np.testing.assert_allclose(batched.maps, whole.maps, rtol=1e-4, atol=1e-4)


def _reweighted_reference(bank: np.ndarray, patches: np.ndarray, b: int) -> float:
    """Paper eq. 7 written out plainly with numpy (float64)."""
    d = np.linalg.norm(patches[:, None, :] - bank[None], axis=-1)  # (P, M)
    nn = d.argmin(1)
    s_patch = d[np.arange(len(patches)), nn]
    p_star = s_patch.argmax()
    s_star = s_patch[p_star]
    m_star = nn[p_star]
    d_bank = np.linalg.norm(bank - bank[m_star], axis=1)
    neighbourhood = np.argsort(d_bank, kind="stable")[:b]
    assert m_star in neighbourhood
    dist_to_test = np.linalg.norm(bank[neighbourhood] - patches[p_star], axis=1)
    w = 1 - np.exp(d[p_star, m_star]) / np.exp(dist_to_test).sum()
    return float(w * s_star)


def test_image_score_matches_equation_7(fitted):
    det, _, test, _ = fitted
    bank = det.memory_bank_.double().numpy()
    feats = det._patch_features(test[:4])
    pred = det.predict(test[:4])
    for i in range(4):
        patches = feats[i].reshape(-1, feats.shape[-1]).double().numpy()
        ref = _reweighted_reference(bank, patches, det.num_neighbors)
        assert pred.scores[i] == pytest.approx(ref, rel=1e-4)


def _with_bank(det, bank):
    """A PatchCore sharing det's extractor and parameters whose memory bank is ``bank``."""
    ref = PatchCore(image_size=SIZE, num_neighbors=det.num_neighbors)
    ref.set_extractor(det.extractor)
    ref.load_state(
        {
            "memory_bank": bank,
            "bank_image": torch.zeros(len(bank), dtype=torch.int64),
            "grid": torch.tensor(det.grid_),
            "n_train": torch.tensor(det.n_train_),
            "training_scores": det.training_scores_,
        }
    )
    return ref


def test_held_out_scores_use_the_bank_without_the_image_fold(fitted):
    """Training score i == score of image i against the bank entries chosen from the other folds."""
    det, split, _, _ = fitted
    train = _tensors(split.train, det)
    held_out = det.training_scores()
    assert held_out.shape == (len(split.train),)
    folds = det._image_folds(len(split.train))
    assert sorted(set(folds.tolist())) == list(range(det.folds))
    for i in (0, 5, 11):
        keep = folds[det.bank_image_] != folds[i]
        assert 0 < int(keep.sum()) < len(keep)
        ref = _with_bank(det, det.memory_bank_[keep])
        assert held_out[i] == pytest.approx(float(ref.predict(train[i : i + 1]).scores[0]), rel=1e-4)
    assert np.median(held_out) > 0


def test_a_fold_never_influences_the_other_folds_entries(fitted):
    """Changing one fold's images leaves every other fold's bank entries as they were: a held-out
    image's bank was fitted without it, so the threshold it gives is honest."""
    det, split, _, _ = fitted
    train = _tensors(split.train, det)
    folds = det._image_folds(len(split.train))
    changed = train.clone()
    changed[folds == 1] = torch.flip(changed[folds == 1], dims=[-1]) * 0.5
    again = PatchCore(image_size=SIZE, coreset_ratio=0.25, seed=0)
    again.set_extractor(det.extractor)
    again.fit(changed)
    for f in (0, 2, 3, 4):
        mine, theirs = folds[det.bank_image_] == f, folds[again.bank_image_] == f
        assert torch.equal(det.memory_bank_[mine], again.memory_bank_[theirs])
    assert not torch.equal(
        det.memory_bank_[folds[det.bank_image_] == 1], again.memory_bank_[folds[again.bank_image_] == 1]
    )


def test_exact_mode_selects_once_over_all_patches_and_refits_per_fold(synthetic_category):
    """coreset='exact': the bank is the greedy k-center of all patches (Alg. 1); a held-out score is
    the score against a greedy k-center selected anew on the other folds' patches."""
    from defectscope.components.coreset import kcenter

    split = mvtec_category(synthetic_category)
    det = PatchCore(image_size=SIZE, coreset_ratio=0.1, coreset="exact", folds=3, seed=1)
    train = _tensors(split.train[:9], det)
    det.fit(train)
    feats = det._patch_features(train)
    flat = feats.reshape(-1, feats.shape[-1])
    want = kcenter(flat, det.bank_size_for(flat.shape[0]), seed=1)
    assert torch.equal(det.memory_bank_, flat[want.indices])
    folds = det._image_folds(9)
    i = 4
    others = feats[folds != folds[i]].reshape(-1, feats.shape[-1])
    fold_bank = others[kcenter(others, det.bank_size_for(others.shape[0]), seed=1).indices]
    ref = _with_bank(det, fold_bank)
    assert det.training_scores()[i] == pytest.approx(float(ref.predict(train[i : i + 1]).scores[0]), rel=1e-4)


def test_bank_size_is_capped_and_threshold_images_bounded(synthetic_category):
    split = mvtec_category(synthetic_category)
    det = PatchCore(image_size=SIZE, coreset_ratio=0.5, max_bank_size=100, threshold_images=4, seed=0)
    train = _tensors(split.train[:8], det)
    det.fit(train)
    assert det.memory_bank_.shape[0] == 100 == det.fit_details_["n_selected"]
    assert det.training_scores().shape == (4,) and det.fit_details_["n_threshold_images"] == 4
    assert "100" in det.fit_details_["bank_size_rule"]


def test_same_seed_same_model(synthetic_category):
    split = mvtec_category(synthetic_category)
    models = []
    for seed in (3, 3, 4):
        det = PatchCore(image_size=SIZE, coreset_ratio=0.1, seed=seed)
        det.fit(_tensors(split.train[:8], det))
        models.append(det.memory_bank_)
    assert torch.equal(models[0], models[1])
    assert not torch.equal(models[0], models[2])


def test_not_fitted_error():
    from defectscope.errors import NotFittedError

    with pytest.raises(NotFittedError, match="not fitted"):
        PatchCore().predict(torch.zeros(1, 3, SIZE, SIZE))


@pytest.mark.parametrize(
    "bad",
    [
        {"coreset_ratio": 0},
        {"coreset_ratio": 1.5},
        {"patch_size": 2},
        {"num_neighbors": 0},
        {"coreset": "random"},
        {"folds": 1},
        {"max_bank_size": 0},
        {"threshold_images": 0},
    ],
)
def test_invalid_parameters_fail_at_fit(bad):
    from defectscope.errors import DefectscopeError

    det = PatchCore(image_size=SIZE, **bad)
    with pytest.raises(DefectscopeError, match=next(iter(bad))):
        det.fit(torch.zeros(2, 3, SIZE, SIZE))


def test_default_selection_covers_every_patch_within_its_radius(fitted):
    """Every training patch lies within the reported coverage radius of a bank entry, and that radius
    is within 1.5x the radius of the exact greedy k-center of all patches (measured 1.1x here)."""
    from defectscope.components.coreset import kcenter

    det, split, _, _ = fitted
    feats = det._patch_features(_tensors(split.train, det))
    flat = feats.reshape(-1, feats.shape[-1])
    nearest = torch.cdist(flat.double(), det.memory_bank_.double()).min(dim=1).values
    info = det.fit_details_
    assert info["coreset"] == "folds" and info["radius_space"] == "features" and info["n_patches"] == flat.shape[0]
    assert info["n_selected"] == det.memory_bank_.shape[0]
    assert float(nearest.max()) <= info["coverage_radius"] * (1 + 1e-5)
    exact = kcenter(flat, det.memory_bank_.shape[0], seed=0)
    assert info["coverage_radius"] <= 1.5 * float(exact.sq_dist.max().sqrt())


@pytest.mark.parametrize("knn_index", ["ivf", "hnsw"])
def test_approximate_index_never_finds_closer_than_exact(fitted, knn_index):
    """An approximate index returns true distances of real bank entries: maps >= exact maps."""
    det, _, test, labels = fitted
    approx = PatchCore(image_size=SIZE, coreset_ratio=det.coreset_ratio, knn_index=knn_index)
    approx.set_extractor(det.extractor)
    approx.load_state(det.state_dict())
    assert approx.index.index == knn_index
    exact, fast = det.predict(test), approx.predict(test)
    before_blur = approx._patch_features(test[:4])
    d_exact = det.index.search(before_blur.reshape(-1, before_blur.shape[-1]), 1)[0]
    d_fast = approx.index.search(before_blur.reshape(-1, before_blur.shape[-1]), 1)[0]
    assert bool((d_fast >= d_exact - 1e-3).all())  # (flat L2 via |q|^2 - 2qb + |b|^2 rounds in float32)
    assert float((d_fast <= d_exact + 1e-3).float().mean()) >= 0.95  # recall@1 on these patches
    assert image_auroc(labels, fast.scores) == pytest.approx(image_auroc(labels, exact.scores), abs=0.02)


def test_knn_index_is_validated():
    from defectscope.errors import DefectscopeError

    for bad, match in (({"knn_index": "annoy"}, "knn_index"), ({"knn_index": "ivf", "knn_backend": "torch"}, "faiss")):
        with pytest.raises(DefectscopeError, match=match):
            PatchCore(image_size=SIZE, **bad).fit(torch.zeros(2, 3, SIZE, SIZE))


# ------------------------------------------------------------------ rotation-augmented memory banks
def test_rotate_images_turns_about_the_centre():
    from defectscope.components.rotation import rotate_images, rotation_angles

    assert rotation_angles(4) == [0.0, 90.0, 180.0, 270.0] and rotation_angles(1) == [0.0]
    x = torch.rand(2, 3, 32, 32)
    assert rotate_images(x, 0.0) is x and torch.equal(rotate_images(x, 360.0), x)
    quarter = rotate_images(x, 90.0)  # exact: torch.rot90, counter-clockwise as displayed
    assert torch.equal(quarter, torch.rot90(x, 1, dims=(-2, -1)))
    resampled = rotate_images(x, 90.0 + 1e-9)  # grid_sample path: the same turn, up to float rounding
    assert torch.allclose(resampled, quarter, atol=1e-4)
    # a blob right of the centre, turned 45 degrees counter-clockwise as displayed, ends up right and above it
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((xs - 24.0) ** 2 + (ys - 15.5) ** 2) / 4.0).expand(1, 1, 32, 32)
    out = rotate_images(blob, 45.0)[0, 0]
    c = np.cos(np.pi / 4) * 8.5
    assert float((out * xs).sum() / out.sum()) == pytest.approx(15.5 + c, abs=0.1)
    assert float((out * ys).sum() / out.sum()) == pytest.approx(15.5 - c, abs=0.1)


def test_rotations_one_reproduces_the_plain_bank(synthetic_category):
    """rotations=1 (the default) stores each image once, as given: the bank is the one the fold selection
    makes from the plain patch features, bit for bit."""
    from defectscope.components.feature_store import FeatureStore

    split = mvtec_category(synthetic_category)
    det = PatchCore(image_size=SIZE, coreset_ratio=0.25, seed=0, rotations=1)
    train = _tensors(split.train[:10], det)
    det.fit(train)
    plain = PatchCore(image_size=SIZE, coreset_ratio=0.25, seed=0)
    plain.set_extractor(det.extractor)
    with torch.inference_mode(), FeatureStore(det.memory_bank_.shape[1]) as store:
        feats = plain._patch_features(train)
        store.append(feats.reshape(-1, feats.shape[-1]))
        plain._fit_from_store(store, (feats.shape[1], feats.shape[2]))
    assert torch.equal(det.memory_bank_, plain.memory_bank_) and torch.equal(det.bank_image_, plain.bank_image_)
    assert torch.equal(det.training_scores_, plain.training_scores_)
    assert det.fit_details_["rotations"] == 1


@pytest.mark.parametrize("coreset", ["folds", "exact"])
def test_rotated_copies_stay_in_their_image_fold(fitted, coreset):
    """Every rotated copy belongs to its source image: bank_image_ names the source, changing one fold's
    images leaves the other folds' entries bit-identical, and a held-out score is the score of the image
    as given against the bank without its fold (so none of its copies)."""
    det, split, _, _ = fitted
    train = _tensors(split.train[:15], det)
    params = {"image_size": SIZE, "coreset_ratio": 0.1, "seed": 0, "rotations": 3, "folds": 3, "coreset": coreset}
    rot = PatchCore(**params)
    rot.set_extractor(det.extractor)
    rot.fit(train)
    n_grid = rot.grid_[0] * rot.grid_[1]
    assert rot.fit_details_["n_patches"] == 15 * 3 * n_grid
    assert int(rot.bank_image_.max()) < 15
    folds = rot._image_folds(15)
    for i in (0, 7):
        keep = folds[rot.bank_image_] != folds[i]
        ref = _with_bank(rot, rot.memory_bank_[keep] if coreset == "folds" else _refit_bank(rot, train, folds, i))
        assert rot.training_scores()[i] == pytest.approx(float(ref.predict(train[i : i + 1]).scores[0]), rel=1e-4)
    if coreset == "exact":
        return
    changed = train.clone()
    changed[folds == 1] = torch.flip(changed[folds == 1], dims=[-1]) * 0.5
    again = PatchCore(**params)
    again.set_extractor(det.extractor)
    again.fit(changed)
    for f in (0, 2):
        mine, theirs = folds[rot.bank_image_] == f, folds[again.bank_image_] == f
        assert torch.equal(rot.memory_bank_[mine], again.memory_bank_[theirs])
    assert not torch.equal(
        rot.memory_bank_[folds[rot.bank_image_] == 1], again.memory_bank_[folds[again.bank_image_] == 1]
    )


def _refit_bank(det, train, folds, i):
    """Exact mode's bank without image i's fold: greedy k-center over the other images' patches, all angles."""
    from defectscope.components.coreset import kcenter
    from defectscope.components.rotation import rotate_images, rotation_angles

    feats = torch.stack([det._patch_features(rotate_images(train, a)) for a in rotation_angles(det.rotations)], 1)
    flat = feats[folds != folds[i]].reshape(-1, feats.shape[-1])
    return flat[kcenter(flat, det.bank_size_for(flat.shape[0]), seed=det.seed).indices]


def test_rotations_learn_a_part_at_other_angles():
    """A part learned at one orientation: a good photo of it turned by 90 or 135 degrees scores lower
    (less anomalous) with rotations=8 than without."""
    from rotated import part_template, photograph

    rng = np.random.default_rng(0)
    part, silhouette = part_template(0)
    shots = [photograph(part, silhouette, 0.0, tuple(rng.uniform(-4, 4, 2)), 160, rng)[0] for _ in range(6)]
    turned = [photograph(part, silhouette, a, (0.0, 0.0), 160, rng)[0] for a in (90.0, 135.0)]
    scores = {}
    for r in (1, 8):
        det = PatchCore(image_size=96, coreset_ratio=0.25, folds=3, seed=0, rotations=r)
        mean, std = det.input_stats
        det.fit(torch.stack([preprocess(s, 96, mean, std) for s in shots]))
        scores[r] = det.predict(torch.stack([preprocess(t, 96, mean, std) for t in turned])).scores
    assert np.all(scores[8] < 0.8 * scores[1]), scores


@pytest.mark.parametrize("bad", [0, 361, 2.5, True])
def test_rotations_are_validated(bad):
    from defectscope.errors import DefectscopeError

    with pytest.raises(DefectscopeError, match="rotations"):
        PatchCore(image_size=SIZE, rotations=bad).fit(torch.zeros(2, 3, SIZE, SIZE))


@pytest.mark.parametrize("border", ["zeros", "exclude"])
def test_local_average_matches_brute_force(border):
    """Each cell's p x p neighbourhood mean: over all p^2 cells with zeros outside the map ("zeros", the
    reference implementation's padding) or over the cells inside the map only ("exclude")."""
    from defectscope.components.embedding import local_average

    maps = torch.rand(2, 3, 6, 5)
    (out,) = local_average([maps], 3, border)
    expected = torch.empty_like(maps)
    for y in range(6):
        for x in range(5):
            window = maps[:, :, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
            total = window.sum(dim=(2, 3))
            expected[:, :, y, x] = total / (9 if border == "zeros" else window.shape[2] * window.shape[3])
    assert torch.allclose(out, expected, atol=1e-6)


def test_border_padding_is_checked_and_reaches_the_features():
    with pytest.raises(Exception, match="border_padding"):
        PatchCore(border_padding="reflect").fit(torch.zeros(2, 3, 64, 64))
    images = torch.rand(1, 3, 128, 128)
    zeros, exclude = PatchCore(image_size=128), PatchCore(image_size=128, border_padding="exclude")
    exclude.set_extractor(zeros.extractor)
    a, b = zeros._patch_features(images), exclude._patch_features(images)  # 16 x 16, the deeper layer's 8 x 8 upsampled
    assert torch.equal(a[:, 4:-4, 4:-4], b[:, 4:-4, 4:-4])  # cells whose neighbourhoods lie inside both maps
    assert not torch.allclose(a[:, 0, 0], b[:, 0, 0])


def test_layer_weighting_is_checked_and_gives_every_layer_the_same_share():
    with pytest.raises(Exception, match="layer_weighting"):
        PatchCore(layer_weighting="layers").fit(torch.zeros(2, 3, 64, 64))
    images = torch.rand(2, 3, 128, 128)
    plain, equal = PatchCore(image_size=128, layer_weighting="channels"), PatchCore(image_size=128)
    assert equal.layer_weighting == "equal"  # the default
    equal.set_extractor(plain.extractor)
    a, b = plain._patch_features(images), equal._patch_features(images)
    widths = [m.shape[1] for m in plain._features(images)]  # lite0: blocks.2 40, blocks.4 112
    assert len(set(widths)) > 1 and a.shape == b.shape and a.shape[-1] == sum(widths)
    # brute force: layer l's channels times sqrt(total / (L x C_l)), i.e. each channel repeated that often
    start, total = 0, sum(widths)
    for c in widths:
        scale = (total / (len(widths) * c)) ** 0.5
        assert torch.allclose(b[..., start : start + c], a[..., start : start + c] * scale, rtol=1e-5, atol=1e-6)
        start += c
    # every layer now carries the same weight (channel count x squared scale); channels: its width
    assert [c * s * s for c, s in zip(widths, layer_scales(widths, "equal"))] == pytest.approx([total / 2] * 2)
    assert layer_scales(widths, "channels") == [1.0, 1.0]
    # layers of equal width are left as they are
    same = [torch.rand(1, 4, 8, 8), torch.rand(1, 4, 8, 8)]
    assert all(torch.equal(x, y) for x, y in zip(weigh_layers(same, "equal"), same))
