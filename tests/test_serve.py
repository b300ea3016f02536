"""`defectscope serve`: routes, limits, the API key, reload, micro-batching under load, signals.

The app runs in-process on a free loopback port (uvicorn in a thread) for most tests, and as a
`defectscope serve` subprocess for SIGHUP and SIGTERM. The model is a small PatchCore at 64 px
on the synthetic category, so a request costs milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'defectscope[serve]')")
import httpx
from serving import ServeProcess, metric, metric_samples, running

import defectscope
from defectscope.serve.app import create_app
from defectscope.serve.settings import Settings

PREDICT = "/v1/models/{name}/predict"


@pytest.fixture(scope="module")
def model_file(synthetic_category, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny.dsmodel"
    defectscope.fit(synthetic_category, image_size=64, coreset_ratio=0.25).save(path)
    return path


@pytest.fixture(scope="module")
def model(model_file):
    return defectscope.load(model_file)


@pytest.fixture(scope="module")
def images(synthetic_category) -> list[Path]:
    """Good and defective test images, alternating."""
    good = sorted((synthetic_category / "test" / "good").glob("*.png"))[:4]
    bad = sorted(p for d in ("scratch", "spot") for p in (synthetic_category / "test" / d).glob("*.png"))[:4]
    return [p for pair in zip(good, bad) for p in pair]


@pytest.fixture(scope="module")
def alone(model, images) -> dict[Path, float]:
    """Each image's score scored alone (one image per call)."""
    return {p: model.predict(p, maps=False).score for p in images}


def with_threshold(src: Path, dst: Path, factor: float) -> str:
    """Write ``src``'s model to ``dst`` with its threshold scaled (as `defectscope calibrate` would
    change it); returns the new checksum."""
    m = defectscope.load(src)
    m.meta["threshold"] = m.threshold * factor
    m.save(dst)
    return m.checksum


class SlowModel:
    """A model whose every predict call first sleeps ``delay`` seconds."""

    def __init__(self, model, delay: float) -> None:
        self._model, self.delay = model, delay

    def predict(self, images, **options):
        time.sleep(self.delay)
        return self._model.predict(images, **options)

    def __getattr__(self, name):
        return getattr(self._model, name)


# --------------------------------------------------------------------------- routes
def test_routes_answer_as_the_api_does(model, model_file, images, alone, tmp_path):
    with running(create_app({"tiny": model})) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
        info = model.info()
        listed = client.get("/v1/models").json()["models"]
        assert listed == [
            {
                "name": "tiny",
                "method": "patchcore",
                "backbone": info["backbone"],
                "image_size": 64,
                "layer_weighting": "equal",
                "threshold": model.threshold,
                "threshold_name": "fit",
                "thresholds": {"fit": model.threshold},
                "fitted": info["fitted"],
                "checksum": model.checksum,
                "runtime": "torch",
                "runtime_reason": "torch (defectscope.load's default)",
            }
        ]

        raw = client.post(PREDICT.format(name="tiny"), content=images[1].read_bytes())
        assert raw.status_code == 200, raw.text
        body = raw.json()
        assert set(body) == {
            "model",
            "score",
            "judgement",
            "threshold",
            "threshold_name",
            "normalized_score",
            "notes",
            "latency_ms",
        }
        assert body["threshold_name"] == "fit"
        assert body["notes"] == []
        assert body["model"] == "tiny" and body["latency_ms"] > 0
        assert body["score"] == pytest.approx(alone[images[1]], rel=1e-5)
        assert body["threshold"] == model.threshold and body["judgement"] == int(body["score"] >= model.threshold)
        assert body["normalized_score"] == pytest.approx(body["score"] / model.threshold)

        form = client.post(
            PREDICT.format(name="tiny") + "?heatmap=1",
            files={"file": (images[0].name, images[0].read_bytes(), "image/png")},
        )
        assert form.status_code == 200, form.text
        assert form.json()["score"] == pytest.approx(alone[images[0]], rel=1e-5)
        picture = Image.open(io.BytesIO(base64.b64decode(form.json()["heatmap"])))
        assert picture.format == "PNG" and picture.size[0] >= 128
        expected = model.predict(images[0]).overlay()
        assert picture.size == (expected.shape[1], expected.shape[0])

        # a 16-bit PNG is scaled as the command line scales the file
        deep = tmp_path / "deep.png"
        gray = np.asarray(Image.open(images[1]).convert("L")).astype(np.uint16) * 200
        Image.fromarray(gray).save(deep)
        answer = client.post(PREDICT.format(name="tiny"), content=deep.read_bytes()).json()
        assert answer["score"] == pytest.approx(model.predict(deep).score, rel=1e-5)

        # what the loader noticed reaches the client, as predict --json gives it
        clear = tmp_path / "clear.png"
        rgba = np.asarray(Image.open(images[1]).convert("RGBA")).copy()
        rgba[:8, :8, 3] = 0
        Image.fromarray(rgba).save(clear)
        noted = client.post(PREDICT.format(name="tiny"), content=clear.read_bytes()).json()
        assert noted["notes"] == model.predict(clear).notes and any("transparen" in n for n in noted["notes"])

        # a 32-bit TIFF and a two-frame TIFF: decoded by the command line's rules (declared depth, first frame)
        wide = tmp_path / "i32.tif"
        Image.fromarray(np.asarray(Image.open(images[1]).convert("L")).astype(np.int32) * 300).save(wide)
        frames = tmp_path / "frames.tif"
        first = Image.open(images[1]).convert("RGB")
        first.save(frames, save_all=True, append_images=[Image.open(images[0]).convert("RGB")])
        for upload in (wide, frames):
            sent = client.post(PREDICT.format(name="tiny"), content=upload.read_bytes()).json()
            direct = model.predict(upload)
            assert sent["score"] == pytest.approx(direct.score, rel=1e-5), upload.name
            assert sent["notes"] == direct.notes, upload.name
        assert any("2 frames" in n for n in model.predict(frames).notes)

        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="model"' in page.text and 'type="file"' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # no network assets
        missing = client.get("/v2/nothing")
        assert missing.status_code == 404 and "error" in missing.json()


