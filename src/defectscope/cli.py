"""The `defectscope` command: parse arguments, call the library, print results.

Exit codes: 0 success, 1 some images could not be scored (the rest were), 2 the command
could not run (bad arguments, unreadable model, malformed data).
"""

from __future__ import annotations

import argparse
import collections
import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .cli_types import finite_float, number, positive_int, probability_open, seed_int
from .errors import DefectscopeError
from .jsonout import dumps
from .normalization import DEFAULT_NORMALIZATION, NORMALIZATIONS

log = logging.getLogger("defectscope")

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


# --------------------------------------------------------------------------- arguments
def _layers(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=number(int, 1, 4096), default=16, help="images per forward pass (default 16)")
    p.add_argument("--threads", type=number(int, 1, 1024), default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level)")


def _add_model_options(p: argparse.ArgumentParser, method: bool = True) -> None:
    """Model options: --method (unless ``method`` is False), common parameters, each method's own."""
    g = p.add_argument_group("model")
    if method:
        g.add_argument("--method", default="patchcore", choices=["patchcore", "padim", "spade"],
                       help="detection method (default patchcore)")
    g.add_argument("--backbone", default=None,
                   help="timm model name (default tf_efficientnet_lite0, ImageNet weights that ship offline)")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="local state dict for the backbone (.safetensors or .pth; timm or torchvision key names); "
                        "'none' for random weights")
    g.add_argument("--layers", type=_layers, default=None,
                   help="comma-separated feature layers, e.g. blocks.2,blocks.4 (EfficientNet) or layer2,layer3 "
                        "(ResNet); default depends on method and backbone")
    g.add_argument("--image-size", type=number(int, 32, 2048), default=None, help="images are resized to N x N (default 256)")
    g.add_argument("--normalization", choices=list(NORMALIZATIONS), default=None,
                   help="per-channel input statistics: ImageNet's mean/std or the ones the backbone weights were "
                        f"trained with (default: weights for patchcore, {DEFAULT_NORMALIZATION} for padim and spade; "
                        "see the README)")
    g.add_argument("--seed", type=seed_int, default=None, help="seed for every random choice (default 0)")
    g.add_argument("--threshold-quantile", type=probability_open, default=0.99,
                   help="threshold = this quantile of held-out scores of the good training images (default 0.99)")
    pc = p.add_argument_group("patchcore")
    pc.add_argument("--coreset-ratio", type=number(float, 0, 1, lo_open=True), default=None, help="fraction of patches kept (default 0.1)")
    pc.add_argument("--coreset-eps", type=probability_open, default=None,
                    help="Johnson-Lindenstrauss eps setting the projection used for coreset selection (default 0.9)")
    pc.add_argument("--projection-dim", type=positive_int, default=None, help="explicit projection dimension for the coreset")
    pc.add_argument("--coreset", choices=["folds", "exact"], default=None,
                    help="coreset selection: folds (greedy k-center per fold and chunk of images, linear in the "
                         "number of images; default) or exact (one greedy over all patches, as in the paper)")
    pc.add_argument("--max-bank-size", type=positive_int, default=None, metavar="M",
                    help="most memory-bank entries whatever the training set's size (default 32768)")
    pc.add_argument("--folds", type=number(int, 2, 1000), default=None, help="folds of the selection and the k-fold threshold (default 5)")
    pc.add_argument("--threshold-images", type=positive_int, default=None, metavar="N",
                    help="most training images scored for the threshold (default 500)")
    pc.add_argument("--knn-index", choices=["flat", "ivf", "hnsw"], default=None,
                    help="nearest-neighbour index: flat (exact, default), ivf or hnsw (approximate, for large "
                         "memory banks; see the README for measured recall)")
    pc.add_argument("--num-neighbors", type=positive_int, default=None, help="b in the image-score re-weighting (default 9)")
    pd = p.add_argument_group("padim")
    pd.add_argument("--d-reduced", type=positive_int, default=None, help="random channels kept (default by backbone)")
    sp = p.add_argument_group("spade")
    sp.add_argument("--k", type=positive_int, default=None, help="image-level nearest neighbours (default 50)")
    sp.add_argument("--top-k", type=positive_int, default=None, help="training images used for pixel matching (default 5)")


