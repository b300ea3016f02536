"""The `defectscope` command: parse arguments, call the library, print results.

Exit codes: 0 success, 1 some images could not be scored (the rest were), 2 the command
could not run (bad arguments, unreadable model, malformed data).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..common.argtypes import number, positive_int, probability_open, seed_int
from ..common.jsonout import dumps
from ..errors import DefectscopeError
from ..export import RUNTIME_CHOICES
from ..version import MODEL_FORMAT_VERSION, __version__
from .options import (
    add_align_options,
    add_common,
    add_judge_options,
    add_model_options,
    add_roi_option,
    add_threshold_options,
    judge_options,
    model_params,
    show_progress,
)

log = logging.getLogger("defectscope")

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2
#: the methods, named here so that building the parser imports no detector (and no torch)
METHOD_NAMES = ("patchcore", "padim", "spade")
#: the datasets ``download`` knows (defectscope.data.download.ARCHIVES), named here for the same reason
DATASETS = ("mvtec_ad", "visa")


# --------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line: ``defectscope fit: error: ...`` and a pointer to --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="defectscope",
        description="Unsupervised visual inspection: learn good parts from photos, then find defects.",
    )
    parser.add_argument(
        "--version", action="version", version=f"defectscope {__version__} (model format {MODEL_FORMAT_VERSION})"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "fit",
        help="learn a model from good images",
        description="Learn a model from good images. DATA is an MVTec AD category folder "
        "(train/good is used), a VisA object folder (train/Normal), a plain test folder "
        "(its train/) or any folder of good images (searched recursively).",
    )
    p.add_argument("data", type=Path, metavar="DATA")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL", help="model file to write")
    p.add_argument(
        "--exclude-outliers",
        action="store_true",
        help="fit again without the training images that look unlike the rest (held-out score outliers "
        "and images far smaller than the model input; fit names them either way)",
    )
    add_model_options(p)
    add_judge_options(p)
    add_align_options(p, fit=True)
    add_roi_option(p)
    add_common(p)

    p = sub.add_parser(
        "predict",
        help="score images: prints path,score,judgement",
        description="Score images with a model. Prints one line per image: path,score,judgement "
        "(judgement 0 = good, 1 = defective: score at or above the threshold). Images that "
        "cannot be read are reported on stderr and the exit code is 1.",
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files, folders (recursive) or globs; - reads paths from standard input, one per line, "
        "each scored and printed as soon as it arrives",
    )
    p.add_argument(
        "-0",
        "--null",
        action="store_true",
        help="with -: paths on standard input are separated by NUL characters (find -print0)",
    )
    add_threshold_options(p)
    p.add_argument("--heatmaps", type=Path, default=None, metavar="DIR", help="write a heatmap overlay PNG per image")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object per line: path, score, judgement, threshold, error"
    )
    p.add_argument(
        "--normalized",
        action="store_true",
        help="print score / threshold (1.0 = the threshold); --json then adds raw_score",
    )
    add_align_options(p, fit=False)
    add_common(p)

    p = sub.add_parser(
        "evaluate",
        help="image/pixel AUROC on labelled test data",
        description="Evaluate a model on an MVTec AD-layout category (test/<type>/..., "
        "ground_truth/<type>/<stem>_mask.png), a VisA object folder (test/Normal, "
        "test/Anomaly, Masks/Anomaly) or a plain folder (good/ + defect folders).",
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("data", type=Path, metavar="DATA")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write all results as one JSON object")
    p.add_argument("--heatmaps", type=Path, default=None, metavar="DIR", help="write heatmap overlays per test image")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a self-contained HTML report (DIR/index.html, figures, overlays)",
    )
    add_threshold_options(p)
    p.add_argument(
        "--protocol",
        choices=["native", "mvtec"],
        default="native",
        help="native: each map (taken back over its photo through the model's resize protocol, at about "
        "the model's input size) and its mask resized to it; mvtec: maps upsampled to each "
        "mask's own resolution (the literature's protocol), plus the image AUROC from each map's "
        "maximum (default native)",
    )
    add_align_options(p, fit=False)
    add_common(p)

    p = sub.add_parser(
        "tune",
        help="choose feature layers (block per stage, stage combination) on validation data",
        description="Search which block of each backbone stage, and which combination of stages, gives "
        "the best validation image AUROC. DATA is an MVTec AD category (train/good to fit, "
        "test/ for validation and held-out results). --layers names the stages searched "
        "(default: the method's layers). Prints a ranked Markdown table.",
    )
    p.add_argument("data", type=Path, metavar="DATA")
    val = p.add_mutually_exclusive_group()
    val.add_argument(
        "--val",
        type=Path,
        default=None,
        metavar="DATA",
        help="labelled validation images (MVTec AD layout or plain folder); DATA's test set is then entirely held out",
    )
    val.add_argument(
        "--val-fraction",
        type=probability_open,
        default=0.5,
        help="share of DATA's test images (per defect type) used for validation when --val is not "
        "given (default 0.5); the rest is held out and reported separately",
    )
    p.add_argument("--max-trials", type=positive_int, default=None, help="candidates to evaluate (default: all)")
    p.add_argument(
        "--search",
        choices=["random", "full"],
        default="random",
        help="random: a seeded draw of --max-trials candidates; full: the grid in order (default random)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="write DIR/tune.md (the table), DIR/tune.csv (one row per candidate) and DIR/tune.json (everything)",
    )
    p.add_argument("--fit-best", action="store_true", help="fit the winning layers on all of train/ and write -o MODEL")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="MODEL", help="model file for --fit-best")
    add_model_options(p)
    add_common(p)

    p = sub.add_parser(
        "calibrate",
        help="aim the model's threshold at a catch rate, a false-reject rate or a cost, from validation images",
        description="Score validation images, choose a threshold by one rule and store it in the model file "
        "under a name, with its evidence (rule, counts, both rates with 95 % Clopper-Pearson intervals, data, "
        "date); by default it becomes the active threshold (the old one stays as a named entry and in the "
        "threshold history). Prints the catch rate and false-reject rate it reaches, and warns when the images "
        "are too few for the target. DATA is a plain test folder (good/ + defect folders, labelled) or any "
        "folder of good images; an MVTec AD category or VisA object only with --split test.",
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("data", type=Path, metavar="DATA")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument(
        "--catch",
        type=number(float, 0, 1, lo_open=True),
        default=None,
        metavar="RATE",
        help="the highest threshold that still catches at least this share of the labelled defective images "
        "(e.g. 0.95), so the fewest good parts are rejected; needs defective images",
    )
    rule.add_argument(
        "--false-reject",
        type=number(float, 0, 1, hi_open=True),
        default=None,
        metavar="RATE",
        help="the lowest threshold that rejects at most this share of the good images (default: 0.01); "
        "good images suffice",
    )
    rule.add_argument(
        "--target-fpr",
        type=number(float, 0, 1, hi_open=True),
        default=None,
        metavar="RATE",
        help="another name for --false-reject",
    )
    rule.add_argument(
        "--cost-miss",
        type=number(float, 0, lo_open=True),
        default=None,
        metavar="C",
        help="the threshold of least expected cost on the labelled images: C per missed defect plus "
        "--cost-reject per good part rejected (ties go to the lower threshold, which catches more); "
        "needs good and defective images",
    )
    rule.add_argument("--f1", action="store_true", help="maximise image F1 (needs good and defective images)")
    p.add_argument(
        "--cost-reject",
        type=number(float, 0, lo_open=True),
        default=None,
        metavar="C",
        help="with --cost-miss: the cost of rejecting a good part (default 1)",
    )
    p.add_argument(
        "--name",
        default=None,
        metavar="NAME",
        help="store the threshold under this name (default: the rule's, e.g. catch-0.95, false-reject-0.01, "
        "cost-20, f1); an existing entry of that name is replaced; 'fit' is the fit-time threshold's",
    )
    p.add_argument(
        "--no-activate",
        dest="activate",
        action="store_false",
        help="store it as a named alternative only (predict --threshold-name NAME); the active threshold stays",
    )
    p.add_argument(
        "--split",
        choices=["test"],
        default=None,
        help="with an MVTec AD category or VisA object as DATA: calibrate on its test split (the one "
        "evaluate reports on; refused unless asked for)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="NEW_MODEL",
        help="write the calibrated model here instead of replacing MODEL",
    )
    add_common(p)

    p = sub.add_parser(
        "demo",
        help="fit and evaluate PatchCore on real solar-cell images (ELPV)",
        description="Fit PatchCore on good monocrystalline ELPV solar cells and evaluate on held-out "
        "good cells and cells labelled defective (pip install elpv-dataset).",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("defectscope-demo"),
        metavar="DIR",
        help="folder for the model, metrics and heatmaps (default ./defectscope-demo)",
    )
    p.add_argument("--n-train", type=number(int, 2), default=200, help="good cells to learn from (default 200)")
    p.add_argument(
        "--coreset-ratio",
        type=number(float, 0, 1, lo_open=True),
        default=0.1,
        help="PatchCore coreset ratio (default 0.1)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the split and the coreset (default 0)")
    add_common(p)

    _add_download_command(sub)
    _add_benchmark_command(sub)
    from ..serve.command import add_serve_command  # argparse only: the web stack loads when serve runs

    add_serve_command(sub)
    _add_export_command(sub)
    _add_batch_command(sub)
    return parser


def _add_download_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download MVTec AD or VisA from the official URLs")
    p.add_argument("dataset", choices=list(DATASETS), help="which dataset")
    p.add_argument(
        "--category",
        dest="categories",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="categories / objects to fetch (repeatable or comma-separated; default: all)",
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--base-url", default=None, help="fetch the archives from this mirror instead")
    p.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives")
    bars = p.add_mutually_exclusive_group()
    bars.add_argument(
        "--progress", action="store_true", help="show the progress bar even when stderr is not a terminal"
    )
    bars.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_benchmark_command(sub: argparse._SubParsersAction) -> None:
    """``benchmark``: model options named as in ``fit`` (each method takes the ones that apply to it)."""
    p = sub.add_parser(
        "benchmark",
        help="fit + evaluate methods on every category of a dataset; tables of the results",
        description="For each method and category: fit on the category's good training images, evaluate on its "
        "test images. ROOT is an MVTec AD root or category, a VisA root or object folder, or a plain "
        "folder (good/ + defect folders + train/). Finished cells are kept in OUT/cells and skipped "
        "when run again with the same settings. Exit code 1 if any cell failed.",
    )
    p.add_argument("root", type=Path, metavar="ROOT")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHOD_NAMES),
        choices=list(METHOD_NAMES),
        metavar="METHOD",
        help=f"methods to run (default: all: {' '.join(METHOD_NAMES)})",
    )
    p.add_argument("--categories", nargs="+", default=None, metavar="NAME", help="only these categories / objects")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("benchmark-results"),
        metavar="DIR",
        help="folder for cells, tables and reports (default ./benchmark-results)",
    )
    p.add_argument("--force", action="store_true", help="recompute cells that are already done")
    p.add_argument(
        "--report",
        action="store_true",
        help="also write an HTML report per method and category (for the cells computed in this run)",
    )
    p.add_argument("--save-models", action="store_true", help="keep each fitted model in DIR/models")
    add_model_options(p, method=False)
    add_common(p)


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    """``export``: the model as one ONNX or OpenVINO graph in a new folder (see defectscope.export)."""
    from ..export import FORMATS

    p = sub.add_parser(
        "export",
        help="write the model as an ONNX or OpenVINO graph that runs without torch",
        description="Write MODEL's whole scoring path (normalisation, backbone, features, distances, map, image "
        "score) as one graph, with the model's metadata, into the new folder DIR. `defectscope predict "
        "DIR ...` and defectscope.load(DIR) then run it with onnxruntime or OpenVINO, without torch. The "
        "export scores a few images both ways and prints how far they agree. PatchCore and PaDiM only.",
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument(
        "--format",
        choices=list(FORMATS),
        default="onnx",
        help="onnx (runs on onnxruntime or OpenVINO) or openvino (OpenVINO IR); default onnx",
    )
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="new (or empty) folder to write")
    p.add_argument(
        "--check",
        nargs="+",
        type=Path,
        default=[],
        metavar="IMAGE",
        help="image files to measure the agreement on (default: 4 synthetic images)",
    )
    p.add_argument("--threads", type=number(int, 1, 1024), default=None, help="CPU threads (default: all cores)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level)")


def _add_batch_command(sub: argparse._SubParsersAction) -> None:
    """``batch``: score an archive into Parquet or CSV, locally or on a Ray cluster (defectscope.batch)."""
    p = sub.add_parser(
        "batch",
        help="score many images into a Parquet or CSV table, locally or on a Ray cluster; resumable",
        description="Score every image of INPUT into OUT, one row per image: path, score, judgement, threshold, "
        "normalized_score, error, heatmap, model_checksum. Unreadable images become rows with an error. "
        "Exit code 1 if any row has an error. --threads is this process's torch threads with the local "
        "engine (default: all cores) and each actor's CPUs with Ray (default 1).",
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (recursive), globs, or list files (.txt, .lst, .list: one path per line)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="OUT",
        help="OUT.parquet (or no ending): a folder of Parquet parts and _manifest.json; OUT.csv: one CSV file",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: score in this process, rows streamed to OUT as scored (default); ray: Ray Data with "
        "an actor pool, one model per actor (pip install 'defectscope[ray]')",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="auto|HOST:PORT",
        help="with --engine ray: the cluster to join (default: one started on this machine by `ray start`, "
        "else a private one for this run)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --engine ray: actors in the pool (default: the cluster's CPUs / --threads)",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="OUT exists: score only the paths not in it yet (rows are keyed by path; every path ends "
        "up in OUT exactly once); without OUT, start it",
    )
    again.add_argument("--force", action="store_true", help="OUT exists: replace it (its rows are discarded)")
    p.add_argument(
        "--heatmaps",
        type=Path,
        default=None,
        metavar="DIR",
        help="write an overlay PNG per image into DIR (named after the path) and its path into the row",
    )
    add_threshold_options(p)
    p.add_argument(
        "--runtime",
        choices=list(RUNTIME_CHOICES),
        default="auto",
        help="what scores: auto (default: the model's export on onnxruntime, measured 1.2x faster than "
        "torch at equal results, when the export extra is installed and the model can be exported, "
        "else torch; the choice is said and recorded in the manifest), torch, onnxruntime or openvino",
    )
    p.add_argument(
        "--part-rows",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="Parquet: rows per part file (a part is also committed every 30 s; default 10000)",
    )
    add_common(p)


# --------------------------------------------------------------------------- commands
def _setup(args: argparse.Namespace) -> None:
    # a file name that is not valid UTF-8 is printed as the bytes it has (a script can open it), never a crash
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("defectscope: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, handlers=[handler])
    # libraries' own chatter (faiss: "Could not load library with AVX512 support") is not ours to show at -v
    for noisy in ("faiss", "faiss.loader", "numba", "PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    threads = max(1, getattr(args, "threads", None) or available_cores())
    from ..export import is_exported, set_threads

    set_threads(threads)
    if is_exported(getattr(args, "model", None)) and args.command != "export":  # runs without torch
        return
    import torch

    torch.set_num_threads(threads)


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


def cmd_fit(args: argparse.Namespace) -> int:
    from ..api import check_model_output, fit

    check_model_output(args.output)
    model = fit(
        args.data,
        method=args.method,
        align=args.align,
        align_ref=args.align_ref,
        roi=args.roi,
        threshold_quantile=args.threshold_quantile,
        exclude_outliers=args.exclude_outliers,
        batch_size=args.batch_size,
        progress=show_progress(args),
        **judge_options(args),
        **model_params(args),
    )
    detector, meta = model.detector, model.meta
    auto = (meta.get("align") or {}).get("auto")
    if auto is not None:
        scores = ", ".join(
            f"{m} {c['ncc']} ({c['unaligned']} not aligned)" if "ncc" in c else f"{m} failed"
            for m, c in auto["candidates"].items()
        )
        print(
            f"--align auto: chose {auto['chosen']} (mean correlation with the reference after alignment on "
            f"{auto['n_images']} training images: {scores})",
            file=sys.stderr,
        )
    _print_roi(meta.get("roi"))
    alignment = meta["training"].get("alignment", {})
    for path in alignment.get("unaligned", []):
        print(f"defectscope: warning: {path}: could not be aligned, used unaligned", file=sys.stderr)
    if alignment.get("n_unrefined"):
        print(
            f"defectscope: note: ECC kept the {model.aligner.base_mode} pose of {alignment['n_unrefined']} "
            "training image(s) (listed in the model's training.alignment.unrefined)",
            file=sys.stderr,
        )
    model.save(args.output)
    skipped = meta["training"]["skipped"]
    print(
        f"wrote {args.output}: {detector.method} on {meta['training']['n_images']} images in "
        f"{meta['training']['fit_seconds']:.1f} s, threshold {meta['threshold']:.6g} "
        f"({meta['threshold_info']['quantile']:.0%} quantile of {meta['threshold_info']['n_images']} held-out scores)"
        + (f"; judged by {model.judge.describe()}" if model.judge is not None else "")
    )
    if "warning" in meta["threshold_info"]:
        print(f"defectscope: warning: {meta['threshold_info']['warning']}", file=sys.stderr)
    # skipped training images: defectscope.fit logs each ("defectscope: warning: skipped training image ...")
    _print_suspects(meta["training"])
    return EXIT_SOME_FAILED if skipped else EXIT_OK


def _print_roi(record: dict[str, Any] | None) -> None:
    """Say what region of interest the fit judges (or, for --roi auto, why none)."""
    if record is None:
        return
    if record.get("applied") is False:
        print(f"defectscope: warning: --roi auto: {record['reason']}", file=sys.stderr)
        return
    found = (
        f"the part's silhouette in {record['n_found']} of {record['n_images']} training images, widened by "
        f"{record['margin_px']} px"
        if record["kind"] == "auto"
        else record["source"]
    )
    print(f"--roi {record['kind']}: judging {record['share']:.0%} of the model input ({found})", file=sys.stderr)


def _print_suspects(training: dict[str, Any]) -> None:
    """Say which training images may have set the threshold: one line each, then what to do."""
    excluded, suspects = training.get("excluded", []), training.get("suspects", [])
    for item in excluded:
        print(f"defectscope: warning: left out of the fit: {item['path']}: {item['reason']}", file=sys.stderr)
    for item in suspects:
        print(
            f"defectscope: warning: training image unlike the rest: {item['path']}: {item['reason']}", file=sys.stderr
        )
    if suspects:
        remedy = (
            "check --image-size against the photos, or the folder's content"
            if training.get("exclusion_declined")
            else "look at them, remove them, or refit with --exclude-outliers"
        )
        print(
            f"defectscope: warning: {len(suspects)} training image(s) may be defective or wrong, and they raise the "
            f"threshold for every part judged later: {remedy} (rule: {training.get('outlier_rule')})",
            file=sys.stderr,
        )


def cmd_predict(args: argparse.Namespace) -> int:
    from ..api import load
    from ..common.files import check_output_dir

    if args.heatmaps is not None:
        check_output_dir(args.heatmaps, "heatmap folder")
    stdin = [p for p in args.paths if p == "-"]
    if args.null and not stdin:
        raise DefectscopeError("-0 reads NUL-separated paths from standard input: give - as the PATH")
    if stdin and len(args.paths) > 1:
        raise DefectscopeError("- (paths from standard input) cannot be mixed with other PATH arguments")
    model = load(args.model, align=args.align)
    threshold = _threshold_of(model, args)
    if args.normalized and not threshold > 0:
        raise DefectscopeError(f"--normalized needs a positive threshold, got {threshold}; run `defectscope calibrate`")
    printer = _PredictPrinter(args, threshold)
    if stdin:
        from .stdin_paths import available_batches, read_paths

        batches = available_batches(read_paths(sys.stdin.buffer, sep=b"\0" if args.null else b"\n"), args.batch_size)
        scored = any_input = False
        for batch in batches:
            any_input = True
            scored |= printer.score(model, [Path(p) for p in batch])
        if not any_input:
            print("defectscope: error: no paths on standard input", file=sys.stderr)
            return EXIT_ERROR
    else:
        scored = printer.score(model, _argument_entries(args), progress=show_progress(args))
        if not scored:
            print("defectscope: error: no images to score", file=sys.stderr)
            return EXIT_ERROR
    return EXIT_SOME_FAILED if printer.failures else EXIT_OK


def _threshold_of(model: Any, args: argparse.Namespace) -> float:
    """The threshold a command judges with: --threshold, the model's threshold named --threshold-name, or
    the active one (an unknown name: DefectscopeError listing the names, before any image is read)."""
    if args.threshold_name is not None:
        return float(model.named_threshold(args.threshold_name))
    return float(args.threshold) if args.threshold is not None else float(model.threshold)


def _argument_entries(args: argparse.Namespace) -> list[Path | tuple[str, str]]:
    """The PATH arguments expanded in order (files, folders, globs), without earlier heatmaps; an argument
    that gave no image stays in its place as (argument, message)."""
    from ..data.layouts import expand_in_order

    output = args.heatmaps.resolve() if args.heatmaps is not None else None
    entries: list[Path | tuple[str, str]] = []
    earlier = 0
    for entry in expand_in_order(args.paths):
        if isinstance(entry, Path) and output is not None and output in entry.resolve().parents:
            earlier += 1  # a heatmap of an earlier run, not a photo of a part
            continue
        entries.append(entry)
    if earlier:
        print(
            f"defectscope: warning: {earlier} image(s) under the --heatmaps folder {args.heatmaps} were not scored "
            "(output of an earlier run)",
            file=sys.stderr,
        )
    return entries


class _PredictPrinter:
    """Scores entries and prints one line (CSV or JSON) per entry, in input order, flushed at once."""

    def __init__(self, args: argparse.Namespace, threshold: float) -> None:
        self.args = args
        self.threshold = threshold
        self.failures = 0
        self.index = 0  # images scored so far: numbers the heatmap files
        self.writer = csv.writer(sys.stdout, lineterminator="\n")

    def score(self, model: Any, entries: list[Path | tuple[str, str]], progress: bool = False) -> bool:
        """Score the paths among ``entries`` and print every entry's line; True if any entry was there."""
        paths = [e for e in entries if isinstance(e, Path)]
        results = iter(
            model.iter_predict(
                paths,
                maps=self.args.heatmaps is not None,
                threshold=self.threshold,
                batch_size=self.args.batch_size,
                progress=progress,
            )
        )
        for entry in entries:
            if isinstance(entry, Path):
                self._print(next(results))
            else:
                self.failures += 1
                _report_failure(self.args, entry[0], entry[1], self.threshold)
        return bool(entries)

    def _print(self, result: Any) -> None:
        from ..report.heatmaps import heatmap_name, save_png

        args, threshold = self.args, self.threshold
        index, self.index = self.index, self.index + 1
        if not result.ok:
            self.failures += 1
            _report_failure(args, result.name, result.error or "", threshold)
            return
        heatmap = None
        if args.heatmaps is not None:
            try:
                heatmap = args.heatmaps / heatmap_name(Path(result.name), index)
                save_png(heatmap, result.overlay(side_by_side=True))
            except Exception as exc:
                print(f"defectscope: error: heatmap for {result.name}: {exc}", file=sys.stderr)
                heatmap = None
                self.failures += 1
        for note in result.notes:
            print(f"defectscope: warning: {result.name}: {note}", file=sys.stderr)
        if result.alignment is not None and not result.alignment["aligned"]:
            print(
                f"defectscope: warning: {result.name}: could not be aligned "
                f"({result.alignment['inliers']} matching keypoints), scored unaligned",
                file=sys.stderr,
            )
        shown = result.score / threshold if args.normalized else result.score
        if args.json:
            obj = {
                "path": result.name,
                "score": shown,
                "judgement": result.judgement,
                "threshold": threshold,
                "error": None,
            }
            if args.normalized:
                obj["raw_score"] = result.score
            if result.notes:
                obj["notes"] = result.notes
            if heatmap is not None:
                obj["heatmap"] = str(heatmap)
            if result.alignment is not None:
                obj["aligned"] = result.alignment["aligned"]
                obj["align_angle"] = result.alignment["angle"]
                if "refined" in result.alignment:
                    obj["align_refined"] = result.alignment["refined"]
            if result.regions is not None:  # a model judged by region: what the judgement rests on
                obj["regions"] = result.regions
            print(dumps(obj))
        elif result.alignment is not None:  # a 4th column: 1 aligned, 0 scored unaligned
            self.writer.writerow([result.name, f"{shown:.6f}", result.judgement, int(result.alignment["aligned"])])
        else:
            self.writer.writerow([result.name, f"{shown:.6f}", result.judgement])
        sys.stdout.flush()