def test_a_request_picks_a_named_threshold(model_file, images, alone, synthetic_category, tmp_path):
    """?threshold_name=NAME judges at the model's threshold of that name; requests with different names
    scored in one batch are each judged at their own; /v1/models lists the names."""
    from defectscope.evaluation.calibration import calibrate_model

    served = Path(shutil.copy(model_file, tmp_path / "named.dsmodel"))
    calibrate_model(served, synthetic_category / "test", catch=0.5, name="lenient", activate=False)
    model = defectscope.load(served)
    lenient, fit = model.thresholds["lenient"], model.thresholds["fit"]
    assert lenient > fit  # catching half the defects: fewer parts judged defective than at the fit threshold
    between = [p for p in images if fit <= alone[p] < lenient]
    assert between, "no image tells the two thresholds apart"
    predict = PREDICT.format(name="line")
    app = create_app({"line": model}, Settings(max_batch=8, max_wait_ms=200))
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        listed = client.get("/v1/models").json()["models"][0]
        assert listed["thresholds"] == {"fit": fit, "lenient": lenient} and listed["threshold_name"] == "fit"

        async def both(image: Path) -> list[dict]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as aclient:
                sent = [
                    aclient.post(predict + suffix, content=image.read_bytes())
                    for suffix in ("", "?threshold_name=lenient", "?threshold_name=fit")
                ]
                return [r.json() for r in await asyncio.gather(*sent)]

        default, named, fitted = asyncio.run(both(between[0]))
        assert default["threshold_name"] == "fit" and default["judgement"] == 1 and default["threshold"] == fit
        assert named["threshold_name"] == "lenient" and named["judgement"] == 0 and named["threshold"] == lenient
        assert named["normalized_score"] == pytest.approx(named["score"] / lenient)
        assert fitted["judgement"] == 1 and named["score"] == default["score"]

        unknown = client.post(predict + "?threshold_name=strict", content=images[0].read_bytes())
        assert unknown.status_code == 404
        assert "no threshold named 'strict'" in unknown.json()["error"] and "lenient (" in unknown.json()["error"]


