"""Issue 20 item 2: `zsadx eval` draws a progress bar per dataset on a terminal, and none elsewhere."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from conftest import REPO, make_shards, run_cli, subprocess_env

DATASET = "mvtec-ad"
SMALL = ["method.backbone.image_size=64", "data.num_workers=0", "data.batch_size=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("progress"), {DATASET: 1}, size=64)


def eval_argv(shards: Path, out: Path, *overrides: str) -> list[str]:
    return ["eval", "--method", "methods/clip-tiny", "--shards", str(shards), "--dataset", DATASET,
            "--out", str(out), *SMALL, *overrides]


def eval_on_terminal(argv: list[str]) -> tuple[int, str, str]:
    """``python -m zsadx ARGV`` with stderr on a real pseudo-terminal (120 columns): (exit code,
    what the terminal received, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "zsadx", *argv], stdin=subprocess.DEVNULL,
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
