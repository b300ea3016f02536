"""Rotation alignment of parts: warp every image into a reference image's frame before scoring.

PaDiM keeps one Gaussian per patch position, and every method compares a test image with
training images patch by patch, so a part photographed at another angle looks anomalous
everywhere. An :class:`Aligner` holds ORB keypoints and descriptors of one reference image
(the first training image, or a file the user names) and, for every new image:

1. detects ORB keypoints, matches their descriptors to the reference's (Hamming distance,
   two nearest neighbours) and keeps matches that pass Lowe's ratio test;
2. estimates a transform from the image to the reference frame:

   * ``rot90``: the best of 0/90/180/270 degrees about the image centre, chosen by the number
     of matches that agree (within ``inlier_tol`` of the reference side) on one translation;
   * ``rigid``: rotation + translation (+ uniform scale with ``allow_scale``), any angle,
     with RANSAC (``cv2.estimateAffinePartial2D``);

3. warps the image into the reference frame (reference width x height).

``silhouette`` needs no keypoints, for parts with little texture or a near-symmetric outline,
where ORB matching fails quietly (screws): the part is separated from a uniform background
(Otsu's threshold on the grey image, the polarity taken from the image border, the largest
connected component), and its pose is read from the image moments: the centroid and the
principal axis (theta = atan2(2 mu11, mu20 - mu02) / 2); the 180-degree ambiguity of an axis is
resolved by the sign of the third moment of the mass along it (which end is heavier). The image
is turned about its centroid onto the reference's axis and shifted onto its centroid.

``silhouette+ecc`` and ``rigid+ecc`` refine that pose by intensity: OpenCV's enhanced
correlation coefficient registration (``cv2.findTransformECC``, Evangelidis & Psarakis 2008,
MOTION_EUCLIDEAN: rotation + shift) between the reference's grey image and the image warped by
the first pose, both reduced to ``ecc_size`` pixels on the longer side and Gaussian-filtered
(``ecc_blur``) for speed and a smoother objective. The correction is composed with the first
pose. When ECC fails (raises: no convergence, images uncorrelated), lowers the correlation, or
moves the pose implausibly far (more than ``ecc_max_angle`` degrees or ``ecc_max_shift`` x the
reference's longer side), the first pose is kept and the result says so (``refined`` False,
``refine_note`` why); the image is aligned and scored all the same.

An image with fewer than ``min_inliers`` agreeing matches is not warped: it is scored as
given and flagged (``AlignResult.aligned`` False), never silently.

Frames: an :class:`AlignResult` matrix maps original-image pixel coordinates to reference
pixel coordinates. :meth:`Aligner.map_to_original` takes an (h, w) anomaly map over the warped
image (the reference frame, on an h x w grid: the model's map with the resize protocol undone)
back to the original frame, on the same h x w grid over the photo, so it lies on the photo the
user gave and matches a ground-truth mask resized to (h, w).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..errors import DefectscopeError, ModelFileError

log = logging.getLogger(__name__)

ALIGN_MODES: tuple[str, ...] = ("none", "rot90", "rigid", "silhouette", "rigid+ecc", "silhouette+ecc")
#: suffix of the modes that refine their pose with ECC
ECC = "+ecc"
#: silhouette alignment needs a part whose principal axes differ by at least this ratio (lengths)
MIN_ELONGATION = 1.15
#: what ``--align auto`` chooses among
#: ``--align auto``'s candidates. The +ecc refinements are left out: they maximise the correlation auto judges
#: by, so they would win whenever they move the pose at all, and on the rotated pill set silhouette+ecc scored
#: lower than silhouette (PatchCore image AUROC 0.9171 against 0.9310; README, "Parts at any angle")
AUTO_CANDIDATES: tuple[str, ...] = ("silhouette", "rigid")
#: training images ``--align auto`` tries each candidate on
AUTO_IMAGES = 20
TENSOR_PREFIX = "align."
"""Model-file tensors of the reference: ``align.keypoints`` (K, 2) float32, ``align.descriptors`` (K, 32) uint8,
and for the ECC modes ``align.ecc_reference`` (h, w) uint8, the reference's reduced grey image."""


