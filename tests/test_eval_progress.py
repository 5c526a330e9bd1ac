"""Issue 20 item 2: `zsadx eval` draws a progress bar per dataset on a terminal, and none elsewhere."""
from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import shutil
import subprocess
import tarfile
import termios
from pathlib import Path

import pytest

from conftest import REPO, launch_cmd, make_shards, run_cli, subprocess_env

DATASET = "mvtec-ad"
SMALL = ["method.backbone.image_size=64", "data.num_workers=0", "data.batch_size=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("progress"), {DATASET: 1}, size=64)


def eval_argv(shards: Path, out: Path, *overrides: str) -> list[str]:
    return ["eval", "--method", "methods/clip-tiny", "--shards", str(shards), "--dataset", DATASET,
            "--out", str(out), *SMALL, *overrides]


def eval_on_terminal(argv: list[str], processes: int = 1) -> tuple[int, str, str]:
    """``python -m zsadx ARGV`` (under ``accelerate launch`` with several processes) with stderr on
    a real pseudo-terminal (120 columns): (exit code, what the terminal received, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(launch_cmd(processes, "zsadx", *argv), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=subprocess_env(), cwd=REPO)
    os.close(slave)
    received = b""
    while True:  # the pty's buffer is small: read while the child writes, until it closes its end
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every writer closed the slave
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    out = proc.stdout.read().decode()
    return proc.wait(timeout=120), received.decode(errors="replace"), out


def test_no_bar_when_stderr_is_not_a_terminal(shards, tmp_path, capsys):
    rc, out, err = run_cli(capsys, *eval_argv(shards, tmp_path / "e"))
    assert rc == 0, err
    assert "img/s" not in err and "\r" not in err and f"eval {DATASET}" not in err
    assert f"{DATASET}:" in out  # the results table is still printed


def test_bar_on_a_terminal_and_off_with_progress_false(shards, tmp_path):
    rc, term, out = eval_on_terminal(eval_argv(shards, tmp_path / "on"))
    assert rc == 0, term
    images = json.loads(next((tmp_path / "on").glob("*-mvtec-ad.json")).read_text())["images"]
    assert images > 0
    assert f"eval {DATASET}" in term and "100%" in term and "img/s" in term
    assert f"{images}/{images}" in term  # counts images: total = this rank's samples
    assert f"{DATASET}: {images} images" in out  # results go to stdout, untouched by the bar

    rc, term, out = eval_on_terminal(eval_argv(shards, tmp_path / "off", "progress=false"))
    assert rc == 0, term
    assert f"eval {DATASET}" not in term and "img/s" not in term and "%" not in term
    assert f"{DATASET}: {images} images" in out
    # The bar does not change what is computed: the same cell, the same results file name.
    assert [p.name for p in (tmp_path / "off").glob("*.json")] == [p.name for p in (tmp_path / "on").glob("*.json")]


def screen_lines(received: str) -> list[str]:
    """The non-blank lines a terminal shows: each '\\r' returns to column 0 and what follows
    overwrites what was there (a bar that was not cleared leaves its tail visible)."""
    shown = []
    for line in received.replace("\r\n", "\n").split("\n"):
        screen = ""
        for part in line.split("\r"):
            screen = part + screen[len(part):]
        if screen.strip():
            shown.append(screen.rstrip())
    return shown


def garble_last_test_json(shards: Path, copy: Path) -> Path:
    """A copy of the shards whose last test sample (evaluated last) has its json member cut short."""
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    group = [g for g in index["groups"] if g["dataset"] == DATASET and g["split"] == "test"][-1]
    tar_path = copy / group["shards"][-1]["name"]
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    last = [m.name for m, _ in members if m.name.endswith(".json")][-1]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == last:
                data = b'{"label": 0, '
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return tar_path


def test_an_error_during_the_loop_leaves_one_line_on_the_terminal(shards, tmp_path):
    tar_path = garble_last_test_json(shards, tmp_path / "s")
    rc, term, out = eval_on_terminal(eval_argv(tmp_path / "s", tmp_path / "e", "data.batch_size=1"))
    assert rc == 2, term
    assert f"eval {DATASET}" in term  # the bar was drawn, then cleared
    (line,) = screen_lines(term)
    assert line.startswith("zsadx eval: error: ") and str(tar_path) in line, term
    assert out == ""


def test_under_two_processes_only_rank_0_draws_its_share(shards, tmp_path):
    rc, term, out = eval_on_terminal(eval_argv(shards, tmp_path / "e"), processes=2)
    assert rc == 0, term
    images = json.loads(next((tmp_path / "e").glob("*-mvtec-ad.json")).read_text())["images"]
    share = images // 2  # rank 0's slice of the samples (EvalShards.rank_count)
    bars = [line for line in screen_lines(term) if f"eval {DATASET}" in line]
    assert len(bars) == 1 and f"{share}/{share}" in bars[0], term  # one bar, not one per rank
    assert f"{DATASET}: {images} images" in out