# --------------------------------------------------------------------------- limits
def _png_header_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: tens of kilobytes that decode to
    width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_limits_are_clear_json_errors(model, images, tmp_path):
    settings = Settings(max_body_bytes=200_000, max_pixels=100_000)
    predict = PREDICT.format(name="tiny")
    with running(create_app({"tiny": model}, settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        too_big = client.post(predict, content=b"\0" * 300_000)
        assert too_big.status_code == 413 and "--max-body-mb" in too_big.json()["error"]

        bomb = _png_header_bomb(12_000, 12_000)  # 144 million pixels in about 20 kB
        assert len(bomb) < 200_000
        refused = client.post(predict, content=bomb)
        assert refused.status_code == 413, refused.text
        assert "12000 x 12000" in refused.json()["error"] and "--max-pixels" in refused.json()["error"]
        wide = io.BytesIO()
        Image.new("RGB", (400, 400)).save(wide, format="PNG")
        assert client.post(predict, content=wide.getvalue()).status_code == 413

        # not an image, truncated, empty: the command line's messages, named after the upload
        text = tmp_path / "notes.png"
        text.write_bytes(b"this is not a picture")
        truncated = tmp_path / "cut.png"
        truncated.write_bytes(images[0].read_bytes()[:600])
        for path, status in ((text, 415), (truncated, 400)):
            answer = client.post(predict, files={"file": (path.name, path.read_bytes(), "image/png")})
            assert answer.status_code == status, answer.text
            assert answer.json()["error"] == model.predict(path).error.replace(str(path), path.name)
        raw = client.post(predict, content=b"GIF89a but nothing else")
        assert raw.status_code in (400, 415) and raw.json()["error"].startswith("request body: ")
        empty = client.post(predict, content=b"")
        assert empty.status_code == 400 and empty.json() == {"error": "request body: file is empty (0 bytes)"}
        no_file = client.post(predict, files={"note": (None, "hello")})
        assert no_file.status_code == 400 and "file" in no_file.json()["error"]

        unknown = client.post(PREDICT.format(name="nope"), content=images[0].read_bytes())
        assert (
            unknown.status_code == 404 and "'nope'" in unknown.json()["error"] and "'tiny'" in unknown.json()["error"]
        )
        invalid = client.post(predict + "?heatmap=banana", content=images[0].read_bytes())
        assert invalid.status_code == 422 and "heatmap" in invalid.json()["error"]
        # the server still answers normally
        assert client.post(predict, content=images[0].read_bytes()).status_code == 200


def test_full_queue_is_503_with_retry_after(model, images):
    settings = Settings(max_batch=1, max_wait_ms=0, max_queue=1)
    body = images[0].read_bytes()
    predict = PREDICT.format(name="slow")
    with (
        running(create_app({"slow": SlowModel(model, 1.5)}, settings)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        answers: list[int] = []
        threads = []

        def send() -> None:
            answers.append(httpx.post(url + predict, content=body, timeout=60).status_code)

        def wait_for(name: str, value: float) -> None:
            deadline = time.monotonic() + 30
            while metric(metric_samples(client.get("/metrics").text), name, model="slow") < value:
                assert time.monotonic() < deadline, f"{name} never reached {value}"
                time.sleep(0.02)

        threads.append(threading.Thread(target=send))
        threads[-1].start()
        wait_for("defectscope_batch_size_count", 1)  # the first request is being scored
        threads.append(threading.Thread(target=send))
        threads[-1].start()
        wait_for("defectscope_queue_depth", 1)  # the second waits
        full = client.post(predict, content=body)
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert "--max-queue" in full.json()["error"]
        for t in threads:
            t.join(60)
        assert answers == [200, 200]


def test_slow_answer_is_504(model, images):
    settings = Settings(timeout_s=0.3)
    with running(create_app({"slow": SlowModel(model, 1.0)}, settings)) as url:
        answer = httpx.post(url + PREDICT.format(name="slow"), content=images[0].read_bytes(), timeout=60)
        assert answer.status_code == 504 and "--timeout-s" in answer.json()["error"]
        assert httpx.get(url + "/healthz").status_code == 200


def test_api_key(model, images, tmp_path):
    from defectscope.errors import DefectscopeError
    from defectscope.serve.command import read_api_key

    key_file = tmp_path / "key"
    key_file.write_text("s3cret-token\n")
    key = read_api_key(key_file)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(DefectscopeError, match="API key"):
        read_api_key(tmp_path / "empty")
    with running(create_app({"tiny": model}, Settings(api_key=key))) as url:
        assert httpx.get(url + "/healthz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"}):
            refused = httpx.get(url + "/v1/models", headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in refused.json()["error"]
        assert httpx.post(url + PREDICT.format(name="tiny"), content=images[0].read_bytes()).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        answer = httpx.post(url + PREDICT.format(name="tiny"), content=images[0].read_bytes(), headers=auth, timeout=60)
        assert answer.status_code == 200


def test_reload_swaps_the_model_and_a_failed_reload_keeps_the_old_one(model_file, images, alone, tmp_path):
    served = tmp_path / "line.dsmodel"
    shutil.copy(model_file, served)
    original = defectscope.load(served)
    predict = PREDICT.format(name="line")
    with running(create_app({"line": original})) as url, httpx.Client(base_url=url, timeout=60) as client:
        new_checksum = with_threshold(served, served, 2.0)
        answer = client.post("/v1/models/line/reload")
        assert answer.status_code == 200, answer.text
        assert answer.json()["checksum"] == new_checksum and answer.json()["previous_checksum"] == original.checksum
        assert client.get("/v1/models").json()["models"][0]["threshold"] == pytest.approx(2 * original.threshold)
        scored = client.post(predict, content=images[0].read_bytes()).json()
        assert scored["threshold"] == pytest.approx(2 * original.threshold)
        assert scored["score"] == pytest.approx(alone[images[0]], rel=1e-5)

        served.write_bytes(b"not a model any more")
        failed = client.post("/v1/models/line/reload")
        assert failed.status_code == 500
        assert "still serving the previous model" in failed.json()["error"] and str(served) in failed.json()["error"]
        assert client.get("/v1/models").json()["models"][0]["checksum"] == new_checksum
        assert client.post(predict, content=images[0].read_bytes()).status_code == 200
        assert client.post("/v1/models/other/reload").status_code == 404
        samples = metric_samples(client.get("/metrics").text)
        assert metric(samples, "defectscope_model_reloads_total", outcome="ok") == 1
        assert metric(samples, "defectscope_model_reloads_total", outcome="failed") == 1


# --------------------------------------------------------------------------- under load
def test_32_clients_mixed_traffic_and_a_reload(model_file, images, alone, tmp_path):
    """32 concurrent clients x 20 requests of good, defective and corrupt images, with a reload
    halfway: no 5xx, every score as scored alone, every corrupt image a 4xx, metrics that add up."""
    served = tmp_path / "line.dsmodel"
    shutil.copy(model_file, served)
    good_bytes = [p.read_bytes() for p in images]
    corrupt = [b"", b"plain text, not an image", good_bytes[0][:500], b"\x89PNG\r\n\x1a\n" + b"\0" * 64]
    pool = [("ok", i) for i in range(len(images))] + [("bad", i) for i in range(len(corrupt))]
    clients, per_client = 32, 20
    settings = Settings(max_batch=8, max_wait_ms=10, max_queue=clients)
    reload_checksum = with_threshold(served, tmp_path / "next.dsmodel", 1.5)

    async def traffic(url: str):
        results: list[tuple[str, int, int, dict]] = []
        done = asyncio.Event()
        limits = httpx.Limits(max_connections=clients + 4)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

            async def client(c: int) -> None:
                for i in range(per_client):
                    kind, k = pool[(c * 7 + i * 3) % len(pool)]
                    body = good_bytes[k] if kind == "ok" else corrupt[k]
                    answer = await http.post(PREDICT.format(name="line"), content=body)
                    results.append((kind, k, answer.status_code, answer.json()))
                    if len(results) >= clients * per_client // 2:
                        done.set()

            async def reload() -> httpx.Response:
                await done.wait()
                shutil.copy(tmp_path / "next.dsmodel", served)
                return await http.post("/v1/models/line/reload")

            *_, reloaded = await asyncio.gather(*(client(c) for c in range(clients)), reload())
            metrics_text = (await http.get("/metrics")).text
        return results, reloaded, metrics_text

    with running(create_app({"line": defectscope.load(served)}, settings)) as url:
        results, reloaded, metrics_text = asyncio.run(traffic(url))

    assert reloaded.status_code == 200 and reloaded.json()["checksum"] == reload_checksum
    assert len(results) == clients * per_client
    assert not [r for r in results if r[2] >= 500]
    n_ok = n_bad = 0
    thresholds = set()
    for kind, k, status, body in results:
        if kind == "ok":
            n_ok += 1
            assert status == 200, body
            assert body["score"] == pytest.approx(alone[images[k]], rel=1e-5)
            assert body["judgement"] == int(body["score"] >= body["threshold"])
            thresholds.add(round(body["threshold"], 9))
        else:
            n_bad += 1
            assert 400 <= status < 500 and body["error"], body
    assert len(thresholds) == 2  # answers from before and after the reload
    samples = metric_samples(metrics_text)
    route = PREDICT
    assert metric(samples, "defectscope_requests_total", route=route) == clients * per_client
    assert metric(samples, "defectscope_requests_total", route=route, status="200") == n_ok
    bad = sum(metric(samples, "defectscope_requests_total", route=route, status=s) for s in ("400", "413", "415"))
    assert bad == n_bad
    assert metric(samples, "defectscope_request_duration_seconds_count", route=route) == clients * per_client
    assert metric(samples, "defectscope_batch_size_sum", model="line") == n_ok  # corrupt ones never reach a batch
    batches = metric(samples, "defectscope_batch_size_count", model="line")
    assert n_ok / batches > 1.5, f"mean batch size {n_ok / batches:.2f}: concurrent requests were not batched"
    assert metric(samples, "defectscope_queue_depth", model="line") == 0


# --------------------------------------------------------------------------- the command
def test_command_line_checks(model_file, tmp_path, capsys, monkeypatch):
    from defectscope.cli.commands import build_parser, main

    args = build_parser().parse_args(["serve", str(model_file)])
    assert args.host == "127.0.0.1" and args.port == 8000
    other = tmp_path / "sub" / model_file.name
    assert main(["serve", str(model_file), str(other)]) == 2
    assert "two models named 'tiny'" in capsys.readouterr().err
    assert main(["serve", f"{model_file}=no/slash"]) == 2
    assert "not allowed" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "fastapi", None)  # the extra missing: one line saying what to install
    assert main(["serve", str(model_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'defectscope[serve]'" in err


def test_help_does_not_import_the_web_stack():
    code = (
        "import sys\nfrom defectscope.cli.commands import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', "
        "'prometheus_client', 'jinja2')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip().endswith("[]"), out.stdout


@pytest.mark.slow
def test_sighup_reloads_and_sigterm_drains_then_exits_0(model_file, images, tmp_path):
    """One `defectscope serve` process: SIGHUP reloads the replaced model file and the server keeps
    running; SIGTERM while a request is in flight (it waits up to 2 s for company in its batch)
    answers that request, then exits 0."""
    served = tmp_path / "line.dsmodel"
    shutil.copy(model_file, served)
    server = ServeProcess([f"{served}=line", "--max-wait-ms", "2000"], tmp_path / "serve.log")
    try:
        server.wait_ready()
        before = httpx.get(server.url + "/v1/models").json()["models"][0]["checksum"]
        new_checksum = with_threshold(served, served, 3.0)
        assert new_checksum != before
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/v1/models").json()["models"][0]["checksum"] != new_checksum:
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.2)
        assert server.proc.poll() is None

        answers: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: answers.append(
                httpx.post(server.url + PREDICT.format(name="line"), content=images[1].read_bytes(), timeout=60)
            )
        )
        sender.start()
        while metric(metric_samples(httpx.get(server.url + "/metrics").text), "defectscope_queue_depth") < 1:
            assert time.monotonic() < deadline + 60 and sender.is_alive(), answers
            time.sleep(0.05)
        server.signal(signal.SIGTERM)  # the request is in flight, waiting for its batch
        sender.join(60)
        assert server.proc.wait(60) == 0, server.log.read_text()
    finally:
        server.stop()
    assert answers and answers[0].status_code == 200, answers
    assert answers[0].json()["threshold"] == pytest.approx(3 * defectscope.load(model_file).threshold)
    log = server.log.read_text()
    assert "reloaded model=line" in log
    assert "model=line status=200" in log and "batch=1" in log
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):  # the default runtime is auto
        assert "runtime=onnxruntime (onnxruntime: the model's export" in log


def test_a_taken_port_is_a_one_line_error_before_the_models_load():
    import socket

    from defectscope.errors import DefectscopeError
    from defectscope.serve.command import check_port

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(DefectscopeError, match=f"cannot listen on 127.0.0.1:{port}.*choose another --port"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", 0)  # 0: any free port, nothing to check


def test_max_pixels_above_pillows_cap_is_the_limit(monkeypatch):
    """--max-pixels 500,000,000 must let a 225 M-pixel image decode: Pillow's own cap is raised to it (never
    lowered), so the server's 413 from the header stays the only limit."""
    from PIL import Image

    from defectscope.serve.uploads import allow_decoding

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 178_956_970)
    allow_decoding(500_000_000)
    assert Image.MAX_IMAGE_PIXELS == 500_000_000
    allow_decoding(1_000)
    assert Image.MAX_IMAGE_PIXELS == 500_000_000