@dataclass(frozen=True)
class AlignResult:
    """How one image was aligned.

    matrix: (2, 3) float64 affine map from original pixel coordinates to reference pixel
            coordinates, or None when the image was not warped.
    aligned: False when too few matches agreed; the image was then scored unaligned.
    inliers: matches consistent with the chosen transform.
    angle: rotation of ``matrix`` in degrees (pixel coordinates, y down: clockwise as displayed), 0 if not aligned.
    size: original (H, W) of the image.
    refined: ECC modes only: True when ECC refined the pose, False when it kept the first pose
             (``refine_note`` says why); None when no refinement was tried (other modes, or not aligned).
    """

    matrix: np.ndarray | None
    aligned: bool
    inliers: int
    angle: float
    size: tuple[int, int]
    refined: bool | None = None
    refine_note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (for --json and reports)."""
        out: dict[str, Any] = {"aligned": self.aligned, "inliers": self.inliers, "angle": round(self.angle, 2)}
        if self.refined is not None:
            out["refined"] = self.refined
            if self.refine_note:
                out["refine_note"] = self.refine_note
        return out


def _gray(image: np.ndarray) -> np.ndarray:
    import cv2

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DefectscopeError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


class Aligner:
    """ORB + ratio-test + (rot90 | RANSAC rigid) or silhouette alignment to one reference image, optionally
    refined by ECC (modes ending in ``+ecc``).

    keypoints: (K, 2) float32 reference keypoint coordinates (x, y) in reference pixels.
    descriptors: (K, 32) uint8 ORB descriptors.
    ref_size: reference (H, W).
    ecc_reference: ECC modes: (h, w) uint8 grey reference reduced to ``ecc_size`` on its longer side.
    """

    def __init__(
        self,
        mode: str,
        keypoints: np.ndarray,
        descriptors: np.ndarray,
        ref_size: tuple[int, int],
        *,
        n_features: int = 1500,
        ratio: float = 0.75,
        min_inliers: int = 12,
        allow_scale: bool = False,
        inlier_tol: float = 0.02,
        reference: str | None = None,
        ecc_reference: np.ndarray | None = None,
        ecc_size: int = 160,
        ecc_blur: int = 5,
        ecc_iterations: int = 100,
        ecc_eps: float = 1e-5,
        ecc_max_angle: float = 10.0,
        ecc_max_shift: float = 0.05,
    ) -> None:
        if mode not in ALIGN_MODES or mode == "none":
            raise DefectscopeError(f"alignment mode must be one of {', '.join(ALIGN_MODES[1:])}, got {mode!r}")
        if not 0 < ratio < 1:
            raise DefectscopeError(f"alignment ratio must be in (0, 1), got {ratio}")
        if ecc_size < 16 or ecc_blur < 0 or ecc_iterations < 1 or ecc_max_angle < 0 or ecc_max_shift < 0:
            raise DefectscopeError(
                f"ECC options out of range: ecc_size {ecc_size} (>= 16), ecc_blur {ecc_blur}, "
                f"ecc_iterations {ecc_iterations} (>= 1), ecc_max_angle {ecc_max_angle}, "
                f"ecc_max_shift {ecc_max_shift} (>= 0)"
            )
        self.mode = mode
        self.base_mode = mode.removesuffix(ECC)
        self.ecc = mode.endswith(ECC)
        self.ecc_reference = None if ecc_reference is None else np.ascontiguousarray(ecc_reference, dtype=np.uint8)
        self.ecc_size = int(ecc_size)
        self.ecc_blur = int(ecc_blur)
        self.ecc_iterations = int(ecc_iterations)
        self.ecc_eps = float(ecc_eps)
        self.ecc_max_angle = float(ecc_max_angle)
        self.ecc_max_shift = float(ecc_max_shift)
        self.keypoints = np.asarray(keypoints, dtype=np.float32).reshape(-1, 2)
        self.descriptors = np.asarray(descriptors, dtype=np.uint8).reshape(-1, 32)
        self.ref_size = (int(ref_size[0]), int(ref_size[1]))
        self.n_features = int(n_features)
        self.ratio = float(ratio)
        self.min_inliers = int(min_inliers)
        self.allow_scale = bool(allow_scale)
        self.inlier_tol = float(inlier_tol)
        self.reference = reference
        self.pose: tuple[float, ...] | None = None  # silhouette mode: reference (cx, cy, theta, area)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_image(cls, mode: str, image: np.ndarray, reference: str | None = None, **options: Any) -> Aligner:
        """Build from a reference (H, W, 3) uint8 image; fails when it has too few keypoints (or no silhouette)."""
        probe = cls(mode, np.zeros((0, 2)), np.zeros((0, 32)), image.shape[:2], reference=reference, **options)
        if probe.ecc:
            probe.ecc_reference = probe._ecc_gray(_gray(image))
        if probe.base_mode == "silhouette":
            pose = silhouette_pose(image)
            if pose is None:
                raise DefectscopeError(
                    f"alignment reference {reference or 'image'}: no elongated part found against "
                    "the background (--align silhouette needs a part with a clear long axis on a "
                    "uniform background; round parts have none: use --align rigid or none)"
                )
            probe.pose = pose
            return probe
        pts, desc = probe._detect(image)
        if len(pts) < probe.min_inliers:
            raise DefectscopeError(
                f"alignment reference {reference or 'image'} has only {len(pts)} ORB keypoints "
                f"(need {probe.min_inliers}): choose a sharper, more textured reference with --align-ref"
            )
        probe.keypoints, probe.descriptors = pts, desc
        return probe

    def config(self) -> dict[str, Any]:
        """JSON metadata stored in the model file (the keypoints go in :meth:`tensors`)."""
        return {
            "mode": self.mode,
            "ref_size": list(self.ref_size),
            "n_features": self.n_features,
            "ratio": self.ratio,
            "min_inliers": self.min_inliers,
            "allow_scale": self.allow_scale,
            "inlier_tol": self.inlier_tol,
            "reference": self.reference,
            "n_keypoints": len(self.keypoints),
            **({"pose": list(self.pose)} if self.pose is not None else {}),
            **({"ecc": self._ecc_options()} if self.ecc else {}),
        }

    def _ecc_options(self) -> dict[str, Any]:
        return {
            "ecc_size": self.ecc_size,
            "ecc_blur": self.ecc_blur,
            "ecc_iterations": self.ecc_iterations,
            "ecc_eps": self.ecc_eps,
            "ecc_max_angle": self.ecc_max_angle,
            "ecc_max_shift": self.ecc_max_shift,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The reference keypoints and descriptors (and ECC's reduced grey reference) as named tensors."""
        out = {
            f"{TENSOR_PREFIX}keypoints": torch.from_numpy(self.keypoints.copy()),
            f"{TENSOR_PREFIX}descriptors": torch.from_numpy(self.descriptors.copy()),
        }
        if self.ecc_reference is not None:
            out[f"{TENSOR_PREFIX}ecc_reference"] = torch.from_numpy(self.ecc_reference.copy())
        return out

    @classmethod
    def from_model(
        cls, config: dict[str, Any] | None, tensors: dict[str, torch.Tensor], mode: str | None = None
    ) -> Aligner | None:
        """Rebuild from a model file's ``align`` metadata and ``align.*`` tensors; None when it has none.

        ``mode`` overrides the stored mode ("none" disables alignment).
        """
        stored = (config or {}).get("mode", "none")
        mode = mode if mode is not None else stored
        if mode == "none":
            return None
        if not config or stored == "none":
            raise DefectscopeError(
                f"--align {mode}: this model was fitted without alignment; refit it with --align {mode}"
            )
        if mode not in ALIGN_MODES:
            raise DefectscopeError(f"unknown alignment {mode!r}; choose one of: {', '.join(ALIGN_MODES)}")
        base, stored_base = mode.removesuffix(ECC), stored.removesuffix(ECC)
        if (base == "silhouette") != (stored_base == "silhouette"):  # a pose, or keypoints: the other is not stored
            usable = "silhouette, silhouette+ecc" if stored_base == "silhouette" else "rot90, rigid, rigid+ecc"
            raise DefectscopeError(
                f"--align {mode}: this model was fitted with --align {stored}; use --align {usable} or none"
            )
        options: dict[str, Any] = {
            k: config[k] for k in ("n_features", "ratio", "min_inliers", "allow_scale", "inlier_tol") if k in config
        }
        if mode.endswith(ECC):
            if f"{TENSOR_PREFIX}ecc_reference" not in tensors:
                raise DefectscopeError(
                    f"--align {mode}: this model keeps no ECC reference; refit it with --align {mode}"
                )
            options |= config.get("ecc", {})
            options["ecc_reference"] = tensors[f"{TENSOR_PREFIX}ecc_reference"].numpy()
        if base == "silhouette":
            if "pose" not in config:
                raise DefectscopeError(
                    f"--align {mode}: this model's reference has no silhouette pose; refit it with --align silhouette"
                )
            aligner = cls(
                mode,
                np.zeros((0, 2)),
                np.zeros((0, 32)),
                tuple(config["ref_size"]),
                reference=config.get("reference"),
                **options,
            )
            aligner.pose = tuple(float(v) for v in config["pose"])
            return aligner
        try:
            kp = tensors[f"{TENSOR_PREFIX}keypoints"].numpy()
            desc = tensors[f"{TENSOR_PREFIX}descriptors"].numpy()
        except KeyError as exc:
            raise ModelFileError(f"model file lacks alignment tensor {exc}; refit the model with --align") from exc
        return cls(mode, kp, desc, tuple(config["ref_size"]), reference=config.get("reference"), **options)

    # ----------------------------------------------------------------- estimation
    def _detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ORB keypoints (K, 2) float32 (x, y) and descriptors (K, 32) uint8."""
        import cv2

        orb = cv2.ORB_create(nfeatures=self.n_features)  # type: ignore[attr-defined]  # missing from cv2's stubs
        kps, desc = orb.detectAndCompute(_gray(image), None)
        if desc is None or not kps:
            return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
        return np.array([k.pt for k in kps], dtype=np.float32), desc

    def _matches(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ratio-test matches: image points (M, 2) and their reference points (M, 2)."""
        import cv2

        pts, desc = self._detect(image)
        if len(pts) < 2 or len(self.descriptors) < 2:
            return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
        pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(desc, self.descriptors, k=2)
        # Lowe's ratio test: the best match must be clearly better than the second best
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.ratio * p[1].distance]
        src = np.array([pts[m.queryIdx] for m in good], dtype=np.float32).reshape(-1, 2)
        dst = np.array([self.keypoints[m.trainIdx] for m in good], dtype=np.float32).reshape(-1, 2)
        return src, dst

    def estimate(self, image: np.ndarray) -> AlignResult:
        """The transform of an (H, W, 3) uint8 image into the reference frame."""
        size = (int(image.shape[0]), int(image.shape[1]))
        if self.base_mode == "silhouette":
            result = self._silhouette(image, size)
        else:
            src, dst = self._matches(image)
            if self.base_mode == "rot90":
                matrix, inliers, angle = self._rot90(src, dst, size)
            else:
                matrix, inliers, angle = self._rigid(src, dst)
            if matrix is None or inliers < self.min_inliers:
                return AlignResult(None, False, int(inliers), 0.0, size)
            result = AlignResult(matrix, True, int(inliers), float(angle), size)
        if self.ecc and result.aligned:
            result = self.refine(image, result)
        return result

    # ----------------------------------------------------------------- ECC refinement
    def _ecc_gray(self, gray: np.ndarray) -> np.ndarray:
        """(H_ref, W_ref) grey image in the reference frame -> (h, w) uint8, ``ecc_size`` on the longer side."""
        import cv2

        rh, rw = self.ref_size
        scale = min(1.0, self.ecc_size / max(rh, rw))
        h, w = max(1, round(rh * scale)), max(1, round(rw * scale))
        return cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)

    def refine(self, image: np.ndarray, result: AlignResult) -> AlignResult:
        """``result`` (an aligned pose of an (H, W, 3) uint8 image) refined by ECC against the reference,
        or ``result`` with ``refined`` False and a note when ECC fails or moves it implausibly far."""
        import cv2

        if self.ecc_reference is None or result.matrix is None:
            raise DefectscopeError("ECC refinement needs an aligned result and an Aligner built in an ECC mode")
        rh, rw = self.ref_size
        ref = self.ecc_reference.astype(np.float32)
        h, w = ref.shape
        warped = cv2.warpAffine(
            _gray(image), result.matrix, (rw, rh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        moving = self._ecc_gray(warped).astype(np.float32)
        warp = np.eye(2, 3, dtype=np.float32)
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, self.ecc_iterations, self.ecc_eps)
        blur = self.ecc_blur + (self.ecc_blur % 2 == 0) if self.ecc_blur > 0 else 1  # an odd kernel side (1: none)
        smooth = (lambda a: cv2.GaussianBlur(a, (blur, blur), 0)) if blur > 1 else (lambda a: a)
        try:
            before = float(cv2.computeECC(smooth(ref), smooth(moving)))  # the correlation ECC starts from
            # cv2's stubs lack the overload with inputMask=None and gaussFiltSize that OpenCV accepts
            after, warp = cv2.findTransformECC(  # type: ignore[call-overload]
                ref, moving, warp, cv2.MOTION_EUCLIDEAN, criteria, None, blur
            )
        except cv2.error as exc:  # OpenCV's "error: (-7:Iterations do not converge) <why> in function ..."
            found = re.search(r"\(-?\d+:[^)]*\)\s*(.*?)\s*(?:in function|$)", str(exc), re.S)
            return self._unrefined(result, f"ECC did not converge ({found.group(1) if found else 'OpenCV error'})")
        if not np.isfinite(after) or not np.all(np.isfinite(warp)):
            return self._unrefined(result, "ECC did not converge (not finite)")
        # warp maps reduced-reference pixels onto the reduced warped image: turn it into the correction
        # of the reference frame (pixel centres: x_small = (x + 0.5) * s - 0.5) and check its size
        sx, sy = w / rw, h / rh
        to_small = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])
        corr = np.linalg.inv(to_small) @ np.linalg.inv(np.vstack([warp.astype(np.float64), [0, 0, 1]])) @ to_small
        turn = float(np.degrees(np.arctan2(corr[1, 0], corr[0, 0])))
        centre = np.array([(rw - 1) / 2.0, (rh - 1) / 2.0, 1.0])
        shift = float(np.linalg.norm((corr @ centre)[:2] - centre[:2]))
        if abs(turn) > self.ecc_max_angle or shift > self.ecc_max_shift * max(rh, rw):
            return self._unrefined(
                result,
                f"ECC moved the pose implausibly far ({turn:.1f} degrees, {shift:.1f} px; "
                f"limits {self.ecc_max_angle:g} degrees, "
                f"{self.ecc_max_shift * max(rh, rw):.1f} px)",
            )
        # the correlation at the final warp, measured as ``before`` was (ECC reports the one of its last step)
        after = float(
            cv2.computeECC(
                smooth(ref),
                smooth(
                    cv2.warpAffine(
                        moving,
                        warp,
                        (w, h),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE,
                    )
                ),
            )
        )
        if after < before - 1e-4:  # a drop beyond rounding
            return self._unrefined(result, f"ECC lowered the correlation ({before:.4f} -> {after:.4f})")
        matrix = (corr @ np.vstack([result.matrix, [0.0, 0.0, 1.0]]))[:2]
        return replace(result, matrix=matrix, angle=result.angle + turn, refined=True, refine_note=None)

    def _unrefined(self, result: AlignResult, note: str) -> AlignResult:
        log.info("ECC refinement kept the %s pose: %s", self.base_mode, note)
        return replace(result, refined=False, refine_note=note)

    def _silhouette(self, image: np.ndarray, size: tuple[int, int]) -> AlignResult:
        """Turn the part about its centroid onto the reference's principal axis, centroid onto centroid."""
        pose = silhouette_pose(image)
        if pose is None or self.pose is None:
            return AlignResult(None, False, 0, 0.0, size)
        cx, cy, theta, _area = pose
        rx, ry, rtheta = self.pose[:3]
        # a photo at another resolution is scaled by the ratio of the image sizes (a similarity transform)
        rh, rw = self.ref_size
        scale = float(np.sqrt((rh * rw) / (size[0] * size[1])))
        rot = scale * _rotation_rad(rtheta - theta)
        t = np.array([rx, ry]) - rot @ np.array([cx, cy])
        matrix = np.hstack([rot, t[:, None]])
        return AlignResult(matrix, True, 1, float(np.degrees(rtheta - theta)), size)

    def _rot90(self, src: np.ndarray, dst: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray | None, int, float]:
        """Best quarter turn about the image centre, by matches agreeing on one translation."""
        h, w = size
        rh, rw = self.ref_size
        tol = self.inlier_tol * max(rh, rw) * 2
        best = (-1, 0)
        for k in range(4):
            rot = _rotation(90.0 * k)
            moved = src @ rot.T
            offsets = dst - moved
            if len(offsets):
                centre = np.median(offsets, axis=0)
                count = int((np.linalg.norm(offsets - centre, axis=1) < tol).sum())
            else:
                count = 0
            if count > best[0]:
                best = (count, k)
        count, k = best
        # warp: rotate about the image centre and put that centre on the reference centre
        rot = _rotation(90.0 * k)
        centre_src = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
        centre_ref = np.array([(rw - 1) / 2.0, (rh - 1) / 2.0])
        matrix = np.hstack([rot, (centre_ref - rot @ centre_src)[:, None]])
        return matrix, count, 90.0 * k

    def _rigid(self, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray | None, int, float]:
        """RANSAC rotation + translation (+ scale) from matched points."""
        import cv2

        if len(src) < 3:
            return None, len(src), 0.0
        tol = max(2.0, self.inlier_tol * max(self.ref_size))
        matrix, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=tol, maxIters=4000, confidence=0.995
        )
        if matrix is None or mask is None:
            return None, 0, 0.0
        keep = mask.ravel().astype(bool)
        if not self.allow_scale:  # project onto a pure rotation and refit the translation on the inliers
            a, b = matrix[0, 0], matrix[1, 0]
            theta = np.arctan2(b, a)
            rot = _rotation_rad(theta)
            t = (dst[keep] - src[keep] @ rot.T).mean(axis=0)
            matrix = np.hstack([rot, t[:, None]])
            residual = np.linalg.norm(src @ rot.T + t - dst, axis=1)
            keep = residual < tol
        angle = float(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])))
        return matrix.astype(np.float64), int(keep.sum()), angle

    # ----------------------------------------------------------------- warping
    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, AlignResult]:
        """Loader hook: (H, W, 3) uint8 -> (image in the reference frame or as given, AlignResult)."""
        result = self.estimate(image)
        if not result.aligned:
            log.info(
                "could not align an image (%d matching keypoints, need %d): scored unaligned",
                result.inliers,
                self.min_inliers,
            )
            return image, result
        return self.warp_image(image, result), result

    def warp_image(self, image: np.ndarray, result: AlignResult) -> np.ndarray:
        """(H, W, 3) -> (H_ref, W_ref, 3): the image in the reference frame (borders replicated)."""
        import cv2

        assert result.matrix is not None
        rh, rw = self.ref_size
        return cv2.warpAffine(image, result.matrix, (rw, rh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def map_to_original(self, amap: np.ndarray, result: AlignResult) -> np.ndarray:
        """(h, w) map over the warped image -> (h, w) map over the original image (h, w need not be equal).

        Composes the reference-to-grid scaling, the alignment and the original-to-grid scaling
        into one affine map, so the warp runs at h x w.
        """
        import cv2

        if result.matrix is None:
            return amap
        s_h, s_w = amap.shape
        h, w = result.size
        rh, rw = self.ref_size
        full = np.vstack([result.matrix, [0.0, 0.0, 1.0]])
        # pixel centres (as in resizing with align_corners=False): x_s = (x + 0.5) * S / W - 0.5
        ref_to_s = np.array([[s_w / rw, 0, 0.5 * s_w / rw - 0.5], [0, s_h / rh, 0.5 * s_h / rh - 0.5], [0, 0, 1.0]])
        s_to_orig = np.array([[w / s_w, 0, 0.5 * w / s_w - 0.5], [0, h / s_h, 0.5 * h / s_h - 0.5], [0, 0, 1.0]])
        m = (ref_to_s @ full @ s_to_orig)[:2]  # original S-grid -> reference S-grid
        return cv2.warpAffine(
            amap.astype(np.float32),
            m,
            (s_w, s_h),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )


def part_silhouette(image: np.ndarray) -> np.ndarray | None:
    """(H, W) uint8 0/1: the part in an (H, W, 3) uint8 photo, separated from a uniform background.

    Otsu's threshold on the grey image, the polarity taken from the image border (the side the border
    mostly falls on is the background), then the largest connected component (8-connected). None when
    no part stands out: nothing found, a region under 0.1 % or over 80 % of the frame, or one touching
    three of its sides (a surface filling the frame rather than a part on a background). Holes inside
    the part (a dark print on a light part) are not filled here."""
    import cv2

    gray = _gray(image)
    _, fg = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    if border.mean() > 127:  # the background came out white: the part is the dark side
        fg = 255 - fg
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n < 2:
        return None
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    part = (labels == biggest).astype(np.uint8)
    x, y, bw, bh = (int(v) for v in stats[biggest, :4])
    h_img, w_img = part.shape
    touches = (x == 0) + (y == 0) + (x + bw == w_img) + (y + bh == h_img)
    if part.sum() < 0.001 * part.size or part.sum() > 0.8 * part.size or touches >= 3:
        return None  # nothing, or noise / a surface filling the frame rather than a part on a background
    return part


def silhouette_pose(image: np.ndarray) -> tuple[float, float, float, float] | None:
    """(cx, cy, theta, area) of the part in an (H, W, 3) uint8 photo: centroid, the angle (radians, pixel
    coordinates) of its principal axis, pointing to the end where the third moment of the part's grey
    levels along the axis says the mass lies (a 180-degree turn changes theta by pi), and its area in
    pixels. None when no part stands out from a background (nothing found, or a region filling the
    frame or touching three of its sides), or when the outline has no clear axis (its principal axes
    differ by less than MIN_ELONGATION: a round part)."""
    import cv2

    part = part_silhouette(image)
    if part is None:
        return None
    gray = _gray(image)
    m = cv2.moments(part, binaryImage=True)
    cx, cy = m["m10"] / m["m00"], m["m01"] / m["m00"]
    spread = np.sqrt((m["mu20"] - m["mu02"]) ** 2 + 4 * m["mu11"] ** 2)
    major, minor = m["mu20"] + m["mu02"] + spread, m["mu20"] + m["mu02"] - spread
    if minor <= 0 or major / minor < MIN_ELONGATION**2:
        return None  # round (or square-ish) outline: no principal axis to turn it by
    theta = 0.5 * np.arctan2(2.0 * m["mu11"], m["mu20"] - m["mu02"])
    ys, xs = np.nonzero(part)
    along = (xs - cx) * np.cos(theta) + (ys - cy) * np.sin(theta)
    # which end is heavier: the third moment of the part's grey levels along the axis (a symmetric
    # outline such as a capsule is told apart by what is printed on it), else of its outline
    weights = gray[ys, xs].astype(np.float64)
    skew = float((weights * along**3).sum() / max(weights.sum(), 1e-9))
    if abs(skew) < 1e-6 * float(np.abs(along).max() ** 3 + 1e-12):
        skew = float((along**3).mean())
    if skew < 0:  # point the axis to the heavier end
        theta += np.pi
    return float(cx), float(cy), float(theta), float(m["m00"])


def _rotation(degrees: float) -> np.ndarray:
    """(2, 2) rotation by ``degrees`` in pixel coordinates; exact (integer entries) for quarter turns."""
    rot = _rotation_rad(np.radians(degrees))
    return np.round(rot) if degrees % 90 == 0 else rot


def _rotation_rad(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]], dtype=np.float64)


