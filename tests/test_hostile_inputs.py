"""Hostile input and unlucky timing: pipes and devices among the images, a read that never
returns, a full disk, and files in a results folder that tlbuild did not write."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tlbuild.classify.dataset_out import PLAN_FILE, ResultsDataset
from tlbuild.classify.results import COLUMNS, ResultsFile
from tlbuild.cli import app
from tlbuild.data.decode_threads import DecodeThreads
from tlbuild.data.images import ImageReadError, decode
from tlbuild.errors import UsageError

runner = CliRunner()
IDENT = {"model_sha256": "abc", "artifact": "m.onnx", "ok_class": None, "threshold": None}
IDENT = {**IDENT, "novelty_threshold": None}
IDENT = {**IDENT, "topk": 1, "decode": "jpeg-draft"}
# Wide enough that rich never wraps a message the tests read.
WIDE = {**os.environ, "COLUMNS": "500"}


def _finishes(fn: Callable[[], Any], seconds: float = 30.0) -> Any:
    """fn()'s result, run in a daemon thread so that a call that blocks fails the test."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds:.0f} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture()
def pipes() -> Iterator[Callable[[Path], Path]]:
    """Makes named pipes; afterwards each is opened for writing once, so any reader it left
    blocked (the bug these tests catch) sees end-of-file and its thread can end."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        made.append(path)
        return path

    yield make
    for p in made:
        with contextlib.suppress(OSError):  # ENXIO: no reader waiting
            os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))


def _plant(folder: Path, make_pipe: Callable[[Path], Path]) -> dict[str, str]:
    """A named pipe, a link to a device and a socket named like images; the reason for each."""
    make_pipe(folder / "pipe.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    here = os.getcwd()
    os.chdir(folder)  # a socket's path must be short; this one is relative
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind("sock.jpg")
        s.close()
    finally:
        os.chdir(here)
    return {
        "pipe.jpg": "not a regular file: a named pipe",
        "zero.jpg": "not a regular file: a character device",
        "sock.jpg": "not a regular file: a socket",
    }


def _jpegs(folder: Path, n: int, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"{prefix}_{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p, quality=85)
        out.append(p)
    return out


# -- 1. only regular files are opened as images ---------------------------------------------------


def test_the_decoder_refuses_pipes_devices_sockets_and_folders(tmp_path: Path, pipes) -> None:  # noqa: ANN001
    expected = _plant(tmp_path, pipes)
    (tmp_path / "folder.jpg").mkdir()
    expected["folder.jpg"] = "not a regular file: a folder"
    for name, reason in expected.items():
        with pytest.raises(ImageReadError) as e:
            _finishes(lambda n=name: decode(tmp_path / n), 10)
        assert e.value.reason == reason


def test_the_data_scan_skips_a_pipe_and_a_device_link_with_their_reason(
    data_copy: Path,
    pipes,  # noqa: ANN001
) -> None:
    from tlbuild.data.scan import scan_dataset
    from tlbuild.recipe import DataConfig

    expected = _plant(data_copy / "ok", pipes)
    splits = _finishes(lambda: scan_dataset(DataConfig.model_validate({"root": data_copy})))
    assert {p.name: why for p, why in splits.skipped} == expected
    assert not {s.path.name for s in splits.train + splits.val} & set(expected)


def test_sizes_duplicates_fingerprint_and_thumbnails_never_block_on_a_pipe(
    tiny_data: Path,
    tmp_path: Path,
    pipes,  # noqa: ANN001
) -> None:
    import shutil

    from tests.conftest import small_recipe
    from tlbuild.cv.report import _thumbnail
    from tlbuild.data.duplicates import exact_groups
    from tlbuild.data.sizes import summarize_sizes
    from tlbuild.incremental import data_digest
    from tlbuild.recipe import load_recipe

    good = next((tiny_data / "ok").glob("*.jpg"))
    a, b = pipes(tmp_path / "a.jpg"), pipes(tmp_path / "b.jpg")
    summary = _finishes(lambda: summarize_sizes([a, good]))
    assert summary is not None and summary.sampled == 1
    # Two pipes have the same size (0): the exact-copy check would hash both.
    assert _finishes(lambda: exact_groups([a, b])) == [0, 1]
    with pytest.raises(OSError, match="named pipe"):
        _finishes(lambda: _thumbnail(a, tmp_path / "thumb.jpg"))

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    recipe = load_recipe(small_recipe(tmp_path, data, "fp", data_extra='fingerprint = "content"'))
    before = data_digest(recipe)
    pipes(data / "ok" / "pipe.jpg")
    after = _finishes(lambda: data_digest(recipe))
    assert after[0] != before[0] and after[1]["files"] == before[1]["files"] + 1


def _tlbuild(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tlbuild", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=WIDE)


def test_classify_makes_error_rows_of_pipes_and_devices_and_skips_a_pipe_list(
    tiny_build: Path,
    tmp_path: Path,
    pipes,  # noqa: ANN001
) -> None:
    images = tmp_path / "in"
    good = _jpegs(images, 3)
    expected = _plant(images, pipes)
    listed = pipes(tmp_path / "list.txt")  # a path list that is a pipe: refused, not waited on
    out = tmp_path / "r.parquet"
    done = _tlbuild(
        "classify", str(images), str(listed), "--model", str(tiny_build), "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert f"cannot read path list {listed}: not a regular file: a named pipe" in done.stderr
    df = pd.read_parquet(out).set_index("path")
    assert len(df) == len(good) + len(expected)
    for name, reason in expected.items():
        assert df.loc[str(images / name), "error"] == reason
    assert df.loc[[str(p) for p in good], "error"].isna().all()


# -- 2. signals end a run whatever a decode thread is blocked on ----------------------------------

_STUCK_CLASSIFY = """
import os, sys, threading
from pathlib import Path
import tlbuild.classify.rows as rows
real = rows.load_input
def load_input(path, *args, **kwargs):
    if Path(path).name.startswith("stuck"):  # a read on a dead network mount
        Path(os.environ["STUCK_MARK"]).touch()
        threading.Event().wait()
    return real(path, *args, **kwargs)
