"""The command line in scripts: paths from standard input, streaming output, quiet pipes, light --help."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defectscope.cli.commands import main
from defectscope.cli.stdin_paths import available_batches, read_paths


@pytest.fixture(scope="module")
def model(synthetic_category, tmp_path_factory):
    path = tmp_path_factory.mktemp("scripting") / "synthetic.dsmodel"
    assert (
        main(
            [
                "fit",
                str(synthetic_category),
                "-o",
                str(path),
                "--image-size",
                "64",
                "--coreset-ratio",
                "0.25",
                "--no-progress",
            ]
        )
        == 0
    )
    return path


def _cli(*args: str, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "defectscope.cli", *args], input=stdin, capture_output=True, timeout=timeout
    )


def _images(category: Path) -> list[Path]:
    return sorted((category / "test").rglob("*.png"))


# --------------------------------------------------------------------------- reading standard input
class _Slow:
    """A byte stream that hands out its chunks one read at a time."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    def read1(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_read_paths_splits_lines_and_nul_and_keeps_odd_names():
    assert list(read_paths(_Slow([b"a.png\nb", b".png\r\n\n  \nc d.png"]))) == ["a.png", "b.png", "c d.png"]
    assert list(read_paths(_Slow([b"x\ny.png\0z.png\0"]), sep=b"\0")) == ["x\ny.png", "z.png"]
    assert list(read_paths(_Slow([b"caf\xe9.png\n"]))) == [os.fsdecode(b"caf\xe9.png")]


def test_available_batches_never_wait_for_a_full_batch():
    def slow():
        yield "a"
        yield "b"
        time.sleep(0.5)
        yield "c"

    start = time.perf_counter()
    batches = available_batches(slow(), 16)
    first = next(batches)
    assert time.perf_counter() - start < 0.4 and first[0] == "a"  # did not wait for "c"
    rest = [item for batch in batches for item in batch]
    assert first + rest == ["a", "b", "c"]
    assert next(len(b) for b in available_batches(iter(map(str, range(40))), 16)) <= 16


# --------------------------------------------------------------------------- predict -
def test_paths_from_stdin_in_order_with_errors_in_place(model, synthetic_category, tmp_path):
    images = _images(synthetic_category)[:5]
    listed = [images[0], tmp_path / "missing.png", *images[1:]]
    out = _cli("predict", str(model), "-", "--json", stdin="\n".join(map(str, listed)).encode() + b"\n")
    assert out.returncode == 1, out.stderr  # one path failed
    rows = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in listed]
    assert rows[1]["error"] and "missing.png" in rows[1]["error"] and rows[1]["score"] is None
    args = _cli("predict", str(model), *map(str, images), "--json")
    assert [json.loads(line)["score"] for line in args.stdout.decode().splitlines()] == pytest.approx(
        [r["score"] for r in rows if r["error"] is None], rel=1e-5
    )


def test_nul_separated_paths_as_find_print0_writes_them(model, synthetic_category, tmp_path):
    source = _images(synthetic_category)[0]
    odd = tmp_path / "line\nbreak.png"
    odd.write_bytes(source.read_bytes())
    out = _cli("predict", str(model), "-", "-0", stdin=bytes(odd) + b"\0" + bytes(source) + b"\0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert len(lines) == 3 and lines[0] == '"' + str(odd).split("\n")[0]  # csv quotes the name with a newline


def test_each_line_is_printed_before_the_next_path_arrives(model, synthetic_category):
    images = _images(synthetic_category)[:3]
    proc = subprocess.Popen(
        [sys.executable, "-m", "defectscope.cli", "predict", str(model), "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        for image in images:  # the next path is written only after the previous line was read
            proc.stdin.write(str(image).encode() + b"\n")
            proc.stdin.flush()
            assert sel.select(timeout=120), "no line within 120 s: output is not streamed"
            line = proc.stdout.readline().decode()
            assert line.startswith(str(image) + ",")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_stdin_option_errors(model, capsys):
    assert main(["predict", str(model), "a.png", "-0"]) == 2
    assert "give - as the PATH" in capsys.readouterr().err
    assert main(["predict", str(model), "-", "a.png"]) == 2
    assert "cannot be mixed" in capsys.readouterr().err
    out = _cli("predict", str(model), "-", stdin=b"")
    assert out.returncode == 2 and b"no paths on standard input" in out.stderr


# --------------------------------------------------------------------------- progress bars
def test_no_progress_bars_in_a_pipe_unless_forced(model, synthetic_category):
    images = [str(p) for p in _images(synthetic_category)[:3]]
    quiet = _cli("predict", str(model), *images)
    assert quiet.returncode == 0 and b"it/s" not in quiet.stderr and b"%|" not in quiet.stderr
    forced = _cli("predict", str(model), *images, "--progress")
    # the bar is drawn (how far it got before it closed depends on the speed: 0/3 to 3/3)
    assert forced.returncode == 0 and b"predict patchcore" in forced.stderr and b"/3 [" in forced.stderr
    assert quiet.stdout == forced.stdout


# --------------------------------------------------------------------------- light --help
@pytest.mark.parametrize(
    "command",
    [
        [],
        ["fit"],
        ["predict"],
        ["evaluate"],
        ["tune"],
        ["calibrate"],
        ["demo"],
        ["download"],
        ["benchmark"],
        ["serve"],
        ["export"],
        ["batch"],
    ],
)
def test_help_imports_nothing_heavy(command):
    code = (
        "import sys\nfrom defectscope.cli.commands import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'timm', 'faiss', 'matplotlib', 'cv2', 'numpy', 'PIL', 'sklearn', "
        "'scipy', 'numba', 'pyarrow', 'ray') if m in sys.modules]\nprint('HEAVY', heavy)" % [*command, "--help"]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]


def test_file_names_that_are_not_utf8_are_printed_not_crashed_on(model, synthetic_category, tmp_path):
    source = _images(synthetic_category)[0]
    odd = os.path.join(os.fsencode(tmp_path), b"lat\xe9.png")
    with open(odd, "wb") as fh:
        fh.write(source.read_bytes())
    csv_out = _cli("predict", str(model), "-", stdin=odd + b"\n")
    assert csv_out.returncode == 0, csv_out.stderr
    assert csv_out.stdout.startswith(odd + b",")  # the name's own bytes: a script can open it
    json_out = _cli("predict", str(model), "-", "--json", stdin=odd + b"\n")
    row = json.loads(json_out.stdout.decode("utf-8"))  # strict UTF-8 JSON
    assert row["path"].endswith("lat\\xe9.png") and row["error"] is None


def test_a_reader_that_stops_early_ends_predict_quietly(model, synthetic_category):
    """`predict ... | head -1`: once the reader has gone, predict stops with 141 (128 + SIGPIPE, what a
    shell reports) and says nothing on stderr, as Unix tools do."""
    images = _images(synthetic_category)
    proc = subprocess.Popen(
        [sys.executable, "-m", "defectscope.cli", "predict", str(model), "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        proc.stdin.write(str(images[0]).encode() + b"\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith(str(images[0]).encode())
        proc.stdout.close()  # the reader goes away; every later line has nowhere to go
        proc.stdin.write(b"".join(str(p).encode() + b"\n" for p in images[1:]))
        proc.stdin.close()
        assert proc.wait(timeout=120) == 141
        assert proc.stderr.read() == b""
    finally:
        proc.kill()
