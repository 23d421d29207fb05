"""`python -m umo_core evaluate` on a benchmark folder built from the face-assets' LFW faces: the tables hold the
`score` command's numbers, the plots are drawn, an interrupted run resumes, shards merge into the same tables,
and every bad layout is one `error:` line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.benchmark_folder import CASES, build_benchmark
from umo_core import evaluate
from umo_core.cli import main
from umo_core.console import ProgressLines, Stopped

TABLES = ("results.json", "images.csv", "summary.csv", "summary.md")


def _evaluate(benchmark: Path, out: Path, pack: Path, *extra: str) -> int:
    return main(["evaluate", str(benchmark), "--out", str(out), "--faces", str(pack), "--provider", "cpu",
                 "--batch", "2", *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def benchmark(assets, tmp_path_factory) -> Path:
    return build_benchmark(tmp_path_factory.mktemp("evaluate") / "bench")


@pytest.fixture(scope="module")
def evaluated(benchmark, pack_dir, tmp_path_factory) -> Path:
    """One whole run's output folder."""
    out = tmp_path_factory.mktemp("evaluate") / "out"
    assert _evaluate(benchmark, out, pack_dir) == 0
    return out


def test_tables_hold_the_score_commands_numbers(benchmark, evaluated, pack_dir, tmp_path):
    results = json.loads((evaluated / "results.json").read_text())
    rows = {row["image"]: row for row in results["images"]}
    assert len(rows) == sum(len(images) for _, _, methods in CASES.values() for images in methods.values())
    csv_rows = {row["image"]: row for row in csv.DictReader((evaluated / "images.csv").open())}
    assert csv_rows.keys() == rows.keys()
    for case, (references, _, methods) in CASES.items():
        refs = sorted((benchmark / case / "refs").iterdir())
        assert len(refs) == len(references)
        for method, images in methods.items():
            paths = [benchmark / case / method / name for name in images]
            report = tmp_path / f"{case}_{method}.json"
            args = ["score", "--faces", str(pack_dir), "--provider", "cpu", "--gt", str(benchmark / case / "gt.png"),
                    "--json", str(report), "--image", *map(str, paths)]
            for ref in refs:
                args += ["--ref", str(ref)]
            assert main(args) == 0
            for path, entry in zip(paths, json.loads(report.read_text())["images"]):
                row = rows[path.relative_to(benchmark).as_posix()]
                assert (row["case"], row["method"], row["people"]) == (case, method, len(references))
                assert row["faces"] == entry["faces"] and row["assignment"] == entry["assignment"]
                assert row["face_count_ok"] == (len(entry["faces"]) == len(references))
                np.testing.assert_allclose(row["similarity"], entry["similarity"], rtol=1e-6, atol=1e-9)
                assert csv_rows[row["image"]]["faces"] == str(len(entry["faces"]))
                for name, value in entry["metrics"].items():
                    assert row["metrics"][name] == (value if value is None or isinstance(value, (list, int))
                                                    else pytest.approx(value, rel=1e-6, abs=1e-9)), (path, name)
                    written = csv_rows[row["image"]][name]  # lists as JSON, no value as an empty cell
                    assert (written == "" if value is None else json.loads(written) == value if isinstance(value, list)
                            else float(written) == pytest.approx(value)), (path, name)


