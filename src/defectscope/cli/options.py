"""The command line's shared option groups: model parameters, alignment, batch/threads/progress.

Building blocks for the argparse front end (:mod:`.commands`): nothing heavy is imported here, so
building the parser and printing ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..common.argtypes import finite_float, number, positive_int, probability_open, seed_int
from ..features.normalization import DEFAULT_NORMALIZATION, NORMALIZATIONS

#: --align's modes: align.ALIGN_MODES, listed here so that parsing the command line imports neither torch nor OpenCV
ALIGN_CHOICES = ["none", "rot90", "rigid", "silhouette", "rigid+ecc", "silhouette+ecc"]
#: defectscope.data.geometry.RESIZE_MODES, named here so that --help imports no numpy (a test keeps them equal)
RESIZE_CHOICES = ("stretch", "keep-aspect", "crop")
#: defectscope.judging.JUDGE_RULES, named here for the same reason (a test keeps them equal)
JUDGE_CHOICES = ("max", "region", "integrated")

__all__ = [
    "PARAM_OPTIONS",
    "add_align_options",
    "add_common",
    "add_judge_options",
    "add_model_options",
    "add_roi_option",
    "judge_options",
    "model_params",
    "show_progress",
]


def layers_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=number(int, 1, 4096), default=16, help="images per forward pass (default 16)")
    p.add_argument(
        "--threads", type=number(int, 1, 1024), default=None, help="CPU threads for torch (default: all cores)"
    )
    bars = p.add_mutually_exclusive_group()
    bars.add_argument(
        "--progress",
        action="store_true",
        help="show progress bars on stderr even when it is not a terminal (default: only on a terminal)",
    )
    bars.add_argument("--no-progress", action="store_true", help="never show progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level)")


def add_threshold_options(p: argparse.ArgumentParser) -> None:
    """--threshold NUMBER or --threshold-name NAME: what a scoring command judges with (default: the
    model's active threshold)."""
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--threshold", type=finite_float, default=None, help="judge at this number instead of the model's threshold"
    )
    which.add_argument(
        "--threshold-name",
        default=None,
        metavar="NAME",
        help="judge at the model's threshold of this name (one stored by calibrate --name, or 'fit'); "
        "default: the active one",
    )