def _add_align_options(p: argparse.ArgumentParser, fit: bool) -> None:
    g = p.add_argument_group("alignment")
    if fit:
        g.add_argument("--align", choices=["none", "rot90", "rigid", "silhouette", "auto"], default="none",
                       help="warp every image into a reference image's frame before feature extraction: rot90 "
                            "(best quarter turn) or rigid (any angle + shift, RANSAC on ORB matches), or "
                            "silhouette (the part's outline against a uniform background: centroid and principal "
                            "axis; for parts with little texture), or auto (silhouette or rigid, whichever aligns "
                            "the training images best to the reference, and says so); stored in the model "
                            "(default none)")
        g.add_argument("--align-ref", type=Path, default=None, metavar="FILE",
                       help="reference image for --align (default: the first training image)")
    else:
        g.add_argument("--align", choices=["none", "rot90", "rigid", "silhouette"], default=None,
                       help="override the model's alignment (default: as fitted); images that cannot be aligned "
                            "are scored unaligned and flagged")


def _model_aligner(meta: dict[str, Any], extras: dict[str, Any], mode: str | None) -> Any:
    from .align import Aligner

    return Aligner.from_model(meta.get("align"), extras, mode)


_PARAM_OPTIONS = {
    "backbone": "backbone", "weights": "weights", "layers": "layers", "image_size": "image_size", "seed": "seed",
    "normalization": "normalization",
    "coreset_ratio": "coreset_ratio", "coreset_eps": "coreset_eps", "projection_dim": "projection_dim",
    "coreset": "coreset", "max_bank_size": "max_bank_size", "folds": "folds",
    "threshold_images": "threshold_images", "knn_index": "knn_index",
    "num_neighbors": "num_neighbors", "d_reduced": "d_reduced", "k": "k", "top_k": "top_k",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line: ``defectscope fit: error: ...`` and a pointer to --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="defectscope",
        description="Unsupervised visual inspection: learn good parts from photos, then find defects.",
    )
    parser.add_argument("--version", action="version", version=f"defectscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="learn a model from good images",
                       description="Learn a model from good images. DATA is an MVTec AD category folder "
                                   "(train/good is used), a VisA object folder (train/Normal), a plain test folder "
                                   "(its train/) or any folder of good images (searched recursively).")
    p.add_argument("data", type=Path, metavar="DATA")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL", help="model file to write")
    p.add_argument("--exclude-outliers", action="store_true",
                   help="fit again without the training images that look unlike the rest (held-out score outliers "
                        "and images far smaller than the model input; fit names them either way)")
    _add_model_options(p)
    _add_align_options(p, fit=True)
    _add_common(p)

    p = sub.add_parser("predict", help="score images: prints path,score,judgement",
                       description="Score images with a model. Prints one line per image: path,score,judgement "
                                   "(judgement 0 = good, 1 = defective: score at or above the threshold). Images that "
                                   "cannot be read are reported on stderr and the exit code is 1.")
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    p.add_argument("--threshold", type=finite_float, default=None, help="override the model's threshold")
    p.add_argument("--heatmaps", type=Path, default=None, metavar="DIR", help="write a heatmap overlay PNG per image")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per line: path, score, judgement, threshold, error")
    p.add_argument("--normalized", action="store_true",
                   help="print score / threshold (1.0 = the threshold); --json then adds raw_score")
    _add_align_options(p, fit=False)
    _add_common(p)

    p = sub.add_parser("evaluate", help="image/pixel AUROC on labelled test data",
                       description="Evaluate a model on an MVTec AD-layout category (test/<type>/..., "
                                   "ground_truth/<type>/<stem>_mask.png), a VisA object folder (test/Normal, "
                                   "test/Anomaly, Masks/Anomaly) or a plain folder (good/ + defect folders).")
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("data", type=Path, metavar="DATA")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write all results as one JSON object")
    p.add_argument("--heatmaps", type=Path, default=None, metavar="DIR", help="write heatmap overlays per test image")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="write a self-contained HTML report (DIR/index.html, figures, overlays)")
    p.add_argument("--threshold", type=finite_float, default=None, help="override the model's threshold")
    p.add_argument("--protocol", choices=["native", "mvtec"], default="native",
                   help="native: maps and masks compared at the model's input size; mvtec: maps upsampled to each "
                        "mask's own resolution (the literature's protocol), plus the image AUROC from each map's "
                        "maximum (default native)")
    _add_align_options(p, fit=False)
    _add_common(p)

    p = sub.add_parser("tune", help="choose feature layers (block per stage, stage combination) on validation data",
                       description="Search which block of each backbone stage, and which combination of stages, gives "
                                   "the best validation image AUROC. DATA is an MVTec AD category (train/good to fit, "
                                   "test/ for validation and held-out results). --layers names the stages searched "
                                   "(default: the method's layers). Prints a ranked Markdown table.")
    p.add_argument("data", type=Path, metavar="DATA")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val", type=Path, default=None, metavar="DATA",
                     help="labelled validation images (MVTec AD layout or plain folder); DATA's test set is then "
                          "entirely held out")
    val.add_argument("--val-fraction", type=probability_open, default=0.5,
                     help="share of DATA's test images (per defect type) used for validation when --val is not "
                          "given (default 0.5); the rest is held out and reported separately")
    p.add_argument("--max-trials", type=positive_int, default=None, help="candidates to evaluate (default: all)")
    p.add_argument("--search", choices=["random", "full"], default="random",
                   help="random: a seeded draw of --max-trials candidates; full: the grid in order (default random)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="write DIR/tune.md (the table), DIR/tune.csv (one row per candidate) and DIR/tune.json (everything)")
    p.add_argument("--fit-best", action="store_true", help="fit the winning layers on all of train/ and write -o MODEL")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="MODEL", help="model file for --fit-best")
    _add_model_options(p)
    _add_common(p)

    p = sub.add_parser("calibrate", help="set the model's threshold from validation images",
                       description="Score validation images and write a new threshold into the model file (the old "
                                   "one is kept in its threshold history), or into a new file with -o. DATA is a "
                                   "plain test folder (good/ + defect folders, labelled) or any folder of good images; "
                                   "an MVTec AD category or VisA object only with --split test.")
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("data", type=Path, metavar="DATA")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--target-fpr", type=number(float, 0, 1, hi_open=True), default=None, metavar="RATE",
                      help="reject at most this share of the good images (default 0.01)")
    rule.add_argument("--f1", action="store_true", help="maximise image F1 (needs defective images)")
    p.add_argument("--split", choices=["test"], default=None,
                   help="with an MVTec AD category or VisA object as DATA: calibrate on its test split (the one "
                        "evaluate reports on; refused unless asked for)")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="NEW_MODEL",
                   help="write the calibrated model here instead of replacing MODEL")
    _add_common(p)

    p = sub.add_parser("demo", help="fit and evaluate PatchCore on real solar-cell images (ELPV)",
                       description="Fit PatchCore on good monocrystalline ELPV solar cells and evaluate on held-out "
                                   "good cells and cells labelled defective (pip install elpv-dataset).")
    p.add_argument("-o", "--output", type=Path, default=Path("defectscope-demo"), metavar="DIR",
                   help="folder for the model, metrics and heatmaps (default ./defectscope-demo)")
    p.add_argument("--n-train", type=number(int, 2), default=200, help="good cells to learn from (default 200)")
    p.add_argument("--coreset-ratio", type=number(float, 0, 1, lo_open=True), default=0.1, help="PatchCore coreset ratio (default 0.1)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the split and the coreset (default 0)")
    _add_common(p)

    from .data.download import add_download_command

    add_download_command(sub)
    from .benchmark import add_benchmark_command

    add_benchmark_command(sub)
    from .serve.command import add_serve_command

    add_serve_command(sub)
    return parser


