"""defectscope batch, local engine: inputs, the Parquet and CSV sinks, resume, checks before the work,
and a run killed with SIGKILL then resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_data import batch_data

import defectscope
from defectscope.batch import run_batch
from defectscope.batch.inputs import expand_inputs
from defectscope.batch.rows import COLUMNS, heatmap_file_name
from defectscope.batch.sinks import read_output
from defectscope.cli.commands import main
from defectscope.errors import DefectscopeError

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return batch_data(tmp_path_factory)


@pytest.fixture(scope="module")
def expected(data):
    """predict's results for the test images, by path, on the runtime batch chooses by default."""
    results = defectscope.load(data["model"], runtime="auto").predict([str(p) for p in data["images"]], maps=False)
    return {r.name: r for r in results}


# --------------------------------------------------------------------------- inputs
def test_inputs_files_folders_globs_and_list_files_in_order_and_once(tmp_path, data, monkeypatch):
    images = data["images"]
    monkeypatch.chdir(data["root"])
    relative = images[2].relative_to(data["root"])
    listing = tmp_path / "paths.txt"
    listing.write_bytes(f"{images[1]}\r\n\n./{relative}\n{tmp_path / 'gone.png'}\n".encode())
    glob = str(data["category"] / "test" / "good" / "*.png")
    entries = list(expand_inputs([str(images[0]), str(listing), glob, str(tmp_path / "nothing*.png"), str(images[0])]))
    paths = [e.path for e in entries]
    assert paths[:4] == [str(images[0]), str(images[1]), str(relative), str(tmp_path / "gone.png")]
    assert len(paths) == len(set(paths))  # each once, the first time it appears
    assert all(e.error is None for e in entries[:4])  # a listed path is taken as given: scoring reports it
    assert entries[-1].error == "pattern matched no image files"
    good = sorted(str(p) for p in (data["category"] / "test" / "good").glob("*.png"))
    assert set(good) <= set(paths)  # from the glob; good/002.png a second time: keys are text, not files


# --------------------------------------------------------------------------- local runs
def test_local_parquet_rows_are_predicts_results(tmp_path, data, expected, capsys):
    out = tmp_path / "scores.parquet"
    inputs = [str(data["category"] / "test"), str(data["broken"]), str(tmp_path / "missing.png")]
    assert main(["batch", str(data["model"]), *inputs, "-o", str(out), "--no-progress"]) == 1  # error rows
    assert f"wrote {out}: {len(data['images']) + 2} row(s), 2 with an error" in capsys.readouterr().out
    rows = read_output(out)
    checksum = defectscope.load(data["model"]).checksum
    assert [r["path"] for r in rows] == [str(p) for p in data["images"]] + inputs[1:]  # input order
    for row in rows[:-2]:
        want = expected[row["path"]]
        assert list(row) == list(COLUMNS)
        assert row["score"] == want.score and row["judgement"] == want.judgement  # the same pipeline: exact
        assert row["threshold"] == want.threshold and row["normalized_score"] == want.normalized_score
        assert row["error"] is None and row["heatmap"] is None and row["model_checksum"] == checksum
    for row, name in zip(rows[-2:], ("broken.png", "missing.png")):
        assert row["score"] is None and row["judgement"] is None and name in row["error"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == len(rows) and manifest["errors"] == 2
    assert manifest["model"]["checksum"] == checksum and manifest["runs"][0]["engine"] == "local"
    assert [p["file"] for p in manifest["parts"]] == ["part-000000.parquet"]


def test_csv_holds_the_same_rows_and_heatmaps_are_named_by_path(tmp_path, data, expected):
    out, maps = tmp_path / "scores.csv", tmp_path / "maps"
    paths = [str(p) for p in data["images"][:3]]
    summary = run_batch(data["model"], paths, out, heatmaps=maps)
    assert (summary.scored, summary.errors) == (3, 0)
    rows = read_output(out)
    assert [r["path"] for r in rows] == paths
    for row in rows:
        assert row["score"] == expected[row["path"]].score  # floats survive the CSV exactly
        assert row["heatmap"] == str(maps / heatmap_file_name(row["path"])) and Path(row["heatmap"]).is_file()
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)