def add_model_options(p: argparse.ArgumentParser, method: bool = True) -> None:
    """Model options: --method (unless ``method`` is False), common parameters, each method's own."""
    g = p.add_argument_group("model")
    if method:
        g.add_argument(
            "--method",
            default="patchcore",
            choices=["patchcore", "padim", "spade"],
            help="detection method (default patchcore)",
        )
    g.add_argument(
        "--backbone",
        default=None,
        help="timm model name (default tf_efficientnet_lite0, ImageNet weights that ship offline), or an "
        "ensemble of up to 3 joined by '+', e.g. tf_efficientnet_lite0+tf_efficientnet_lite2 "
        "(features concatenated per layer)",
    )
    g.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="local state dict for the backbone (.safetensors or .pth; timm or torchvision key names); "
        "'none' for random weights; an ensemble takes only 'none' (else each member's default weights)",
    )
    g.add_argument(
        "--layers",
        type=layers_list,
        default=None,
        help="comma-separated feature layers, e.g. blocks.2,blocks.4 (EfficientNet) or layer2,layer3 "
        "(ResNet); default depends on method and backbone",
    )
    g.add_argument(
        "--image-size",
        type=image_size,
        default=None,
        metavar="N|H,W",
        help="model input: N x N, or H,W (height, width) for non-square parts; each side in [32, 2048] "
        "(default 288 for patchcore, 256 for padim and spade)",
    )
    g.add_argument(
        "--resize",
        choices=list(RESIZE_CHOICES),
        default=None,
        help="how photos become the input: stretch (straight to the input size, default), keep-aspect "
        "(fit without distortion, pad the rest) or crop (resize each side to size / 0.875, then "
        "centre-crop, as the reference implementations); stored in the model",
    )
    g.add_argument(
        "--normalization",
        choices=list(NORMALIZATIONS),
        default=None,
        help="per-channel input statistics: ImageNet's mean/std or the ones the backbone weights were "
        f"trained with (default: weights for patchcore, {DEFAULT_NORMALIZATION} for padim and spade; "
        "see the README)",
    )
    g.add_argument("--seed", type=seed_int, default=None, help="seed for every random choice (default 0)")
    g.add_argument(
        "--threshold-quantile",
        type=probability_open,
        default=0.99,
        help="threshold = this quantile of held-out scores of the good training images (default 0.99)",
    )
    pc = p.add_argument_group("patchcore")
    pc.add_argument(
        "--coreset-ratio",
        type=number(float, 0, 1, lo_open=True),
        default=None,
        help="fraction of patches kept (default 0.1)",
    )
    pc.add_argument(
        "--coreset-eps",
        type=probability_open,
        default=None,
        help="Johnson-Lindenstrauss eps setting the projection used for coreset selection (default 0.9)",
    )
    pc.add_argument(
        "--projection-dim", type=positive_int, default=None, help="explicit projection dimension for the coreset"
    )
    pc.add_argument(
        "--coreset",
        choices=["folds", "exact"],
        default=None,
        help="coreset selection: folds (greedy k-center per fold and chunk of images, linear in the "
        "number of images; default) or exact (one greedy over all patches, as in the paper)",
    )
    pc.add_argument(
        "--max-bank-size",
        type=positive_int,
        default=None,
        metavar="M",
        help="most memory-bank entries whatever the training set's size (default 32768)",
    )
    pc.add_argument(
        "--folds",
        type=number(int, 2, 1000),
        default=None,
        help="folds of the selection and the k-fold threshold (default 5)",
    )
    pc.add_argument(
        "--threshold-images",
        type=positive_int,
        default=None,
        metavar="N",
        help="most training images scored for the threshold (default 500)",
    )
    pc.add_argument(
        "--knn-index",
        choices=["flat", "ivf", "hnsw"],
        default=None,
        help="nearest-neighbour index: flat (exact, default), ivf or hnsw (approximate, for large "
        "memory banks; see the README for measured recall)",
    )
    pc.add_argument(
        "--rotations",
        type=number(int, 1, 360),
        default=None,
        metavar="R",
        help="add every training image to the memory bank at R evenly spaced angles (0, 360/R, ...), "
        "for parts photographed at any angle without --align; each copy stays in its image's "
        "threshold fold (default 1: as given)",
    )
    pc.add_argument(
        "--tile",
        type=number(int, 1, 8),
        default=None,
        metavar="N",
        dest="tiles",
        help="N in 1-8: resize each photo to a canvas of N x N tiles of --image-size and score every "
        "tile (for small defects in large photos); maps are stitched back, the image score is the "
        "worst tile's; the canvas (S + (N-1) x S x (1 - R) per side) must stay within 2048 px "
        "(default 1: no tiling; about N^2 times the time; see the README)",
    )
    pc.add_argument(
        "--tile-overlap",
        type=number(float, 0, 0.9),
        default=None,
        metavar="R",
        help="R in 0-0.9: fraction of a tile shared with its neighbour (default 0.25)",
    )
    pc.add_argument(
        "--score-patches",
        type=number(int, 1, 4096),
        default=None,
        metavar="K",
        help="the image score: 1 (default) the largest patch distance, re-weighted by its memory-bank "
        "neighbourhood (PatchCore eq. 7); K >= 2 the mean of the K largest patch distances (see "
        "docs/benchmarks.md, 'Score aggregation and region rules')",
    )
    pc.add_argument(
        "--border-padding",
        choices=["zeros", "exclude"],
        default=None,
        help="how the 3 x 3 neighbourhood of a border patch is averaged: zeros (default, the reference "
        "implementation's zero padding) or exclude (cells inside the map only)",
    )
    pc.add_argument(
        "--layer-weighting",
        choices=["channels", "equal"],
        default=None,
        help="how much each feature layer counts in a patch distance: equal (default; every layer alike, "
        "as the reference implementation) or channels (every channel once, as anomalib and model "
        "files from before this option); see the README",
    )
    pc.add_argument(
        "--num-neighbors", type=positive_int, default=None, help="b in the image-score re-weighting (default 9)"
    )
    pd = p.add_argument_group("padim")
    pd.add_argument("--d-reduced", type=positive_int, default=None, help="random channels kept (default by backbone)")
    pd.add_argument(
        "--epsilon",
        type=number(float, 0, 1e6, lo_open=True),
        default=None,
        help="covariance regulariser: Sigma = cov + epsilon I (default 1.0 for EfficientNet-Lite, measured "
        "on the development suite; the paper's 0.01 for other backbones)",
    )
    sp = p.add_argument_group("spade")
    sp.add_argument("--k", type=positive_int, default=None, help="image-level nearest neighbours (default 5)")
    sp.add_argument(
        "--top-k", type=positive_int, default=None, help="training images used for pixel matching (default 5)"
    )


