"""User errors are one line (exit 2), bugs keep their traceback; the file-system rules of zsadx/files.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from zsadx.cli import main
from zsadx.errors import DiskFullError, LockedError, UnsafePathError
from zsadx.files import FolderLock, atomic_write_bytes, resolve_within, safe_component

from conftest import REPO, subprocess_env


def test_user_error_is_one_line_with_exit_2_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "no_such_download"
    assert main(["data", "convert", "mvtec-ad", "--root", str(missing), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("zsadx data: error:") and str(missing) in err
    with pytest.raises(FileNotFoundError):
        main(["--debug", "data", "convert", "mvtec-ad", "--root", str(missing), "--out", str(tmp_path / "m")])


def test_disk_full_names_the_path_and_leaves_no_temp_file(full_disk):
    target = full_disk / "big.bin"
    with pytest.raises(DiskFullError) as info:
        atomic_write_bytes(target, b"x" * (1 << 20))
    assert str(target) in str(info.value) and "no space left" in str(info.value)
    assert list(full_disk.iterdir()) == []  # neither the target nor a half-written temp file


def test_folder_lock_names_its_holder_and_frees_itself_when_the_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from zsadx.files import FolderLock
        FolderLock({str(tmp_path)!r}, "the test folder").acquire()
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError) as info:
            FolderLock(tmp_path, "the test folder").acquire()
        assert f"pid {holder.pid}" in str(info.value) and str(tmp_path) in str(info.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FolderLock(tmp_path, "the test folder"):  # the kernel released the dead holder's lock
        pass


@pytest.mark.parametrize("name", ["../../X", "..", "", "a/b", "/abs", "~root", " padded"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafePathError):
        safe_component(name, "grid label")


def test_paths_stay_inside_their_root(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "outside.tar").write_bytes(b"")
    os.symlink(tmp_path / "outside.tar", tmp_path / "shards" / "link.tar")
    assert resolve_within(tmp_path / "shards", "a-00000.tar", "shard") == (tmp_path / "shards" / "a-00000.tar").resolve()
    for bad in ["../outside.tar", str(tmp_path / "outside.tar"), "link.tar"]:
        with pytest.raises(UnsafePathError):
            resolve_within(tmp_path / "shards", bad, "shard")
    assert safe_component("bottle_01.v2", "class") == "bottle_01.v2"