# --------------------------------------------------------------------------- commands
def _setup(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("defectscope: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        handlers=[handler])
    # libraries' own chatter (faiss: "Could not load library with AVX512 support") is not ours to show at -v
    for noisy in ("faiss", "faiss.loader", "numba", "PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(max(1, getattr(args, "threads", None) or available_cores()))


class _LowerLevelFormatter(logging.Formatter):
    """``warning``/``info``/``error`` in lower case, as in the CLI's own ``defectscope: warning: ...`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)


def available_cores() -> int:
    """Cores this process may run on (respects CPU affinity / container limits)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _model_params(args: argparse.Namespace) -> dict[str, Any]:
    params = {}
    for option, name in _PARAM_OPTIONS.items():
        value = getattr(args, option, None)
        if value is not None:
            params[name] = value
    return params


def cmd_fit(args: argparse.Namespace) -> int:
    from .data.layouts import good_images
    from .detectors import make_detector
    from .fitting import fit_detector
    from .files import check_output_file
    from .io import save_model

    check_output_file(args.output, "model file", replaces="model")
    detector = make_detector(args.method, **_model_params(args))
    paths = good_images(args.data)
    aligner = None
    auto = None
    if args.align != "none":
        from .align import AUTO_IMAGES, choose_aligner, make_aligner
        from .data.images import load_image

        ref = args.align_ref if args.align_ref is not None else (paths[0] if paths else None)
        if len(paths) < detector.min_train_images:  # say that first, before any alignment work
            raise DefectscopeError(f"{args.data}: found {len(paths)} image(s), {detector.method} needs at least "
                                   f"{detector.min_train_images}")
        if args.align == "auto" and ref is not None:
            sample = [load_image(p) for p in paths[1 : 1 + AUTO_IMAGES]]
            aligner, auto = choose_aligner(load_image(ref), sample, reference=str(ref))
            scores = ", ".join(f"{m} {c['ncc']} ({c['unaligned']} not aligned)" if "ncc" in c else f"{m} failed"
                               for m, c in auto["candidates"].items())
            print(f"--align auto: chose {aligner.mode} (mean correlation with the reference after alignment on "
                  f"{len(sample)} training images: {scores})", file=sys.stderr)
        else:
            aligner = make_aligner(args.align, load_image(ref) if ref is not None else None, reference=str(ref))
    meta = fit_detector(
        detector, paths, batch_size=args.batch_size, threshold_quantile=args.threshold_quantile,
        progress=not args.no_progress, data_name=str(args.data), aligner=aligner,
        exclude_outliers=args.exclude_outliers,
    )
    if aligner is not None:
        meta["align"] = aligner.config() | ({"auto": auto} if auto is not None else {})
        for path in meta["training"]["alignment"]["unaligned"]:
            print(f"defectscope: warning: {path}: could not be aligned, used unaligned", file=sys.stderr)
    save_model(args.output, detector, meta, extra_tensors=aligner.tensors() if aligner is not None else None)
    skipped = meta["training"]["skipped"]
    print(
        f"wrote {args.output}: {detector.method} on {meta['training']['n_images']} images in "
        f"{meta['training']['fit_seconds']:.1f} s, threshold {meta['threshold']:.6g} "
        f"({meta['threshold_info']['quantile']:.0%} quantile of {meta['threshold_info']['n_images']} held-out scores)"
    )
    if "warning" in meta["threshold_info"]:
        print(f"defectscope: warning: {meta['threshold_info']['warning']}", file=sys.stderr)
    for item in skipped:
        print(f"defectscope: warning: skipped training image {item['error']}", file=sys.stderr)
    _print_suspects(meta["training"])
    return EXIT_SOME_FAILED if skipped else EXIT_OK


def _print_suspects(training: dict[str, Any]) -> None:
    """Say which training images may have set the threshold: one line each, then what to do."""
    excluded, suspects = training.get("excluded", []), training.get("suspects", [])
    for item in excluded:
        print(f"defectscope: warning: left out of the fit: {item['path']}: {item['reason']}", file=sys.stderr)
    for item in suspects:
        print(f"defectscope: warning: training image unlike the rest: {item['path']}: {item['reason']}",
              file=sys.stderr)
    if suspects:
        print(f"defectscope: warning: {len(suspects)} training image(s) may be defective or wrong, and they raise the "
              "threshold for every part judged later: look at them, remove them, or refit with --exclude-outliers "
              f"(rule: {training.get('outlier_rule')})", file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    from .data.images import load_image
    from .data.layouts import expand_in_order
    from .files import check_output_dir
    from .io import load_model_with_extras
    from .report.heatmaps import Verdict, heatmap_name, overlay, save_png
    from .scoring import pixel_threshold, score_paths

    if args.heatmaps is not None:
        check_output_dir(args.heatmaps, "heatmap folder")
    detector, meta, extras = load_model_with_extras(args.model)
    aligner = _model_aligner(meta, extras, args.align)
    threshold = args.threshold if args.threshold is not None else float(meta["threshold"])
    pix = pixel_threshold(meta) if args.heatmaps is not None else None
    if args.normalized and not threshold > 0:
        raise DefectscopeError(f"--normalized needs a positive threshold, got {threshold}; run `defectscope calibrate`")
    # an argument that gave no image is reported in its place among the results (argument order)
    paths: list[Path] = []
    missing: collections.deque = collections.deque()  # (number of images before it, (arg, message))
    output = args.heatmaps.resolve() if args.heatmaps is not None else None
    earlier = 0
    for entry in expand_in_order(args.paths):
        if isinstance(entry, Path):
            if output is not None and output in entry.resolve().parents:
                earlier += 1  # a heatmap of an earlier run, not a photo of a part
                continue
            paths.append(entry)
        else:
            missing.append((len(paths), entry))
    if earlier:
        print(f"defectscope: warning: {earlier} image(s) under the --heatmaps folder {args.heatmaps} were not scored "
              "(output of an earlier run)", file=sys.stderr)
    failures = 0

    def report_missing(upto: int) -> None:
        nonlocal failures
        while missing and missing[0][0] <= upto:
            arg, message = missing.popleft()[1]
            failures += 1
            _report_failure(args, arg, message, threshold)

    writer = csv.writer(sys.stdout, lineterminator="\n")
    results = score_paths(detector, paths, threshold, batch_size=args.batch_size,
                          keep_maps=args.heatmaps is not None, progress=not args.no_progress, aligner=aligner)
    had_missing = bool(missing)
    for index, result in enumerate(results):
        report_missing(index)
        if not result.ok:
            failures += 1
            _report_failure(args, str(result.path), result.error or "", threshold)
            continue
        heatmap = None
        if args.heatmaps is not None and result.map is not None:
            try:
                image = load_image(result.path)
                heatmap = args.heatmaps / heatmap_name(result.path, index)
                verdict = Verdict(score=float(result.score), threshold=threshold, judgement=int(result.judgement))
                save_png(heatmap, overlay(image, result.map, pix, verdict=verdict, side_by_side=True))
            except Exception as exc:  # noqa: BLE001 - a picture that fails never costs the other results
                print(f"defectscope: error: heatmap for {result.path}: {exc}", file=sys.stderr)
                heatmap = None
                failures += 1
        for note in result.notes:
            print(f"defectscope: warning: {result.path}: {note}", file=sys.stderr)
        if result.alignment is not None and not result.alignment["aligned"]:
            print(f"defectscope: warning: {result.path}: could not be aligned "
                  f"({result.alignment['inliers']} matching keypoints), scored unaligned", file=sys.stderr)
        shown = result.score / threshold if args.normalized else result.score
        if args.json:
            obj = {"path": str(result.path), "score": shown, "judgement": result.judgement,
                   "threshold": threshold, "error": None}
            if args.normalized:
                obj["raw_score"] = result.score
            if result.notes:
                obj["notes"] = result.notes
            if heatmap is not None:
                obj["heatmap"] = str(heatmap)
            if result.alignment is not None:
                obj["aligned"] = result.alignment["aligned"]
                obj["align_angle"] = result.alignment["angle"]
            print(dumps(obj), flush=True)
        elif result.alignment is not None:  # a 4th column: 1 aligned, 0 scored unaligned
            writer.writerow([str(result.path), f"{shown:.6f}", result.judgement, int(result.alignment["aligned"])])
        else:
            writer.writerow([str(result.path), f"{shown:.6f}", result.judgement])
            sys.stdout.flush()
    report_missing(len(paths))
    if not paths and not had_missing:
        print("defectscope: error: no images to score", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _report_failure(args: argparse.Namespace, path: str, message: str, threshold: float) -> None:
    text = message if message.startswith(path) else f"{path}: {message}"
    print(f"defectscope: error: {text}", file=sys.stderr)
    if args.json:
        print(dumps({"path": path, "score": None, "judgement": None, "threshold": threshold, "error": text}),
              flush=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data.layouts import load_category
    from .evaluation import evaluate_detector, format_summary
    from .files import check_output_dir, check_output_file
    from .io import load_model_with_extras
    from .scoring import pixel_threshold

    if args.json is not None:
        check_output_file(args.json, "JSON results file", replaces="json", inputs=(args.model,))
    for folder, what in ((args.heatmaps, "heatmap folder"), (args.report, "report folder")):
        if folder is not None:
            check_output_dir(folder, what)
    detector, meta, extras = load_model_with_extras(args.model)
    aligner = _model_aligner(meta, extras, args.align)
    threshold = args.threshold if args.threshold is not None else float(meta["threshold"])
    split = load_category(args.data)
    drawn = args.heatmaps is not None or args.report is not None
    result = evaluate_detector(detector, split, threshold, batch_size=args.batch_size,
                               progress=not args.no_progress, heatmap_dir=args.heatmaps,
                               overlay_dir=args.report / "overlays" if args.report is not None else None,
                               aligner=aligner, pixel_threshold=pixel_threshold(meta) if drawn else None,
                               protocol=args.protocol)
    result["model"] = str(args.model)
    result["data"] = str(args.data)
    if args.report is not None:
        from .report.html import write_report

        print(f"wrote report {write_report(result, args.report, meta=meta)}")
    print(format_summary(result))
    if args.json is not None:
        from .files import replacing

        with replacing(args.json) as tmp:
            tmp.write_text(dumps(result, indent=2))
    for item in result["failed"]:
        print(f"defectscope: error: {item['error']}", file=sys.stderr)
    for item in result["mask_errors"]:
        print(f"defectscope: error: {item['error']} (image kept in the image-level results, left out of the pixel "
              "metrics)", file=sys.stderr)
    return EXIT_SOME_FAILED if result["failed"] or result["mask_errors"] else EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate_model

    info = calibrate_model(args.model, args.data, target_fpr=args.target_fpr, f1=args.f1,
                           batch_size=args.batch_size, progress=not args.no_progress, split=args.split,
                           output=args.output)
    rate = "" if info["false_reject_rate"] is None else (
        f", false-reject rate {info['false_reject_rate']:.2%} here (95% upper bound {info['false_reject_upper95']:.2%})")
    print(f"wrote {info['written']}: threshold {info['threshold']:.6g} (was {info['previous_threshold']:.6g}); "
          f"{info['rule']}; rests on {info['n_good']} good and {info['n_defective']} defective images from "
          f"{info['source']}{rate}")
    if "warning" in info:
        print(f"defectscope: warning: {info['warning']}", file=sys.stderr)
    for item in info["failed"]:
        print(f"defectscope: error: {item['error']}", file=sys.stderr)
    return EXIT_SOME_FAILED if info["failed"] else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .files import check_output_dir

    check_output_dir(args.output, "demo folder")
    run_demo(args.output, n_train=args.n_train, coreset_ratio=args.coreset_ratio, seed=args.seed,
             batch_size=args.batch_size, progress=not args.no_progress)
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    from .data.layouts import good_images, load_category
    from .tune import markdown_table, split_validation, tune_layers, write_csv

    from .files import check_output_dir, check_output_file

    if args.fit_best and args.output is None:
        raise DefectscopeError("--fit-best needs -o MODEL, the model file to write")
    if args.fit_best:
        check_output_file(args.output, "model file", replaces="model")
    if args.out is not None:
        check_output_dir(args.out, "--out folder")
    params = _model_params(args)
    stages = params.pop("layers", None)
    split = load_category(args.data)
    train = good_images(args.data)
    if args.val is not None:
        validation, held_out = load_category(args.val).test, split.test
        source = f"validation images {args.val}"
    else:
        validation, held_out = split_validation(split.test, args.val_fraction, seed=params.get("seed", 0))
        source = f"{args.val_fraction:.0%} of {args.data}'s test images held out for validation (per defect type)"
    result = tune_layers(args.method, train, validation, held_out, params=params, stages=stages,
                         max_trials=args.max_trials, search=args.search, validation_source=source,
                         batch_size=args.batch_size, announce=lambda text: print(text, file=sys.stderr, flush=True))
    table = markdown_table(result)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune.md").write_text(table + "\n")
        write_csv(result, args.out / "tune.csv")
        (args.out / "tune.json").write_text(dumps(result.as_dict(), indent=2))
    if args.fit_best:
        from .detectors import make_detector
        from .fitting import fit_detector
        from .io import save_model

        detector = make_detector(args.method, **dict(params, layers=result.best))
        meta = fit_detector(detector, train, batch_size=args.batch_size, threshold_quantile=args.threshold_quantile,
                            progress=not args.no_progress, data_name=str(args.data))
        meta["tune"] = {"best": result.best, "validation": result.validation, "held_out": result.held_out}
        save_model(args.output, detector, meta)
        print(f"wrote {args.output}: {args.method} with layers {','.join(result.best)}")
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    from .data.download import run_download_command

    return run_download_command(args)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import run_benchmark_command

    return run_benchmark_command(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.command import run

    return run(args)


COMMANDS = {"fit": cmd_fit, "predict": cmd_predict, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate, "demo": cmd_demo,
            "download": cmd_download, "benchmark": cmd_benchmark, "tune": cmd_tune,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup(args)
    try:
        return COMMANDS[args.command](args)
    except DefectscopeError as exc:
        print(f"defectscope: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # disk full, permissions, a folder vanished: one line naming the path, never a traceback
        from .files import os_error_message

        print(f"defectscope: error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("defectscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