def test_resume_scores_only_what_is_missing_and_force_starts_over(tmp_path, data):
    out = tmp_path / "scores.parquet"
    paths = [str(p) for p in data["images"]]
    run_batch(data["model"], paths[:4], out, part_rows=2)
    with pytest.raises(DefectscopeError, match="exists; --resume .* --force"):
        run_batch(data["model"], paths, out)
    summary = run_batch(data["model"], paths, out, resume=True, part_rows=2)
    assert (summary.skipped, summary.scored, summary.total_rows) == (4, len(paths) - 4, len(paths))
    rows = read_output(out)
    assert sorted(r["path"] for r in rows) == sorted(paths)
    runs = json.loads((out / "_manifest.json").read_text())["runs"]
    assert [r["rows"] for r in runs] == [4, len(paths) - 4]
    again = run_batch(data["model"], paths, out, resume=True)  # nothing left: nothing written
    assert (again.scored, again.skipped, again.total_rows) == (0, len(paths), len(paths))
    forced = run_batch(data["model"], paths[:2], out, force=True)
    assert forced.total_rows == 2 and len(read_output(out)) == 2
    assert run_batch(data["model"], paths[:1], tmp_path / "new.csv", resume=True).scored == 1  # nothing to resume


def test_resume_refuses_another_models_rows(tmp_path, data):
    out = tmp_path / "scores.csv"
    run_batch(data["model"], [str(data["images"][0])], out)
    out.write_text(out.read_text().replace(defectscope.load(data["model"]).checksum, "f" * 64))
    with pytest.raises(DefectscopeError, match="rows of another model"):
        run_batch(data["model"], [str(p) for p in data["images"]], out, resume=True)


def test_csv_resume_cuts_a_killed_runs_half_line(tmp_path, data):
    out = tmp_path / "scores.csv"
    paths = [str(p) for p in data["images"][:3]]
    run_batch(data["model"], paths[:2], out)
    whole = out.read_bytes()
    out.write_bytes(whole + f'{paths[2]},0.5,0,1.0,0.5,"half'.encode())  # killed inside the third row
    summary = run_batch(data["model"], paths, out, resume=True)
    assert (summary.skipped, summary.scored) == (2, 1)
    assert out.read_bytes().startswith(whole) and b"half" not in out.read_bytes()
    assert [r["path"] for r in read_output(out)] == paths


def test_parquet_leftovers_of_a_killed_run_are_ignored_by_readers_and_removed_on_resume(tmp_path, data):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "scores.parquet"
    paths = [str(p) for p in data["images"][:3]]
    run_batch(data["model"], paths[:2], out)
    stale = out / ".part-000001.parquet.123.tmp"
    stale.write_bytes(b"PAR1 half a part")
    assert pq.read_table(out).num_rows == 2  # pyarrow skips hidden files: the dataset reads as it was
    run_batch(data["model"], paths, out, resume=True)
    assert not stale.exists() and pq.read_table(out).num_rows == 3