def make_aligner(
    mode: str, reference_image: np.ndarray | None, reference: str | None = None, **options: Any
) -> Aligner | None:
    """An Aligner for ``mode`` from a reference image, or None for ``mode == "none"``."""
    if mode not in ALIGN_MODES:
        raise DefectscopeError(f"unknown alignment {mode!r}; choose one of: {', '.join(ALIGN_MODES)}")
    if mode == "none":
        return None
    if reference_image is None:
        raise DefectscopeError(f"--align {mode} needs a reference image")
    return Aligner.from_image(mode, reference_image, reference=reference, **options)


def alignment_quality(aligner: Aligner, reference: np.ndarray, images: list[np.ndarray]) -> tuple[float, int]:
    """(mean normalised cross-correlation (-1..1) between the reference's grey image and each image as
    ``aligner`` warps it, number of images it could not align); an image it cannot align counts 0 (no
    evidence for the candidate, however alike the unwarped image)."""
    ref = _gray(reference).astype(np.float64)
    ref = (ref - ref.mean()) / (ref.std() + 1e-9)
    scores, failed = [], 0
    for image in images:
        warped, result = aligner(image)
        if not result.aligned:
            scores.append(0.0)
            failed += 1
            continue
        g = _gray(warped).astype(np.float64)
        scores.append(float((ref * (g - g.mean()) / (g.std() + 1e-9)).mean()))
    return (float(np.mean(scores)) if scores else -1.0), failed