def _report_failure(args: argparse.Namespace, path: str, message: str, threshold: float) -> None:
    text = message if message.startswith(path) else f"{path}: {message}"
    print(f"defectscope: error: {text}", file=sys.stderr)
    if args.json:
        print(
            dumps({"path": path, "score": None, "judgement": None, "threshold": threshold, "error": text}), flush=True
        )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..api import load
    from ..common.files import JSON_FILE, check_output_dir, check_output_file
    from ..evaluation.evaluate import format_summary

    if args.json is not None:
        check_output_file(args.json, "JSON results file", replaces=JSON_FILE, inputs=(args.model,))
    for folder, what in ((args.heatmaps, "heatmap folder"), (args.report, "report folder")):
        if folder is not None:
            check_output_dir(folder, what)
    model = load(args.model, align=args.align)
    meta = model.meta
    threshold = _threshold_of(model, args)
    drawn = args.heatmaps is not None or args.report is not None
    result = model.evaluate(
        args.data,
        threshold=threshold,
        batch_size=args.batch_size,
        progress=show_progress(args),
        heatmap_dir=args.heatmaps,
        overlay_dir=args.report / "overlays" if args.report is not None else None,
        pixel_threshold=model.pixel_threshold if drawn else None,
        protocol=args.protocol,
    )
    result["model"] = str(args.model)
    result["data"] = str(args.data)
    if args.report is not None:
        from ..report.html import write_report

        print(f"wrote report {write_report(result, args.report, meta=meta)}")
    print(format_summary(result))
    if args.json is not None:
        from ..common.files import replacing

        with replacing(args.json) as tmp:
            tmp.write_text(dumps(result, indent=2))
    for item in result["failed"]:
        print(f"defectscope: error: {item['error']}", file=sys.stderr)
    for item in result["mask_errors"]:
        print(
            f"defectscope: error: {item['error']} (image kept in the image-level results, left out of the pixel "
            "metrics)",
            file=sys.stderr,
        )
    return EXIT_SOME_FAILED if result["failed"] or result["mask_errors"] else EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..evaluation.calibration import calibrate_model, format_rate

    info = calibrate_model(
        args.model,
        args.data,
        catch=args.catch,
        false_reject=args.false_reject,
        target_fpr=args.target_fpr,
        cost_miss=args.cost_miss,
        cost_reject=args.cost_reject,
        f1=args.f1,
        name=args.name,
        activate=args.activate,
        batch_size=args.batch_size,
        progress=show_progress(args),
        split=args.split,
        output=args.output,
    )
    was = f'"{info["previous_name"]}" = ' if info["previous_name"] else ""
    if info["active"]:
        state = f"now the active threshold (was {was}{info['previous_threshold']:.6g})"
    else:
        state = f"a named alternative (the active threshold stays {was}{info['previous_threshold']:.6g})"
    replaced = info["replaced"]
    if replaced is not None:
        state += f'; replaces the earlier "{info["name"]}" = {float(replaced["value"]):.6g}'
    print(f'wrote {info["written"]}: threshold "{info["name"]}" = {info["threshold"]:.6g}, {state}')
    print(f"  rule:              {info['rule_short']} ({info['rule']})")
    print(f"  images:            {info['n_good']} good and {info['n_defective']} defective, {info['source']}")
    print(f"  catch rate:        {format_rate(info['rates']['catch'])}")
    print(f"  false-reject rate: {format_rate(info['rates']['false_reject'])}")
    if "expected_cost" in info:
        misses = info["n_defective"] - info["rates"]["catch"]["count"]
        share = info["n_defective"] / info["n_images"]
        print(
            f"  expected cost:     {info['expected_cost']:.6g} = {info['cost_miss']:g} x {misses} missed + "
            f"{info['cost_reject']:g} x {info['rates']['false_reject']['count']} rejected, over these "
            f"{info['n_images']} images ({100 * share:.1f} % of them defective)"
        )
    if "warning" in info:
        print(f"defectscope: warning: {info['warning']}", file=sys.stderr)
    for item in info["failed"]:
        print(f"defectscope: error: {item['error']}", file=sys.stderr)
    return EXIT_SOME_FAILED if info["failed"] else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ..common.files import check_output_dir
    from ..demo import run_demo

    check_output_dir(args.output, "demo folder")
    run_demo(
        args.output,
        n_train=args.n_train,
        coreset_ratio=args.coreset_ratio,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=show_progress(args),
    )
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    from ..api import check_model_output
    from ..common.files import check_output_dir
    from ..data.layouts import good_images, load_category
    from ..evaluation.tune import markdown_table, split_validation, tune_layers, write_csv

    if args.fit_best and args.output is None:
        raise DefectscopeError("--fit-best needs -o MODEL, the model file to write")
    if args.fit_best:
        check_model_output(args.output)
    if args.out is not None:
        check_output_dir(args.out, "--out folder")
    params = model_params(args)
    stages = params.pop("layers", None)
    split = load_category(args.data)
    train = good_images(args.data)
    if args.val is not None:
        validation, held_out = load_category(args.val).test, split.test
        source = f"validation images {args.val}"
    else:
        validation, held_out = split_validation(split.test, args.val_fraction, seed=params.get("seed", 0))
        source = f"{args.val_fraction:.0%} of {args.data}'s test images held out for validation (per defect type)"
    result = tune_layers(
        args.method,
        train,
        validation,
        held_out,
        params=params,
        stages=stages,
        max_trials=args.max_trials,
        search=args.search,
        validation_source=source,
        batch_size=args.batch_size,
        announce=lambda text: print(text, file=sys.stderr, flush=True),
    )
    table = markdown_table(result)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune.md").write_text(table + "\n")
        write_csv(result, args.out / "tune.csv")
        (args.out / "tune.json").write_text(dumps(result.as_dict(), indent=2))
    if args.fit_best:
        from ..api import fit

        model = fit(
            train,
            method=args.method,
            threshold_quantile=args.threshold_quantile,
            batch_size=args.batch_size,
            progress=show_progress(args),
            data_name=str(args.data),
            **dict(params, layers=result.best),
        )
        model.meta["tune"] = {"best": result.best, "validation": result.validation, "held_out": result.held_out}
        model.save(args.output)
        print(f"wrote {args.output}: {args.method} with layers {','.join(result.best)}")
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    """Fetch the archives; print the folders it produced."""
    from ..data.download import download_dataset

    cats = None
    if args.categories:
        cats = [c.strip() for item in args.categories for c in item.split(",") if c.strip()]
    folders = download_dataset(
        args.dataset,
        args.out,
        cats,
        progress=show_progress(args),
        base_url=args.base_url,
        keep_archives=args.keep_archives,
    )
    for folder in folders:
        print(folder)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from ..export.exporter import export_model

    meta = export_model(args.model, args.output, args.format, check_images=args.check)
    agreement = meta["export"]["agreement"]
    print(
        f"wrote {args.output}: {meta['method']} as {args.format} ({meta['export']['graph']}); on "
        f"{agreement['images']}, {agreement['runtime']} and torch agree to {agreement['max_score_rel']:.1e} relative "
        f"(scores) and {agreement['max_map_diff']:.1e} of the map's range, judgements "
        f"{'equal' if agreement['judgements_equal'] else 'DIFFERENT'}"
    )
    if not agreement["within"]:
        print(
            "defectscope: warning: outside the tolerance (scores 1e-4 relative, maps 1e-3 of their range, equal "
            "judgements): check the export before using it",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED
    return EXIT_OK


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Progress on stderr, the Markdown table on stdout; exit code 1 if any cell failed."""
    from ..benchmark import format_markdown, run_benchmark

    def notify(message: str) -> None:
        print(f"defectscope: {message}", file=sys.stderr, flush=True)

    cells = run_benchmark(
        args.root,
        args.methods,
        categories=args.categories,
        params=model_params(args),
        out_dir=args.output,
        batch_size=args.batch_size,
        threshold_quantile=args.threshold_quantile,
        force=args.force,
        report=args.report,
        save_models=args.save_models,
        progress=show_progress(args),
        notify=notify,
    )
    print(format_markdown(cells), end="")
    print(f"wrote {args.output / 'benchmark.md'}, benchmark.csv, benchmark.json, index.html")
    failed = [c for c in cells if c.get("status") != "ok"]
    for c in failed:
        print(f"defectscope: error: {c['method']} / {c['category']}: {c['error']}", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve.command import run

    return run(args)


def cmd_batch(args: argparse.Namespace) -> int:
    """Progress on stderr, the summary on stdout; exit code 1 if any row has an error."""
    from ..batch import run_batch

    def notify(message: str) -> None:
        print(f"defectscope: batch: {message}", file=sys.stderr, flush=True)

    summary = run_batch(
        args.model,
        args.inputs,
        args.output,
        engine=args.engine,
        address=args.address,
        workers=args.workers,
        threads=args.threads,
        batch_size=args.batch_size,
        threshold=args.threshold,
        threshold_name=args.threshold_name,
        heatmaps=args.heatmaps,
        resume=args.resume,
        force=args.force,
        part_rows=args.part_rows,
        runtime=args.runtime,
        progress=show_progress(args),
        notify=notify,
    )
    skipped = f", {summary.skipped} skipped (already there)" if summary.skipped else ""
    print(
        f"wrote {summary.out}: {summary.scored} row(s), {summary.errors} with an error, in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} images/s){skipped}; {summary.total_rows} row(s) in all"
    )
    return EXIT_SOME_FAILED if summary.errors else EXIT_OK


COMMANDS = {
    "fit": cmd_fit,
    "predict": cmd_predict,
    "evaluate": cmd_evaluate,
    "calibrate": cmd_calibrate,
    "demo": cmd_demo,
    "download": cmd_download,
    "benchmark": cmd_benchmark,
    "tune": cmd_tune,
    "serve": cmd_serve,
    "export": cmd_export,
    "batch": cmd_batch,
}


#: exit status after the reader of standard output went away (128 + SIGPIPE, what a shell reports for `yes | head`)
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that flushing it at exit raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup(args)
    try:
        return COMMANDS[args.command](args)
    except DefectscopeError as exc:
        print(f"defectscope: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `predict ... | head`: the reader has all it wants; stop quietly, as Unix tools do
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # disk full, permissions, a folder vanished: one line naming the path, never a traceback
        from ..common.files import os_error_message

        print(f"defectscope: error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("defectscope: interrupted", file=sys.stderr)
        return 130