# --------------------------------------------------------------------------- checks before the work
def test_output_problems_are_one_line_before_any_work(tmp_path, data, capsys):
    model, image = str(data["model"]), str(data["images"][0])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.png").write_bytes(b"")
    (tmp_path / "taken.parquet").write_text("x")
    cases = {
        str(tmp_path / "out.json"): "unknown output type '.json': use .parquet",
        str(blocker / "out.parquet"): "is a file, not a folder",
        str(tmp_path / "taken.parquet"): "is a file; Parquet output is a folder",
        str(foreign): "not a defectscope batch output",
    }
    for out, message in cases.items():
        assert main(["batch", model, image, "-o", out, "--force"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (foreign / "a.png").exists()  # --force never deletes what is not ours
    assert main(["batch", model, image, "-o", str(tmp_path / "o.csv"), "--workers", "2"]) == 2
    assert "--workers and --address are for --engine ray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["batch", model, image, "-o", str(tmp_path / "o.csv"), "--resume", "--force"])
    assert "--force: not allowed with argument --resume" in capsys.readouterr().err


def test_engine_ray_without_the_extra_says_what_to_install(tmp_path, data, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert (
        main(["batch", str(data["model"]), str(data["images"][0]), "-o", str(tmp_path / "o.csv"), "--engine", "ray"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'defectscope[ray]'" in err
    assert not (tmp_path / "o.csv").exists()


# --------------------------------------------------------------------------- killed, then resumed
def test_a_run_killed_mid_way_resumes_with_every_path_exactly_once(tmp_path, data):
    copies = tmp_path / "archive"
    copies.mkdir()
    for i in range(400):  # enough images that the kill lands in the middle, even at onnxruntime's speed
        shutil.copy(data["images"][i % len(data["images"])], copies / f"img{i:03d}.png")
    listing = tmp_path / "archive.txt"
    paths = [str(p) for p in sorted(copies.glob("*.png"))]
    listing.write_text("\n".join(paths) + "\n")
    out = tmp_path / "scores.parquet"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "defectscope.cli",
            "batch",
            str(data["model"]),
            str(listing),
            "-o",
            str(out),
            "--batch-size",
            "2",
            "--part-rows",
            "2",
            "--threads",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no part committed within 240 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stderr.close()
    done = read_output(out)
    assert 0 < len(done) < len(paths), "the run was not killed mid-way"
    assert json.loads((out / "_manifest.json").read_text())["status"] == "running"  # killed: never closed
    summary = run_batch(data["model"], [str(listing)], out, resume=True)
    assert summary.skipped == len(done) and summary.scored == len(paths) - len(done)
    rows = read_output(out)
    assert sorted(r["path"] for r in rows) == paths  # every path exactly once
    assert all(r["error"] is None for r in rows)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    killed, resumed = manifest["runs"]  # the killed run is listed, with the rows it left in whole parts
    assert killed["status"] == "killed" and killed["rows"] == len(done) and resumed["status"] == "complete"


# --------------------------------------------------------------------------- review fixes
def test_a_file_name_that_is_not_utf8_is_a_row_in_parquet_and_resumes(tmp_path, capsys):
    import os

    from defectscope.batch.sinks import exclusive, text_path
    from defectscope.errors import DefectscopeError

    assert text_path(os.fsdecode(b"\xff\xfeab.png")) == "\\xff\\xfeab.png"
    assert text_path("plain.png") == "plain.png"
    out = tmp_path / "held.parquet"
    with (
        exclusive(out),
        pytest.raises(DefectscopeError, match="another defectscope batch is writing it"),
        exclusive(out),
    ):
        pass
    with exclusive(out):  # released when the first run ended
        pass


def test_non_utf8_names_in_parquet_and_csv_resume_without_duplicates(tmp_path, data):
    source = data["images"][0]
    odd = os.path.join(os.fsencode(tmp_path), b"\xff\xfeab.png")
    with open(odd, "wb") as fh:
        fh.write(Path(source).read_bytes())
    inputs = [os.fsdecode(odd), str(data["images"][1])]
    for out in (tmp_path / "odd.parquet", tmp_path / "odd.csv"):
        first = run_batch(data["model"], inputs, out)
        assert first.errors == 0 and first.scored == 2
        again = run_batch(data["model"], inputs, out, resume=True)
        assert (again.scored, again.skipped) == (0, 2)  # the odd name is recognised as done
        assert len(read_output(out)) == 2
    names = {r["path"] for r in read_output(tmp_path / "odd.parquet")}
    assert any(n.endswith("\\xff\\xfeab.png") for n in names)


def test_resume_refuses_another_threshold(tmp_path, data):
    paths = [str(p) for p in data["images"][:2]]
    for out in (tmp_path / "t.parquet", tmp_path / "t.csv"):
        run_batch(data["model"], paths[:1], out, threshold=10.0)
        with pytest.raises(DefectscopeError, match="threshold 10.*same --threshold"):
            run_batch(data["model"], paths, out, resume=True)
        assert run_batch(data["model"], paths, out, resume=True, threshold=10.0).scored == 1