def test_summary_is_the_mean_of_the_images(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    rows = [{**row, **row["metrics"], "faces": len(row["faces"])} for row in results["images"]]
    summary = {(row["method"], row["people"]): row for row in results["summary"]}
    assert set(summary) == {(m, p) for m in ("faithful", "pasted") for p in ("all", 2, 3)}
    for (method, people), row in summary.items():
        group = [r for r in rows if r["method"] == method and people in ("all", r["people"])]
        assert row["images"] == len(group)
        assert row["face_count_accuracy"] == pytest.approx(sum(r["faces"] == r["people"] for r in group) / len(group))
        for key in ("id_sim", "id_conf", "id_sim_matched", "sim_gt", "cp", "coverage"):
            values = [r[key] for r in group if r[key] is not None]
            assert row[key] == (pytest.approx(sum(values) / len(values)) if values else None), (method, people, key)
    # duo/faithful/c.png shows a stranger beside the two people: a bystander, the face count is off, nobody
    # missing or doubled. duo/pasted/b.png shows R1 twice, duo/pasted/c.png misses R1, trio/pasted/b.png R3.
    by_image = {row["image"]: row for row in rows}
    assert [image for image, row in by_image.items() if row["duplicates"]] == ["duo/pasted/b.png"]
    assert {image: row["missing"] for image, row in by_image.items() if row["missing"]} == {
        "duo/pasted/c.png": [0], "trio/pasted/b.png": [2]}
    assert summary["faithful", 2]["face_count_accuracy"] == pytest.approx(2 / 3)
    assert summary["faithful", "all"]["coverage"] == 1 and summary["faithful", "all"]["duplicates"] == 0
    assert summary["pasted", 2]["face_count_accuracy"] == pytest.approx(1 / 3)
    assert summary["pasted", 3]["face_count_accuracy"] == pytest.approx(1 / 2)
    assert summary["pasted", 2]["coverage"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert summary["pasted", 3]["coverage"] == pytest.approx((1 + 2 / 3) / 2)
    assert summary["pasted", 2]["duplicates"] == pytest.approx(1 / 3) and summary["pasted", 3]["duplicates"] == 0
    # Pasting the references is copy-paste; other photos of the people are closer to the ground truth.
    assert summary["pasted", "all"]["cp"] > 0.3 > summary["faithful", "all"]["cp"]
    markdown = (evaluated / "summary.md").read_text()
    assert markdown.startswith("| method | people | images | ID-Sim | ID-Conf | Sim(Ref) | Sim(GT) | CP |")
    assert f"| faithful | 2 | 3 | {summary['faithful', 2]['id_sim']:.1f} |" in markdown


def test_plots_are_pngs(evaluated):
    for name in evaluate.PLOT_FILES:
        with Image.open(evaluated / name) as plot:
            assert plot.format == "PNG" and plot.width >= 400 and plot.height >= 300
            # Drawn, not blank: many colours (points, lines, text).
            assert len(plot.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50


def test_score_and_import_do_not_load_matplotlib():
    import subprocess
    import sys

    code = "import sys, umo_core.cli, umo_core.evaluate; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_cached_run_loads_no_model(evaluated, benchmark, pack_dir, tmp_path, capsys):
    shutil.copytree(evaluated / evaluate.CACHE_FOLDER, tmp_path / "out" / evaluate.CACHE_FOLDER)
    assert _evaluate(benchmark, tmp_path / "out", pack_dir) == 0
    captured = capsys.readouterr()
    assert "10 image(s) of 2 case(s), 10 already scored" in captured.out
    assert captured.err == ""  # all cached: nothing scored, the face model not even loaded


@pytest.mark.parametrize(("stop", "status"), [(KeyboardInterrupt(), 130), (Stopped(signal.SIGTERM), 143)])
def test_interrupted_run_resumes(benchmark, evaluated, pack_dir, tmp_path, monkeypatch, capsys, stop, status):
    """Ctrl-C (Python's KeyboardInterrupt), or SIGTERM as console.stop_signals raises it."""
    out = tmp_path / "out"

    class Interrupted(ProgressLines):
        def update(self, n: int = 1) -> None:
            super().update(n)
            if self.done >= 4:
                raise stop

    monkeypatch.setattr(evaluate, "progress", Interrupted)
    with pytest.raises(SystemExit) as exit_status:  # a note and the shell's status for the signal, no traceback
        _evaluate(benchmark, out, pack_dir)
    monkeypatch.undo()
    assert exit_status.value.code == status
    assert "note: interrupted: the 4 scored image(s) are kept in" in capsys.readouterr().err
    cached = _files(out)  # no table, no temporary file: only the finished images' results
    assert len(cached) == 4 and all(name.startswith("cache/") and name.endswith(".json") for name in cached)

    assert _evaluate(benchmark, out, pack_dir) == 0
    captured = capsys.readouterr()
    assert "10 image(s) of 2 case(s), 4 already scored" in captured.out
    assert "evaluate: 10/10 images, " in captured.err  # the plain progress line (stderr is no terminal)
    after = _files(out)
    assert all(after[name] == content for name, content in cached.items())
    assert {name: after[name] for name in TABLES} == {name: (evaluated / name).read_bytes() for name in TABLES}

    # Lost results and tables: only those images are scored again, and the tables come back the same.
    for name in list(cached)[:2]:
        (out / name).unlink()
    (out / "summary.md").unlink()
    assert _evaluate(benchmark, out, pack_dir) == 0
    assert "8 already scored" in capsys.readouterr().out
    assert _files(out) == after

    # A damaged result (a disk problem, a copy cut short) is scored again, not trusted nor fatal.
    (out / list(cached)[2]).write_text('{"faces": [')
    assert _evaluate(benchmark, out, pack_dir) == 0
    assert "9 already scored" in capsys.readouterr().out
    assert _files(out) == after


def test_shards_merged_equal_one_run(benchmark, evaluated, pack_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _evaluate(benchmark, out, pack_dir, "--merge") == 2
    assert "--merge: 10 of 10 images have no result" in capsys.readouterr().err
    assert _evaluate(benchmark, out, pack_dir, "--shard", "1/2") == 0
    assert not any((out / name).exists() for name in TABLES)  # a shard writes results, not tables
    assert "shard 1/2 done" in capsys.readouterr().out
    assert _evaluate(benchmark, out, pack_dir, "--merge") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --merge: 5 of 10 images have no result")
    assert f"case 'duo', method 'pasted', image '{benchmark / 'duo' / 'pasted' / 'c.png'}'" in error
    assert _evaluate(benchmark, out, pack_dir, "--shard", "2/2") == 0
    assert _evaluate(benchmark, out, pack_dir, "--merge") == 0
    assert _files(out) == _files(evaluated)


def test_shards_split_the_images_in_order():
    jobs = list(range(10))
    parts = [evaluate.shard_jobs(jobs, index, 3) for index in (1, 2, 3)]
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert evaluate.shard_jobs(jobs[:1], 1, 2) == [] and evaluate.shard_jobs(jobs[:1], 2, 2) == [0]


def _break(name: str, benchmark: Path) -> str:
    """Break a copy of the benchmark one way; returns what the error line must contain."""
    duo = benchmark / "duo"
    if name == "no refs folder":
        shutil.rmtree(duo / "refs")
        return f"case 'duo': no refs/ folder in '{duo}'"
    if name == "empty refs":
        for photo in (duo / "refs").iterdir():
            photo.unlink()
        return f"case 'duo' refs/: '{duo / 'refs'}' holds no image files"
    if name == "method without images":
        (duo / "sketchy").mkdir()
        (duo / "sketchy" / "prompt.txt").write_text("two people")
        return f"case 'duo' method 'sketchy': '{duo / 'sketchy'}' holds no image files"
    if name == "folder in a method":
        (duo / "pasted" / "more").mkdir()
        return f"case 'duo' method 'pasted': '{duo / 'pasted' / 'more'}' is a folder"
    if name == "two ground truths":
        shutil.copyfile(duo / "gt.png", duo / "GT.jpg")
        return "case 'duo': 2 ground-truth photos"
    if name == "stray image":
        shutil.copyfile(duo / "gt.png", duo / "extra.png")
        return f"case 'duo': image '{duo / 'extra.png'}' is outside refs/ and the method folders"
    if name == "no method":
        for method in ("faithful", "pasted"):
            shutil.rmtree(benchmark / "trio" / method)
        return f"case 'trio': no method folder in '{benchmark / 'trio'}'"
    if name == "broken image":
        (benchmark / "trio" / "pasted" / "c.png").write_bytes(b"not a png")
        return f"case 'trio' method 'pasted' image '{benchmark / 'trio' / 'pasted' / 'c.png'}' cannot be read"
    if name == "broken reference":
        (duo / "refs" / "3_x.jpg").write_bytes(b"\xff\xd8 cut short")
        return f"case 'duo' reference 3 '{duo / 'refs' / '3_x.jpg'}' cannot be read as an image"
    if name == "symbolic link loop":
        (duo / "pasted" / "loop.png").symlink_to(duo / "pasted" / "loop.png")
        return f"'{duo / 'pasted' / 'loop.png'}' is a symbolic link loop"
    if name == "no cases":
        for case in CASES:
            shutil.rmtree(benchmark / case)
        (benchmark / "README.md").write_text("cases go here")
        return f"benchmark folder '{benchmark}' has no case folders"
    raise AssertionError(name)


BAD_LAYOUTS = ("no refs folder", "empty refs", "method without images", "folder in a method", "two ground truths",
               "stray image", "no method", "broken image", "broken reference", "symbolic link loop", "no cases")


@pytest.mark.parametrize("name", BAD_LAYOUTS)
def test_bad_layout_is_one_line_before_any_work(name, benchmark, tmp_path, capsys):
    broken = tmp_path / "bench"
    shutil.copytree(benchmark, broken)
    expected = _break(name, broken)
    out = tmp_path / "out"
    # No face pack at all: the layout is checked before the pack is even looked for.
    assert main(["evaluate", str(broken), "--out", str(out), "--faces", str(tmp_path / "no_pack")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert expected in captured.err
    assert captured.out == "" and not out.exists()


@pytest.mark.parametrize(("extra", "expected"), [
    (["--shard", "3/2"], "--shard '3/2' is not i/n with 1 <= i <= n"),
    (["--shard", "half"], "--shard 'half' is not i/n"),
    (["--shard", "1/2", "--merge"], "--merge writes the tables from every shard's results; give it without --shard"),
    (["--batch", "0"], "--batch 0 must be at least 1 (images per face-model call)"),
    (["--provider", "nosuch"], "provider 'nosuch' is unknown; choose one of"),
])
def test_bad_options_are_one_line(extra, expected, benchmark, tmp_path, capsys):
    assert main(["evaluate", str(benchmark), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {err[7:]}" and err.count("\n") == 1 and expected in err
    assert not (tmp_path / "out").exists()


def test_out_inside_the_benchmark_or_a_file(benchmark, tmp_path, capsys):
    assert main(["evaluate", str(benchmark), "--out", str(benchmark / "results")]) == 2
    assert "is inside the benchmark folder" in capsys.readouterr().err
    assert not (benchmark / "results").exists()
    (tmp_path / "file").write_text("")
    assert main(["evaluate", str(benchmark), "--out", str(tmp_path / "file")]) == 2
    assert "--out '" in capsys.readouterr().err


def test_outputs_get_the_umask_permissions(evaluated):
    mask = os.umask(0)
    os.umask(mask)
    for name in (*TABLES, *evaluate.PLOT_FILES):
        assert (evaluated / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_without_matplotlib_it_says_so_before_any_work(benchmark, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    assert main(["evaluate", str(benchmark), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("error: evaluate draws its plots with matplotlib, which is not installed; "
                                       "pip install matplotlib (or umo-identity[eval])\n")
    assert not (tmp_path / "out").exists()


def test_without_ground_truth_there_is_no_copy_paste_plot(benchmark, evaluated, pack_dir, tmp_path, capsys):
    bench, out = tmp_path / "bench", tmp_path / "out"
    shutil.copytree(benchmark, bench)
    shutil.copytree(evaluated, out)  # an earlier run's tables and plots, with ground truths
    for case in CASES:
        (bench / case / "gt.png").unlink()
    assert _evaluate(bench, out, pack_dir) == 0
    assert "0 already scored" in capsys.readouterr().out  # the ground truth is part of each result's key
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert all(row["sim_gt"] is None and row["cp"] is None and row["id_sim"] is not None for row in summary)
    assert not (out / evaluate.PLOT_FILES[0]).exists() and (out / evaluate.PLOT_FILES[1]).is_file()
    assert "| faithful | all | 5 | 70.8 | 93.8 | 70.8 |  |  | 1.000 |" in (out / "summary.md").read_text()