def add_align_options(p: argparse.ArgumentParser, fit: bool) -> None:
    g = p.add_argument_group("alignment")
    if fit:
        g.add_argument(
            "--align",
            choices=[*ALIGN_CHOICES, "auto"],
            default="none",
            help="warp every image into a reference image's frame before feature extraction: rot90 "
            "(best quarter turn) or rigid (any angle + shift, RANSAC on ORB matches), or "
            "silhouette (the part's outline against a uniform background: centroid and principal "
            "axis; for parts with little texture); rigid+ecc and silhouette+ecc refine that pose "
            "by intensity (OpenCV's ECC registration; where it fails the first pose is kept and "
            "recorded); auto: whichever of silhouette and rigid aligns "
            "the training images best to the reference, and says so; stored in the model "
            "(default none)",
        )
        g.add_argument(
            "--align-ref",
            type=Path,
            default=None,
            metavar="FILE",
            help="reference image for --align (default: the first training image)",
        )
    else:
        g.add_argument(
            "--align",
            choices=ALIGN_CHOICES,
            default=None,
            help="override the model's alignment (default: as fitted); images that cannot be aligned "
            "are scored unaligned and flagged",
        )


def add_judge_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judging (docs/reading-results.md, 'Judging by region')")
    g.add_argument(
        "--judge",
        choices=list(JUDGE_CHOICES),
        default="max",
        help="how an image is judged: max (default: its score at or above the threshold), region (defective "
        "when a region of the anomaly map above the threshold covers at least --min-region-pixels, or "
        "--min-region-area with --pixel-size) or integrated (by a region's integrated anomaly); the rule's "
        "threshold is set from held-out good training images and stored in the model (patchcore only)",
    )
    g.add_argument(
        "--min-region-pixels",
        type=number(float, 0, lo_open=True),
        default=None,
        metavar="N",
        help="--judge region: the smallest region that rejects a part, in photo pixels",
    )
    g.add_argument(
        "--min-region-area",
        type=number(float, 0, lo_open=True),
        default=None,
        metavar="MM2",
        help="--judge region: the smallest region that rejects a part, in mm^2 (needs --pixel-size)",
    )
    g.add_argument(
        "--pixel-size",
        type=number(float, 0, lo_open=True),
        default=None,
        metavar="MM",
        help="the photos' mm per pixel: areas in mm^2 (--min-region-area; --judge integrated)",
    )
    g.add_argument(
        "--level-quantile",
        type=probability_open,
        default=None,
        metavar="Q",
        help="--judge integrated: regions are taken above this quantile of the held-out good map maxima (default 0.9)",
    )


#: the judge rule's keyword arguments of defectscope.api.fit, and the options that give them
JUDGE_FLAGS = {
    "min_region_pixels": "--min-region-pixels",
    "min_region_area": "--min-region-area",
    "pixel_size": "--pixel-size",
    "level_quantile": "--level-quantile",
}


def judge_options(args: argparse.Namespace) -> dict[str, Any]:
    """The judge rule's keyword arguments for :func:`defectscope.api.fit`, checked now, before any work,
    with a refusal that names the command line's options."""
    from ..errors import DefectscopeError
    from ..judging import JudgeRule

    kwargs = {name: getattr(args, name) for name in JUDGE_FLAGS}
    try:
        JudgeRule.make(args.judge, **kwargs)
    except DefectscopeError as exc:
        text = str(exc)
        for rule in JUDGE_CHOICES:
            text = text.replace(f"judge='{rule}'", f"--judge {rule}")
        for name, option in JUDGE_FLAGS.items():
            text = text.replace(name, option)
        raise DefectscopeError(text) from None
    return {"judge": args.judge, **kwargs}