rows.load_input = load_input
from tlbuild.cli import main
sys.argv = ["tlbuild", *sys.argv[1:]]
main()
"""


def _wait_for(ok: Callable[[], bool], proc: subprocess.Popen[str], seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while not ok():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "the run never reached the stuck file"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("sig", "before_stuck"), [(signal.SIGTERM, 12), (signal.SIGINT, 0)], ids=["term", "int"]
)
def test_a_signal_ends_classify_while_a_decode_is_stuck_and_says_what_was_kept(
    tiny_build: Path, tmp_path: Path, sig: signal.Signals, before_stuck: int
) -> None:
    images = _jpegs(tmp_path / "in", 20)
    stuck = tmp_path / "in" / "stuck.jpg"
    stuck.write_bytes(images[0].read_bytes())
    order = [*images[:before_stuck], stuck, *images[before_stuck:]]
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(map(str, order)) + "\n")
    script = tmp_path / "stuck.py"
    script.write_text(_STUCK_CLASSIFY)
    mark, out = tmp_path / "stuck.mark", tmp_path / "r.parquet"
    journal = out.with_name(out.name + ".journal")
    cmd = [sys.executable, str(script), "classify", str(listed), "--model", str(tiny_build)]
    cmd += ["--out", str(out), "--batch-size", "4", "--workers", "2"]
    env = {**WIDE, "STUCK_MARK": str(mark)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # The batches before the stuck one are written: the first committed, the rest journaled.
        rows_in_journal = max(0, before_stuck - 4)

        def ready() -> bool:
            lines = journal.read_text().count("\n") if journal.exists() else -1
            return mark.exists() and (before_stuck == 0 or lines == 1 + rows_in_journal)

        _wait_for(ready, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{sig.name} did not end the run: a decode thread held the process")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not journal.exists()
    if before_stuck:
        assert f"the 12 rows this run wrote are in {out}" in err, err
        assert len(pd.read_parquet(out)) == 12
    else:
        assert "this run wrote no rows" in err and not out.exists(), err


_STUCK_SCAN = """
import os, sys, threading
from pathlib import Path
import tlbuild.data.scan as scan
real = scan.load_rgb
def load_rgb(path, *args, **kwargs):
    if path.name.startswith("stuck"):
        Path(os.environ["STUCK_MARK"]).touch()
        threading.Event().wait()
    return real(path, *args, **kwargs)
