"""Issue 19 goal 5: `zsadx data shard --workers N` writes the same bytes whatever N is.

Encoding runs in a process pool; the tars must not depend on which worker finished first, so a
folder sharded by one worker and one sharded by three hold byte-identical files (tars, index,
group markers). Small shard sizes make several tars per group, so the cut points are compared too.
"""
from __future__ import annotations

from pathlib import Path

from conftest import run_cli
from zsadx.data.convert import convert
from zsadx.data.synthetic import make_raw


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".lock" not in p.name}


def test_one_and_three_workers_write_byte_identical_shard_folders(tmp_path, capsys):
    make_raw("btad", tmp_path / "raw", seed=4, n=3)
    convert("btad", tmp_path / "raw", tmp_path / "m", progress=False)
    folders = {}
    for workers in (1, 3):
        out = tmp_path / f"s{workers}"
        rc, _, err = run_cli(capsys, "data", "shard", tmp_path / "m", "--out", out, "--size", "64",
                             "--shard-size", "20KB", "--workers", str(workers))
        assert rc == 0, err
        folders[workers] = _files(out)
    tars = [n for n in folders[1] if n.endswith(".tar")]
    assert len(tars) > len({n.rsplit("-", 1)[0] for n in tars})  # several tars per group: cut points compared
    assert folders[1].keys() == folders[3].keys()
    differing = [n for n in folders[1] if folders[1][n] != folders[3][n]]
    assert differing == []
