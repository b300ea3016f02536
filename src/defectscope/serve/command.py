"""``defectscope serve MODEL[=NAME] ...``: its arguments, and running the server under uvicorn.

Only argparse is imported here at module level, so building the command line's parser never
loads FastAPI; :func:`run` imports it, and says ``pip install 'defectscope[serve]'`` in one line
when the extra is missing.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import Any

from ..common.argtypes import number
from ..errors import DefectscopeError
from ..export import RUNTIME_CHOICES
from . import EXTRA_HINT
from .settings import Settings

log = logging.getLogger("defectscope.serve")

_DEFAULTS = Settings()


def add_serve_command(sub: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the command line's subparsers; returns its parser."""
    p = sub.add_parser(
        "serve",
        help="serve models over HTTP: predict, model list, metrics, a page to try them",
        description="Serve models over HTTP (FastAPI + uvicorn; pip install 'defectscope[serve]'). "
        "Concurrent requests for a model are scored together in batches. SIGHUP reloads "
        "every model file; SIGTERM finishes the requests in flight, then exits 0. See "
        "'Serving on the line' in the README.",
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serve subcommand's arguments."""
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL[=NAME]",
        help="model files to serve; NAME (default: the file name without its extension) is the name in "
        "the URL, /v1/models/NAME/predict",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)",
    )
    p.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port (default 8000; 0 picks a free one)")
    g = p.add_argument_group("batching")
    g.add_argument(
        "--max-batch",
        type=number(int, 1, 1024),
        default=_DEFAULTS.max_batch,
        help=f"most images scored in one forward pass (default {_DEFAULTS.max_batch}; 1 turns batching off)",
    )
    g.add_argument(
        "--max-wait-ms",
        type=number(float, 0, 10_000),
        default=_DEFAULTS.max_wait_ms,
        help=f"how long a request waits for others to share its batch (default {_DEFAULTS.max_wait_ms:g})",
    )
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-queue",
        type=number(int, 1, 1_000_000),
        default=_DEFAULTS.max_queue,
        help=f"most requests waiting per model; more are answered 503 with Retry-After (default {_DEFAULTS.max_queue})",
    )
    g.add_argument(
        "--timeout-s",
        type=number(float, 0, 3600, lo_open=True),
        default=_DEFAULTS.timeout_s,
        help=f"per-request limit, answered 504 (default {_DEFAULTS.timeout_s:g})",
    )
    g.add_argument(
        "--max-body-mb",
        type=number(float, 0, 4096, lo_open=True),
        default=_DEFAULTS.max_body_bytes / 2**20,
        help=f"largest request body in MB (2^20 bytes), answered 413 (default {_DEFAULTS.max_body_bytes / 2**20:g})",
    )
    g.add_argument(
        "--max-pixels",
        type=number(int, 1, 2**40),
        default=_DEFAULTS.max_pixels,
        help=f"largest image, width x height, read from the header before decoding; answered 413 "
        f"(default {_DEFAULTS.max_pixels:,})",
    )
    g = p.add_argument_group("access")
    g.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="file holding an API key: every route but /healthz, /readyz and the page then needs "
        "'Authorization: Bearer <key>' (401 otherwise)",
    )
    p.add_argument(
        "--runtime",
        choices=list(RUNTIME_CHOICES),
        default="auto",
        help="what scores: auto (default: the model's export on onnxruntime, measured 1.2x faster than "
        "torch at equal results, when the export extra is installed and the model can be exported, "
        "else torch; the choice and its reason are logged), torch, or the export on onnxruntime or "
        "OpenVINO (made once into the cache; see the README's 'Exported models'); an exported folder "
        "as MODEL runs on its own runtime",
    )
    p.add_argument(
        "--threads", type=number(int, 1, 1024), default=None, help="CPU threads for torch (default: all cores)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level) beyond the request lines")


def parse_models(specs: list[str]) -> dict[str, Path]:
    """``MODEL[=NAME]`` arguments -> {name: path}; refuses a duplicate or malformed name."""
    from .app import check_name

    models: dict[str, Path] = {}
    for spec in specs:
        path_text, sep, name = spec.rpartition("=")
        if not sep:
            path_text, name = spec, Path(spec).stem
        path = Path(path_text)
        check_name(name)
        if name in models:
            raise DefectscopeError(
                f"two models named {name!r} ({models[name]} and {path}): name them apart with MODEL=NAME"
            )
        models[name] = path
    return models


def read_api_key(path: Path) -> str:
    """The key in ``path`` (surrounding whitespace removed); refuses an empty or non-ASCII key."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DefectscopeError(f"{path}: cannot read the API key file ({exc.__class__.__name__}: {exc})") from None
    if not key or not key.isascii() or any(c.isspace() for c in key):
        raise DefectscopeError(f"{path}: the API key must be one line of printable ASCII without spaces")
    return key


def require_extra() -> None:
    """Raise DefectscopeError with the install line when the serve extra's packages are missing."""
    from importlib.util import find_spec

    wanted = {
        "fastapi": "fastapi",
        "uvicorn": "uvicorn",
        "prometheus-client": "prometheus_client",
        "python-multipart": "python_multipart",
        "jinja2": "jinja2",
    }
    missing = []
    for package, module in wanted.items():
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None
            found = False
        if not found:
            missing.append(package)
    if missing:
        raise DefectscopeError(f"serve needs {', '.join(missing)}: {EXTRA_HINT}")


def check_port(host: str, port: int) -> None:
    """DefectscopeError when ``host:port`` cannot be bound (taken, or not an address of this machine)."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DefectscopeError(
            f"--host {host}: not an address this machine can listen on ({exc.strerror or exc})"
        ) from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise DefectscopeError(
                f"cannot listen on {host}:{port}: {(exc.strerror or str(exc)).lower()} (another "
                "server there? choose another --port)"
            ) from None


def run(args: argparse.Namespace) -> int:
    """Load the models, serve them until SIGTERM or Ctrl+C; 0 after a graceful shutdown."""
    require_extra()
    import uvicorn

    from .app import create_app
    from .batching import load_warm
    from .uploads import allow_decoding

    models = parse_models(args.models)
    check_port(args.host, args.port)  # before the models load: a taken port is a one-line error, exit 2
    settings = Settings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_pixels=args.max_pixels,
        api_key=read_api_key(args.api_key_file) if args.api_key_file is not None else None,
        handle_sighup=True,
    )
    allow_decoding(args.max_pixels)  # --max-pixels decides, not Pillow's own cap
    for name in ("defectscope.serve", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.INFO)
    loaded: dict[str, Any] = {}
    for name, path in models.items():
        loaded[name] = model = load_warm(path, args.runtime)
        log.info(
            "loaded model=%s file=%s method=%s checksum=%s runtime=%s (%s)",
            name,
            path,
            model.method,
            model.checksum,
            model.runtime or "torch",
            model.runtime_reason,
        )
    app = create_app(loaded, settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        log_level="info",
        access_log=False,
        lifespan="on",
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn drains in-flight requests on SIGTERM, then raises the signal again once its own handler is
    # gone: this handler takes that second delivery, so a graceful shutdown ends with status 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise DefectscopeError(f"the server did not start on {args.host}:{args.port} (see the messages above)")
    log.info("stopped")
    return 0