scan.load_rgb = load_rgb
try:
    scan.find_unreadable([Path(p) for p in sys.argv[1:]])
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_ends_the_data_scan_while_a_read_is_stuck(tmp_path: Path) -> None:
    images = _jpegs(tmp_path / "in", 6)
    stuck = tmp_path / "in" / "stuck.jpg"
    stuck.write_bytes(images[0].read_bytes())
    script, mark = tmp_path / "scan.py", tmp_path / "stuck.mark"
    script.write_text(_STUCK_SCAN)
    env = {**os.environ, "STUCK_MARK": str(mark)}
    cmd = [sys.executable, str(script), str(stuck), *map(str, images)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(mark.exists, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("Ctrl-C did not end the scan: a decode thread held the process")
    assert proc.returncode == 130 and "interrupted" in out, err


def test_decode_threads_keep_input_order_and_a_bounded_window() -> None:
    running = {"now": 0, "most": 0}
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        time.sleep(0.002 * (i % 3))
        with lock:
            running["now"] -= 1
        return i * i

    submitted = []

    def items() -> Iterator[int]:
        for i in range(40):
            submitted.append(i)
            yield i

    with DecodeThreads(4) as pool:
        got = []
        for value in pool.imap(work, items(), 5):
            got.append(value)
            assert len(submitted) - len(got) <= 5  # never more than the window ahead
    # In order, and really in parallel (a pool that ran one at a time would pass the rest).
    assert got == [i * i for i in range(40)] and running["most"] >= 2


# -- 3. a full disk is one message, and no journaled or committed row is lost ---------------------


def _written(message: str) -> int:
    """How many rows the message says this run wrote."""
    if "this run wrote no rows" in message:
        return 0
    m = re.search(r"(?:of )?the ([\d,]+) rows? this run wrote", message)
    assert m, message
    return int(m.group(1).replace(",", ""))


@pytest.mark.parametrize("kib", [8, 16])
@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_a_full_disk_is_one_message_and_the_next_run_finishes_the_work(
    tiny_build: Path,
    tmp_path: Path,
    small_disk,
    kib: int,
    folder: bool,  # noqa: ANN001
) -> None:
    images = _jpegs(tmp_path / "in", 40)
    disk = small_disk(kib)
    out = f"{disk / 'ds'}/" if folder else str(disk / "r.parquet")
    args = ["classify", str(tmp_path / "in"), "--model", str(tiny_build), "--out", out]
    args += ["--batch-size", "4", "--workers", "1", "--part-rows", "8"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and res.output.count("error:") == 1, res.output
    assert f"error: no space left on the device holding {out}; free some space there" in res.output
    said = _written(res.output)
    # What the message says is on disk is there: committed rows plus the journal's.
    if folder:
        parts = sorted((disk / "ds").glob("part-*.parquet"))
        assert sum(len(pd.read_parquet(p)) for p in parts) == said
        assert not list((disk / "ds").glob(".*tmp*"))  # a failed part leaves no temporary file
    else:
        journal = Path(out + ".journal")
        in_file = len(pd.read_parquet(out)) if Path(out).exists() else 0
        lines = journal.read_text().splitlines()[1:] if journal.exists() else []
        assert in_file + len(lines) == said and all(json.loads(x) for x in lines)

    small_disk(4096)  # space freed
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    if said:
        assert f"{said:,} already in --out" in again.output
    df = pd.read_parquet(out)
    assert len(df) == len(images) and df.path.is_unique


# -- 4. a refused folder is left as it was; PIL's EXIF warnings stay quiet ------------------------


def _rows(start: int, n: int) -> dict[str, list]:
    cols: dict[str, list] = {c: [None] * n for c in COLUMNS}
    cols["path"] = [f"/img/{i}.jpg" for i in range(start, start + n)]
    cols["label"] = ["ok"] * n
    cols["classified_at"] = [1_700_000_000_000_000] * n
    return cols


def test_a_refused_folder_out_is_left_as_it_was_found(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    pd.DataFrame({"a": [1, 2]}).to_parquet(theirs / "data.parquet")
    with pytest.raises(UsageError, match="did not write"):
        ResultsDataset(f"{theirs}/", IDENT)
    assert sorted(os.listdir(theirs)) == ["data.parquet"]

    ours = tmp_path / "ours"
    ds = ResultsDataset(f"{ours}/", IDENT)
    ds.add(_rows(0, 3))
    ds.close()
    (ours / "_tlbuild.lock").unlink()  # a folder copied or synced without it
    before = sorted(os.listdir(ours))
    with pytest.raises(UsageError, match="another model"):
        ResultsDataset(f"{ours}/", {**IDENT, "model_sha256": "other"})
    assert sorted(os.listdir(ours)) == before


_EXIF_CHECK = """
import sys, warnings
from tlbuild.data.images import decode
decode(sys.argv[1])
warnings.warn("a warning of our own still shows", UserWarning)
"""


def test_corrupt_exif_does_not_reach_the_terminal(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010E] = "x" * 200  # ImageDescription, its data cut off below
    exif[0x0112] = 1
    p = tmp_path / "bad_exif.jpg"
    Image.new("RGB", (32, 24), (200, 10, 10)).save(p, exif=exif.tobytes()[:60])
    with pytest.warns(UserWarning, match="Tag data"), Image.open(p) as img:  # Pillow does warn
        img.getexif()
    done = subprocess.run(
        [sys.executable, "-c", _EXIF_CHECK, str(p)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "of our own" in done.stderr and "Tag" not in done.stderr and "EXIF" not in done.stderr


# -- 5. classify trusts no name, path or key from a file it did not just write --------------------


def test_a_compaction_plan_cannot_delete_outside_the_folder_and_a_bad_one_is_one_message(
    tmp_path: Path,
) -> None:
    out = tmp_path / "ds"
    ds = ResultsDataset(f"{out}/", IDENT)
    ds.add(_rows(0, 2))
    ds.close()
    victim = tmp_path / "victim.parquet"
    victim.write_bytes(b"someone else's")
    plans = [
        {"remove": ["../victim.parquet"], "add": [], "published": True},
        {"remove": [], "add": ["../victim.parquet"], "published": False},
        {"remove": 3, "add": []},
        ["not", "a", "plan"],
    ]
    for plan in [*plans, "{not json"]:
        text = plan if isinstance(plan, str) else json.dumps(plan)
        (out / PLAN_FILE).write_text(text)
        with pytest.raises(UsageError, match=PLAN_FILE):
            ResultsDataset(f"{out}/", IDENT)
        assert victim.read_bytes() == b"someone else's"
    assert len(pd.read_parquet(out)) == 2


def test_a_damaged_journal_line_is_skipped_not_a_traceback(tmp_path: Path) -> None:
    out = tmp_path / "r.parquet"
    rf = ResultsFile(out, IDENT, commit_rows=1000, commit_seconds=1e9)
    rf.add(_rows(0, 2))  # committed at once
    rf.add(_rows(2, 2))  # journaled
    rf._journal.close()  # killed
    header, *rows = rf.journal_path.read_text().splitlines()
    missing_key = json.dumps({"path": "/img/x.jpg", "label": "ok"})
    wrong_type = json.dumps({**json.loads(rows[0]), "path": "/img/y.jpg", "width": "wide"})
    lines = [header, rows[0], missing_key, "[1, 2]", wrong_type, rows[1]]
    rf.journal_path.write_text("\n".join(lines) + "\n")
    warned: list[str] = []
    again = ResultsFile(out, IDENT, warn=warned.append)
    assert again.done("/img/2.jpg") and again.done("/img/3.jpg")
    assert not again.done("/img/x.jpg") and not again.done("/img/y.jpg")
    assert len(warned) == 1 and "3 damaged line(s)" in warned[0]
    again.close()
    assert sorted(pd.read_parquet(out).path) == [f"/img/{i}.jpg" for i in range(4)]

    rf.journal_path.write_text("[]\n")  # a header that is not an object
    ResultsFile(out, IDENT).close()


def test_classify_writes_through_no_planted_link_and_opens_no_pipe(
    tmp_path: Path,
    pipes,  # noqa: ANN001
) -> None:
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    out = tmp_path / "r.parquet"
    os.symlink(victim, out.with_name(out.name + ".journal"))
    with pytest.raises(UsageError, match="symbolic link"):
        ResultsFile(out, IDENT)
    assert victim.read_text() == "precious"

    folder = tmp_path / "ds"
    folder.mkdir()
    planted = tmp_path / "made-outside"
    os.symlink(planted, folder / "_tlbuild.lock")  # the lock must not be opened through it
    with pytest.raises(UsageError, match="symbolic link"):
        ResultsDataset(f"{folder}/", IDENT)
    assert not planted.exists()
    (folder / "_tlbuild.lock").unlink()
    ResultsDataset(f"{folder}/", IDENT).close()
    assert json.loads((folder / "_tlbuild.json").read_text())["identity"] == IDENT

    pipes(folder / "part-planted.parquet")
    _finishes(lambda: ResultsDataset(f"{folder}/", IDENT).close())
    with pytest.raises(UsageError, match="not a regular file"):
        _finishes(lambda: ResultsFile(pipes(tmp_path / "piped.parquet"), IDENT))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, folder / "_unreadable")  # where unreadable parts are set aside
    (folder / "part-cut.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(UsageError, match="symbolic link"):
        ResultsDataset(f"{folder}/", IDENT)
    assert not list(elsewhere.iterdir())

    (folder / "_tlbuild.json").write_text("[1]")
    with pytest.raises(UsageError, match="damaged"):
        ResultsDataset(f"{folder}/", IDENT)