def add_roi_option(p: argparse.ArgumentParser) -> None:
    """``fit --roi``: the region of interest (read and checked by defectscope.fit, before the fit's work)."""
    p.add_argument(
        "--roi",
        default=None,
        metavar="MASK|POLYGONS.json|auto",
        help="judge only a region of interest: a mask image (white = judged; any size, mapped onto the model "
        'input as the photos are), a .json file of polygons in photo pixels ({"image_size": [W, H], '
        '"polygons": [[[x, y], ...], ...]}), or auto (the part\'s silhouette over the training images); what '
        "lies outside counts in no score or threshold, its map is 0, overlays dim it; stored in the model "
        "(patchcore and padim; default: the whole image)",
    )


PARAM_OPTIONS = {
    "backbone": "backbone",
    "weights": "weights",
    "layers": "layers",
    "image_size": "image_size",
    "resize": "resize",
    "seed": "seed",
    "normalization": "normalization",
    "coreset_ratio": "coreset_ratio",
    "coreset_eps": "coreset_eps",
    "projection_dim": "projection_dim",
    "coreset": "coreset",
    "max_bank_size": "max_bank_size",
    "folds": "folds",
    "threshold_images": "threshold_images",
    "knn_index": "knn_index",
    "rotations": "rotations",
    "tiles": "tiles",
    "tile_overlap": "tile_overlap",
    "score_patches": "score_patches",
    "border_padding": "border_padding",
    "layer_weighting": "layer_weighting",
    "num_neighbors": "num_neighbors",
    "d_reduced": "d_reduced",
    "epsilon": "epsilon",
    "k": "k",
    "top_k": "top_k",
}


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars: when asked (--progress), never with --no-progress, else only when stderr is a
    terminal, so a pipe or a log file never gets bars mixed into it."""
    if getattr(args, "progress", False):
        return True
    if getattr(args, "no_progress", False):
        return False
    return sys.stderr.isatty()


#: the command-line flag of a parameter whose flag is not ``--`` + its name with dashes
FLAGS = {"tiles": "--tile"}


def flag(param: str) -> str:
    """The command-line option that sets ``param``: ``tile_overlap`` -> ``--tile-overlap``."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def model_params(args: argparse.Namespace) -> dict[str, Any]:
    """The method parameters given on the command line. Options that none of the chosen methods
    (``--method``, or benchmark's ``--methods``) take are refused here, by their flags
    (``--tile is a patchcore option; --method padim does not take it``)."""
    params = {}
    for option, name in PARAM_OPTIONS.items():
        value = getattr(args, option, None)
        if value is not None:
            params[name] = value
    method, methods = getattr(args, "method", None), getattr(args, "methods", None)
    chosen = [method] if isinstance(method, str) else list(methods or [])
    if chosen and params:
        from ..detectors import METHODS, detector_class
        from ..errors import DefectscopeError

        taken = {m: set(detector_class(m)._param_names()) for m in METHODS}
        for name in params:
            if not any(name in taken[m] for m in chosen if m in taken):
                owners = [m for m in METHODS if name in taken[m]]
                whose = f"a {' and '.join(owners)} option" if owners else "not a method option"
                given = f"--method {method}" if isinstance(method, str) else f"--methods {' '.join(chosen)}"
                takes = "does" if len(chosen) == 1 else "do"
                raise DefectscopeError(f"{flag(name)} is {whose}; {given} {takes} not take it")
    return params


def image_size(text: str) -> int | tuple[int, int]:
    """A ``type=`` for ``--image-size``: ``N`` (an N x N input) or ``H,W``, each side in [32, 2048]."""
    from ..data.geometry import MAX_SIDE, MIN_SIDE  # here: --help imports no numpy

    allowed = f"give N or H,W (height, width), each a whole number in [{MIN_SIDE}, {MAX_SIDE}]"
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not an image size: {allowed}")
    sides = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a whole number: {allowed}") from None
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise argparse.ArgumentTypeError(f"{part} is out of range: {allowed}")
        sides.append(value)
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])
