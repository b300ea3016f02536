"""Download machinery against a loopback HTTP server (127.0.0.1 only) and tiny archives built here."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.cli.commands import main
from defectscope.data import download as dl
from defectscope.data.download import ARCHIVES, download_dataset, fetch, safe_extract
from defectscope.data.visa import visa_official
from defectscope.errors import DefectscopeError

# --------------------------------------------------------------------------- loopback server


class _Server:
    """Serves ``files`` with Range support; ``modes[name]`` makes one file misbehave."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}  # "ignore_range" | "truncate_once" | "wrong_length"
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.sent: list[int] = []  # body bytes sent per request
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                state.requests.append((name, rng))
                if name not in state.files:
                    self.send_error(404)
                    state.sent.append(0)
                    return
                data, mode = state.files[name], state.modes.get(name, "")
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and mode != "ignore_range":
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        state.sent.append(0)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body) + (7 if mode == "wrong_length" else 0)))
                self.end_headers()
                if mode == "truncate_once":
                    state.modes[name] = ""  # behave next time
                    body = body[: len(body) // 2]
                state.sent.append(len(body))  # before the write: the client may assert as soon as it has the bytes
                self.wfile.write(body)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


# --------------------------------------------------------------------------- archive builders


def _png(color: int, mask: bool = False) -> bytes:
    arr = np.zeros((8, 8), np.uint8) if mask else np.full((8, 8, 3), color, np.uint8)
    if mask:
        arr[2:5, 2:5] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar(files: dict[str, bytes], mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _mvtec_files(category: str, prefix: str = "") -> dict[str, bytes]:
    p = f"{prefix}{category}"
    return {
        f"{p}/train/good/000.png": _png(10),
        f"{p}/train/good/001.png": _png(20),
        f"{p}/test/good/000.png": _png(30),
        f"{p}/test/broken/000.png": _png(200),
        f"{p}/ground_truth/broken/000_mask.png": _png(0, mask=True),
        f"{p}/license.txt": b"CC BY-NC-SA 4.0",
    }


def _visa_files(with_csv: bool = True) -> dict[str, bytes]:
    files = {
        "candle/Data/Images/Normal/0000.JPG": _png(10),
        "candle/Data/Images/Normal/0001.JPG": _png(20),
        "candle/Data/Images/Anomaly/000.JPG": _png(200),
        "candle/Data/Masks/Anomaly/000.png": _png(0, mask=True),
        "candle/image_anno.csv": b"image,label,mask\n",
    }
    if with_csv:
        files["split_csv/1cls.csv"] = _split_csv()
    return files


def _split_csv() -> bytes:
    return (
        b"object,split,label,image,mask\n"
        b"candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        b"candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        b"candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PAYLOAD = bytes(range(256)) * 64  # 16 KiB, position-dependent content


# --------------------------------------------------------------------------- fetch


def test_fetch_downloads_and_verifies_sha256(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    out = fetch(f"{server.url}/f.bin", tmp_path / "f.bin", len(PAYLOAD), _sha(PAYLOAD))
    assert out == tmp_path / "f.bin"
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "f.bin.part").exists()
    assert server.requests == [("f.bin", None)]


def test_fetch_skips_a_verified_existing_file(server, tmp_path):
    (tmp_path / "f.bin").write_bytes(PAYLOAD)
    fetch(f"{server.url}/f.bin", tmp_path / "f.bin", len(PAYLOAD), _sha(PAYLOAD))
    assert server.requests == []


def test_fetch_resumes_partial_part_with_range(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:5000])
    out = fetch(f"{server.url}/f.bin", tmp_path / "f.bin", None, _sha(PAYLOAD), progress=True)
    assert out.read_bytes() == PAYLOAD
    assert server.requests == [("f.bin", "bytes=5000-")]
    assert server.sent == [len(PAYLOAD) - 5000]  # only the missing tail travelled


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    server.modes["f.bin"] = "ignore_range"
    (tmp_path / "f.bin.part").write_bytes(b"\xff" * 5000)  # wrong bytes: appending would corrupt
    out = fetch(f"{server.url}/f.bin", tmp_path / "f.bin", len(PAYLOAD), _sha(PAYLOAD))
    assert out.read_bytes() == PAYLOAD
    assert server.requests == [("f.bin", "bytes=5000-")]
    assert server.sent == [len(PAYLOAD)]


def test_fetch_truncated_download_errors_then_retry_resumes(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    server.modes["f.bin"] = "truncate_once"
    dest = tmp_path / "f.bin"
    with pytest.raises(DefectscopeError, match=r"stopped at 8192 of 16384 bytes.*resume"):
        fetch(f"{server.url}/f.bin", dest, None, _sha(PAYLOAD))
    assert not dest.exists()
    assert (tmp_path / "f.bin.part").stat().st_size == len(PAYLOAD) // 2
    fetch(f"{server.url}/f.bin", dest, None, _sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("f.bin", f"bytes={len(PAYLOAD) // 2}-")


def test_fetch_content_length_larger_than_body_is_an_error(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    server.modes["f.bin"] = "wrong_length"
    with pytest.raises(DefectscopeError, match=r"stopped at 16384 of 16391 bytes"):
        fetch(f"{server.url}/f.bin", tmp_path / "f.bin", None, None)
    assert not (tmp_path / "f.bin").exists()


def test_fetch_checksum_mismatch_deletes_download(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    bad = "0" * 64
    with pytest.raises(DefectscopeError) as info:
        fetch(f"{server.url}/f.bin", tmp_path / "f.bin", len(PAYLOAD), bad)
    assert bad in str(info.value) and _sha(PAYLOAD) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_fetch_md5_used_when_no_sha256(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    with pytest.raises(DefectscopeError, match="md5"):
        fetch(f"{server.url}/f.bin", tmp_path / "f.bin", None, None, md5="0" * 32)
    out = fetch(f"{server.url}/f.bin", tmp_path / "f.bin", None, None, md5=hashlib.md5(PAYLOAD).hexdigest())
    assert out.read_bytes() == PAYLOAD


def test_fetch_size_disagreement_is_an_error_before_download(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    with pytest.raises(DefectscopeError, match=r"16384 bytes on the server, expected 999"):
        fetch(f"{server.url}/f.bin", tmp_path / "f.bin", 999, None)
    assert list(tmp_path.iterdir()) == []


def test_fetch_complete_part_answered_416_is_accepted(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)
    out = fetch(f"{server.url}/f.bin", tmp_path / "f.bin", None, _sha(PAYLOAD))
    assert out.read_bytes() == PAYLOAD


def test_fetch_http_error_names_url(server, tmp_path):
    with pytest.raises(DefectscopeError, match=r"missing\.bin failed: HTTP 404"):
        fetch(f"{server.url}/missing.bin", tmp_path / "x", None, None)


def test_fetch_connection_refused_names_url(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DefectscopeError, match=rf"127\.0\.0\.1:{port}/x\.bin failed"):
        fetch(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", None, None, timeout=5)


# --------------------------------------------------------------------------- safe_extract


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz"])
def test_safe_extract_tar_formats(tmp_path, mode):
    arc = tmp_path / "a.tar"
    arc.write_bytes(_tar({"top/x.txt": b"hello", "top/sub/y.txt": b"world"}, mode))
    safe_extract(arc, tmp_path / "out")
    assert (tmp_path / "out/top/x.txt").read_bytes() == b"hello"
    assert (tmp_path / "out/top/sub/y.txt").read_bytes() == b"world"


def test_safe_extract_zip(tmp_path):
    arc = tmp_path / "a.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("top/x.txt", b"hello")
    safe_extract(arc, tmp_path / "out")
    assert (tmp_path / "out/top/x.txt").read_bytes() == b"hello"


def _tar_with(tmp_path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    arc = tmp_path / "evil.tar"
    with tarfile.open(arc, "w") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        info.size = len(data) if info.isfile() else 0
        tar.addfile(info, io.BytesIO(data))
    return arc


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("info", "why"),
    [
        (tarfile.TarInfo("../evil"), "'..'"),
        (tarfile.TarInfo("a/../../evil"), "'..'"),
        (tarfile.TarInfo("/tmp/defectscope_abs_evil"), "absolute"),
        (_link("ln", "../../evil", tarfile.SYMTYPE), "outside"),
        (_link("ln", "/etc/passwd", tarfile.SYMTYPE), "absolute"),
        (_link("hard", "../evil", tarfile.LNKTYPE), "outside"),
        (_link("dev", "", tarfile.CHRTYPE), "special"),
    ],
)
def test_safe_extract_rejects_malicious_tar(tmp_path, info, why):
    arc = _tar_with(tmp_path, info, b"pwned")
    out = tmp_path / "sub" / "out"
    with pytest.raises(DefectscopeError, match=why):
        safe_extract(arc, out)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "sub" / "evil").exists()
    assert not Path("/tmp/defectscope_abs_evil").exists()
    assert list(out.iterdir()) == []  # checked before anything was written


def test_safe_extract_allows_links_that_stay_inside(tmp_path):
    arc = _tar_with(tmp_path, _link("alias.txt", "fine.txt", tarfile.SYMTYPE))
    safe_extract(arc, tmp_path / "out")
    assert (tmp_path / "out/alias.txt").read_bytes() == b"ok"


def test_safe_extract_rejects_zip_traversal(tmp_path):
    arc = tmp_path / "evil.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("../evil", b"pwned")
    with pytest.raises(DefectscopeError, match="'..'"):
        safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_safe_extract_rejects_non_archive(tmp_path):
    arc = tmp_path / "x.tar.xz"
    arc.write_bytes(b"not an archive at all")
    with pytest.raises(DefectscopeError, match="not a tar or zip"):
        safe_extract(arc, tmp_path / "out")


# --------------------------------------------------------------------------- download_dataset


def _assert_mvtec_category(folder: Path) -> None:
    assert sorted(p.name for p in (folder / "train/good").iterdir()) == ["000.png", "001.png"]
    assert sorted(p.name for p in (folder / "test").iterdir()) == ["broken", "good"]
    mask = np.array(Image.open(folder / "ground_truth/broken/000_mask.png"))
    assert (mask != 0).sum() == 9


def test_download_mvtec_category(server, tmp_path):
    server.files["bottle.tar.xz"] = _tar(_mvtec_files("bottle"))
    out = tmp_path / "data"
    got = download_dataset("mvtec_ad", out, ["bottle"], base_url=server.url)
    assert got == [out / "bottle"]
    _assert_mvtec_category(out / "bottle")
    assert sorted(p.name for p in out.iterdir()) == ["bottle"]  # no archive, .part or staging left
    n = len(server.requests)
    assert download_dataset("mvtec_ad", out, ["bottle"], base_url=server.url) == [out / "bottle"]
    assert len(server.requests) == n  # complete folder: nothing fetched again


def test_download_mvtec_whole_archive(server, tmp_path, monkeypatch):
    files = {**_mvtec_files("bottle"), **_mvtec_files("cable"), "readme.txt": b"MVTec AD"}
    data = _tar(files)
    server.files["mvtec_anomaly_detection.tar.xz"] = data
    monkeypatch.setattr(dl, "MVTEC_AD_CATEGORIES", ("bottle", "cable"))
    monkeypatch.setitem(ARCHIVES["mvtec_ad"], "all", replace(ARCHIVES["mvtec_ad"]["all"], sha256=_sha(data)))
    out = tmp_path / "data"
    got = download_dataset("mvtec_ad", out, base_url=server.url, keep_archives=True)
    assert got == [out / "bottle", out / "cable"]
    _assert_mvtec_category(out / "cable")
    assert (out / ".downloads/mvtec_anomaly_detection.tar.xz").read_bytes() == data


def test_download_rejects_incomplete_existing_folder(server, tmp_path):
    (tmp_path / "bottle" / "train").mkdir(parents=True)
    with pytest.raises(DefectscopeError, match="not a complete MVTec AD category"):
        download_dataset("mvtec_ad", tmp_path, ["bottle"], base_url=server.url)


def test_download_visa_gives_loadable_tree(server, tmp_path, monkeypatch):
    data = _tar(_visa_files(), "w")
    server.files["VisA_20220922.tar"] = data
    monkeypatch.setitem(ARCHIVES["visa"], "all", replace(ARCHIVES["visa"]["all"], sha256=_sha(data)))
    out = tmp_path / "data"
    with pytest.raises(DefectscopeError, match="unknown visa category pcb9"):
        download_dataset("visa", out, ["pcb9"], base_url=server.url)
    got = download_dataset("visa", out, ["candle"], base_url=server.url)
    assert got == [out / "visa" / "candle"]
    (split,) = visa_official(out / "visa")
    assert split.name == "candle" and len(split.train) == 1
    assert sorted(s.label for s in split.test) == [0, 1]


def test_download_visa_fetches_split_csv_when_archive_lacks_it(server, tmp_path, monkeypatch):
    data = _tar({f"VisA/{k}": v for k, v in _visa_files(with_csv=False).items()}, "w")
    server.files["VisA_20220922.tar"] = data
    server.files["1cls.csv"] = _split_csv()
    monkeypatch.setitem(ARCHIVES["visa"], "all", replace(ARCHIVES["visa"]["all"], sha256=_sha(data)))
    download_dataset("visa", tmp_path, ["candle"], base_url=server.url)
    assert (tmp_path / "visa/split_csv/1cls.csv").read_bytes() == _split_csv()
    assert len(visa_official(tmp_path / "visa")[0].test) == 2


def test_download_visa_checksum_mismatch(server, tmp_path):
    server.files["VisA_20220922.tar"] = _tar(_visa_files(), "w")  # real registry sha256 won't match
    with pytest.raises(DefectscopeError, match="sha256 of .*VisA_20220922.tar is"):
        download_dataset("visa", tmp_path, base_url=server.url)
    assert not (tmp_path / "visa").exists()
    assert not list((tmp_path / ".downloads").glob("VisA*"))


def test_download_unknown_dataset_and_category(tmp_path):
    with pytest.raises(DefectscopeError, match="choose one of: mvtec_ad, visa"):
        download_dataset("imagenet", tmp_path)
    with pytest.raises(DefectscopeError, match=r"unknown mvtec_ad category bottel; valid: bottle, cable"):
        download_dataset("mvtec_ad", tmp_path, ["bottel"])


def test_cli_main(server, tmp_path, capsys):
    server.files["grid.tar.xz"] = _tar(_mvtec_files("grid"))
    rc = main(
        ["download", "mvtec_ad", "--category", "grid", "-o", str(tmp_path), "--base-url", server.url, "--no-progress"]
    )
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "grid")
    _assert_mvtec_category(tmp_path / "grid")


def test_registry_is_consistent():
    mv = ARCHIVES["mvtec_ad"]
    assert set(mv) == {"all", *dl.MVTEC_AD_CATEGORIES}
    for cat in dl.MVTEC_AD_CATEGORIES:
        assert mv[cat].file_name == f"{cat}.tar.xz"
    assert mv["all"].file_name == "mvtec_anomaly_detection.tar.xz"
    assert ARCHIVES["visa"]["all"].file_name == "VisA_20220922.tar"
    for spec in (a for d in ARCHIVES.values() for a in d.values()):
        assert spec.url.startswith("https://")
        assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.md5 is None or re.fullmatch(r"[0-9a-f]{32}", spec.md5)


def test_download_malicious_category_archive_leaves_nothing_behind(server, tmp_path):
    server.files["bottle.tar.xz"] = _tar({**_mvtec_files("bottle"), "../evil": b"pwned"})
    out = tmp_path / "data"
    with pytest.raises(DefectscopeError, match=r"refusing member '\.\./evil'"):
        download_dataset("mvtec_ad", out, ["bottle"], base_url=server.url)
    assert not (tmp_path / "evil").exists()
    assert sorted(p.name for p in out.iterdir()) == [".downloads"]  # no category, no staging folder