def choose_aligner(
    reference_image: np.ndarray, images: list[np.ndarray], reference: str | None = None
) -> tuple[Aligner, dict[str, Any]]:
    """``--align auto``: the candidate (:data:`AUTO_CANDIDATES`) that aligns the training ``images`` best to
    the reference, by :func:`alignment_quality`; returns it and a record of every candidate's quality.

    The ECC candidates maximise a (smoothed) correlation with the reference, which is close to what the
    rule measures, so they win unless they fall back or the plain pose is already as good; a tie keeps
    the earlier (plain) candidate."""
    tried: dict[str, Any] = {}
    best: tuple[float, Aligner] | None = None
    for mode in AUTO_CANDIDATES:
        try:
            aligner = Aligner.from_image(mode, reference_image, reference=reference)
        except DefectscopeError as exc:
            tried[mode] = {"error": str(exc)}
            continue
        quality, failed = alignment_quality(aligner, reference_image, images)
        tried[mode] = {"ncc": round(quality, 4), "unaligned": failed}
        if best is None or quality > best[0]:
            best = (quality, aligner)
    if best is None:
        why = "; ".join(f"{mode}: {info['error']}" for mode, info in tried.items())
        raise DefectscopeError(f"--align auto: no alignment works on this reference ({why})")
    log.info("--align auto chose %s: %s", best[1].mode, tried)
    return best[1], {
        "chosen": best[1].mode,
        "candidates": tried,
        "n_images": len(images),
        "rule": "highest mean normalised cross-correlation with the reference after alignment",
    }
