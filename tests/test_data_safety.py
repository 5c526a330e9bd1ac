"""Nothing a user has is lost by `zsadx data convert` / `zsadx data shard`, and bad files are one-line errors.

Issue 15 cases 1, 2, 3, 5, 7a and issue 16 cases 10, 12 (data parts), each through real files and,
where a user would use it, the real CLI (``zsadx.cli.main``: exit code 2 and one stderr line).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, run_cli
from zsadx.cli import main
from zsadx.data.records import read_manifest
from zsadx.data.shards import ShardError, iter_tar, load_index, select_shards, write_shards
from zsadx.data.synthetic import make_raw
from zsadx.data.transforms import EvalTransform, load_image, to_rgb8
from zsadx.errors import UserError
from zsadx.files import FolderLock


run = run_cli


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def convert_cli(capsys, dataset: str, root: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "data", "convert", dataset, "--root", root, "--out", out, "--workers", "1", *extra)


def shard_cli(capsys, manifest: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "data", "shard", manifest, "--out", out, "--size", "32", "--workers", "1", *extra)


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid PNG header claiming side x side pixels (Pillow refuses it before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------------
# Issue 15.1: convert never deletes what zsadx did not write
# ------------------------------------------------------------------------------------------

def test_convert_refuses_a_folder_zsadx_did_not_write(tmp_path, capsys):
    make_raw("kvasir", tmp_path / "raw")
    out = tmp_path / "D"
    (out / "shards").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "shards" / "x.tar").write_bytes(b"mine")
    before = files_under(out)
    rc, _, err = convert_cli(capsys, "kvasir", tmp_path / "raw", out)
    line = one_error_line(err)
    assert rc == 2 and str(out) in line and "not written by `zsadx data convert`" in line and "notes.txt" in line
    assert files_under(out) == before  # nothing added, nothing lost


def test_reconvert_replaces_only_zsadx_files_and_keeps_the_users(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "D"
    make_raw("sdd", raw, seed=0)  # sdd: the pipeline writes derived/ crops too
    assert convert_cli(capsys, "sdd", raw, out)[0] == 0
    first = read_manifest(out)
    (out / "shards").mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "shards" / "x.tar").write_bytes(b"mine")
    make_raw("sdd", raw, seed=1, n=2)  # a bigger download: more images, other crops
    assert convert_cli(capsys, "sdd", raw, out)[0] == 0
    again = read_manifest(out)
    assert len(again) > len(first)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "shards" / "x.tar").read_bytes() == b"mine"
    derived = {p for p in (out / "derived").rglob("*") if p.is_file()}
    assert derived == {Path(r.image) for r in again} | {Path(r.mask) for r in again if r.mask}
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("where", ["same", "out-inside-root", "root-inside-out"])
def test_convert_refuses_out_overlapping_root(tmp_path, capsys, where):
    if where == "root-inside-out":
        out = tmp_path / "D"
        raw = out / "raw"
    else:
        raw = tmp_path / "raw"
        out = raw if where == "same" else raw / "converted"
    make_raw("kvasir", raw)
    before = files_under(raw)
    rc, _, err = convert_cli(capsys, "kvasir", raw, out)
    line = one_error_line(err)
    assert rc == 2 and "--out" in line and "--root" in line
    assert files_under(raw) == before  # the raw images are all there


def test_a_stale_temp_folder_of_a_killed_convert_is_cleaned_up(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "manifest"
    make_raw("kvasir", raw)
    assert convert_cli(capsys, "kvasir", raw, out)[0] == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    # What an older zsadx left when killed: a sibling .manifest.tmp-PID with a partial output ...
    legacy = tmp_path / f".manifest.tmp-{dead}"
    (legacy / "derived").mkdir(parents=True)
    (legacy / "summary.json").write_text("{}")
    # ... what this one leaves: a marked temp folder inside the output ...
    from zsadx.files import mark_owned, temp_path

    killed = temp_path(out / "convert")
    killed.mkdir()
    mark_owned(killed, "dataset-temp", pid=int(dead))
    (killed / "manifest.jsonl").write_text("")
    # ... and a user's folders with similar names, which are not zsadx's.
    mine = tmp_path / ".manifest.tmp-backup"
    mine.mkdir()
    (out / ".notes.tmp-1").mkdir()
    assert convert_cli(capsys, "kvasir", raw, out)[0] == 0
    assert not legacy.exists() and not killed.exists()
    assert mine.is_dir() and (out / ".notes.tmp-1").is_dir()


# ------------------------------------------------------------------------------------------
# Issue 15.3: partial downloads, --classes, empty classes
# ------------------------------------------------------------------------------------------

@pytest.fixture()
def partial_mvtec(tmp_path):
    raw = tmp_path / "raw"
    make_raw("mvtec-ad", raw)
    for d in raw.iterdir():
        if d.name not in ("bottle", "grid"):
            shutil.rmtree(d)
    return raw


def test_partial_download_offers_classes_and_records_them(tmp_path, capsys, partial_mvtec):
    rc, _, err = convert_cli(capsys, "mvtec-ad", partial_mvtec, tmp_path / "m")
    line = one_error_line(err)
    assert rc == 2 and "cable" in line and "--classes bottle,grid" in line
    assert not (tmp_path / "m").exists()
    rc, out, _ = convert_cli(capsys, "mvtec-ad", partial_mvtec, tmp_path / "m", "--classes", "bottle,grid")
    assert rc == 0 and "a subset: 2 of 15 classes" in out
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    from zsadx.data.convert.mvtec_style import MVTEC_CLASSES

    coverage = {"classes": ["bottle", "grid"], "catalog_classes": list(MVTEC_CLASSES),
                "missing_classes": [c for c in MVTEC_CLASSES if c not in ("bottle", "grid")], "subset": True}
    assert {k: summary[k] for k in coverage} == coverage
    assert {r.cls for r in read_manifest(tmp_path / "m")} == {"bottle", "grid"}
    assert shard_cli(capsys, tmp_path / "m", tmp_path / "s")[0] == 0
    assert load_index(tmp_path / "s")["datasets"]["mvtec-ad"] == coverage


def test_single_class_and_folder_datasets_are_complete(tmp_path, capsys):
    make_raw("kvasir", tmp_path / "k")
    make_raw("folder", tmp_path / "parts")
    for name, raw in (("kvasir", tmp_path / "k"), ("folder", tmp_path / "parts")):
        assert convert_cli(capsys, name, raw, tmp_path / f"m-{name}")[0] == 0
        summary = json.loads((tmp_path / f"m-{name}" / "summary.json").read_text())
        assert summary["subset"] is False and summary["missing_classes"] == []
        assert summary["catalog_classes"] == summary["classes"]
        assert shard_cli(capsys, tmp_path / f"m-{name}", tmp_path / "s")[0] == 0
    assert load_index(tmp_path / "s")["datasets"]["folder"] == {
        "classes": ["parts"], "catalog_classes": ["parts"], "missing_classes": [], "subset": False}


def test_an_empty_class_folder_is_reported(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_raw("mvtec-ad", raw)
    for p in (raw / "cable").rglob("*"):  # the folders stay, the images are gone
        if p.is_file():
            p.unlink()
    rc, _, err = convert_cli(capsys, "mvtec-ad", raw, tmp_path / "m")
    line = one_error_line(err)
    assert rc == 2 and "without images: cable" in line and "--classes bottle,capsule," in line
    rc, _, err = convert_cli(capsys, "mvtec-ad", raw, tmp_path / "m", "--classes", "bottle,cable")
    assert rc == 2 and "without images: cable" in one_error_line(err)
    rc, _, err = convert_cli(capsys, "mvtec-ad", raw, tmp_path / "m", "--classes", "bottle,gird")
    assert rc == 2 and "did you mean 'grid'" in one_error_line(err)
    assert not (tmp_path / "m").exists()


def test_a_class_whose_images_are_all_unreadable_is_a_problem_not_silence(tmp_path, partial_mvtec):
    from zsadx.data.convert import convert

    for p in (partial_mvtec / "grid").rglob("*.png"):
        p.write_bytes(b"not a png")
    summary = convert("mvtec-ad", partial_mvtec, tmp_path / "m", classes=["bottle", "grid"], progress=False)
    assert summary["classes"] == ["bottle"] and "grid" in summary["missing_classes"]
    assert summary["skipped_by_reason"]["empty class"] == 1


# ------------------------------------------------------------------------------------------
# Issue 15.2: one shard folder for every dataset -- the index merges
# ------------------------------------------------------------------------------------------

def _converted(tmp_path: Path, capsys, name: str, seed: int = 0, classes: str | None = None, n: int = 1) -> Path:
    raw, out = tmp_path / f"raw-{name}-{seed}", tmp_path / f"m-{name}-{seed}"
    make_raw(name, raw, seed=seed, n=n)
    extra = ("--classes", classes) if classes else ()
    assert convert_cli(capsys, name, raw, out, *extra)[0] == 0
    return out


def _entries(index: dict, dataset: str, cls: str | None = None) -> dict[str, str]:
    return {g["group"]: json.dumps(g, indent=1) for g in index["groups"]
            if g["dataset"] == dataset and (cls is None or g["cls"] == cls)}


def _tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.tar")}


def _listed(index: dict) -> set[str]:
    return {s["name"] for g in index["groups"] for s in g["shards"]}


def test_shard_index_merges_datasets_and_replaces_exactly_the_resharded_class(tmp_path, capsys):
    kvasir = _converted(tmp_path, capsys, "kvasir")
    mvtec = _converted(tmp_path, capsys, "mvtec-ad", classes="bottle,grid")
    s = tmp_path / "S"
    assert shard_cli(capsys, kvasir, s)[0] == 0
    first = load_index(s)
    kv_entries, kv_tars = _entries(first, "kvasir"), _tars(s)
    assert shard_cli(capsys, mvtec, s)[0] == 0
    both = load_index(s)
    assert {g["dataset"] for g in both["groups"]} == {"kvasir", "mvtec-ad"}
    assert _entries(both, "kvasir") == kv_entries  # A's index entries byte-identical ...
    assert {k: v for k, v in _tars(s).items() if k in kv_tars} == kv_tars  # ... and its tars
    assert _listed(both) == set(_tars(s))  # no orphaned tars
    assert both["samples"] == len(read_manifest(kvasir)) + len(read_manifest(mvtec))
    # Re-shard one class of B from a new conversion: bottle changes, grid and kvasir stay.
    bottle = _converted(tmp_path, capsys, "mvtec-ad", seed=7, classes="bottle", n=2)
    grid_entries = _entries(both, "mvtec-ad", "grid")
    kept_tars = {k: v for k, v in _tars(s).items() if not k.startswith("mvtec-ad-bottle-")}
    assert shard_cli(capsys, bottle, s)[0] == 0
    third = load_index(s)
    assert _entries(third, "kvasir") == kv_entries and _entries(third, "mvtec-ad", "grid") == grid_entries
    assert {k: v for k, v in _tars(s).items() if k in kept_tars} == kept_tars
    assert _entries(third, "mvtec-ad", "bottle") != _entries(both, "mvtec-ad", "bottle")
    bottle_keys = {k for r in select_shards(s, "mvtec-ad", ["bottle"], None) for k in _keys(r.path)}
    assert bottle_keys == {r.key for r in read_manifest(bottle)}
    assert _listed(third) == set(_tars(s))
    assert third["datasets"]["mvtec-ad"]["classes"] == ["bottle", "grid"]
    # The same command again changes nothing.
    before = files_under(s)
    assert shard_cli(capsys, bottle, s)[0] == 0
    assert files_under(s) == before


def _keys(path: str) -> list[str]:
    return [sample["__key__"] for sample in iter_tar(path)]


def test_resharding_a_class_drops_its_stale_splits(tmp_path, capsys):
    """A class's groups come from one conversion: a variant with other splits leaves none of the old."""
    raw = tmp_path / "raw"
    make_raw("headct", raw, n=2)
    assert convert_cli(capsys, "headct", raw, tmp_path / "dra", "--variant", "dra")[0] == 0
    assert convert_cli(capsys, "headct", raw, tmp_path / "all", "--variant", "all-test")[0] == 0
    s = tmp_path / "S"
    assert shard_cli(capsys, tmp_path / "dra", s)[0] == 0
    assert {g["split"] for g in load_index(s)["groups"]} == {"train", "test"}
    assert shard_cli(capsys, tmp_path / "all", s)[0] == 0
    index = load_index(s)
    assert {g["split"] for g in index["groups"]} == {"test"} and _listed(index) == set(_tars(s))
    assert index["samples"] == len(read_manifest(tmp_path / "all"))


def test_other_settings_than_the_folder_are_refused(tmp_path, capsys):
    kvasir = _converted(tmp_path, capsys, "kvasir")
    liver = _converted(tmp_path, capsys, "bmad-liver")
    s = tmp_path / "S"
    assert shard_cli(capsys, kvasir, s)[0] == 0
    before = files_under(s)
    rc, _, err = run(capsys, "data", "shard", liver, "--out", s, "--size", "48", "--workers", "1")
    line = one_error_line(err)
    assert rc == 2 and str(s) in line and "32 px" in line and "48 px" in line and "--size 32" in line
    assert files_under(s) == before
    # Re-sharding everything the folder holds at the new size is fine.
    assert run(capsys, "data", "shard", kvasir, "--out", s, "--size", "48", "--workers", "1")[0] == 0
    assert load_index(s)["image_size"] == 48


def test_a_second_shard_command_on_a_locked_folder_refuses_naming_the_holder(tmp_path, capsys):
    kvasir = _converted(tmp_path, capsys, "kvasir")
    s = tmp_path / "S"
    assert shard_cli(capsys, kvasir, s)[0] == 0
    liver = _converted(tmp_path, capsys, "bmad-liver")
    before = files_under(s)
    with FolderLock(s, "the shard folder"):  # another `zsadx data shard` writing into S
        rc, _, err = shard_cli(capsys, liver, s)
    line = one_error_line(err)
    assert rc == 2 and f"pid {os.getpid()}" in line and str(s) in line
    assert files_under(s) == before


def test_two_shard_processes_at_once_leave_a_consistent_index(tmp_path, capsys):
    manifests = [_converted(tmp_path, capsys, name) for name in ("kvasir", "bmad-liver", "btad")]
    s = tmp_path / "S"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-m", "zsadx", "data", "shard", str(m), "--out", str(s), "--size",
                               "32", "--workers", "1", "--wait-lock"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for m in manifests]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    index = load_index(s)
    assert {g["dataset"] for g in index["groups"]} == {"kvasir", "bmad-liver", "btad"}
    assert index["samples"] == sum(len(read_manifest(m)) for m in manifests)
    assert _listed(index) == set(_tars(s))


def test_a_starting_writers_ownership_marker_in_flight_is_left_alone(tmp_path):
    """The marker is written before the lock is taken: the lock holder's clean-up must not remove the
    temp file of a writer that is starting (the race behind a rare 'No such file' in the test above);
    that of a writer that died is removed."""
    from zsadx.data.shards import remove_stale_temps
    from zsadx.files import OWNER_FILE

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    s = tmp_path / "S"
    (s / "_progress").mkdir(parents=True)
    live_temp = s / f".{OWNER_FILE}.tmp-{os.getpid()}-0badc0de"
    dead_temp = s / f".{OWNER_FILE}.tmp-{dead}-0badc0de"
    tar_temp = s / f".visa-a-test-00000.tar.tmp-{os.getpid()}-0badc0de"  # tars are written under the lock only
    for p in (live_temp, dead_temp, tar_temp):
        p.write_text("{}")
    assert sorted(remove_stale_temps(s)) == sorted([dead_temp, tar_temp])
    assert live_temp.is_file()


def test_only_tars_zsadx_listed_are_deleted(tmp_path, capsys):
    s = tmp_path / "S"
    assert shard_cli(capsys, _converted(tmp_path, capsys, "kvasir"), s)[0] == 0
    # A user's files in the shard folder, one named like a shard of the group (the old code's glob).
    (s / "kvasir-colon-test-00042.tar").write_bytes(b"mine")
    (s / "notes.txt").write_text("mine")
    assert shard_cli(capsys, _converted(tmp_path, capsys, "kvasir", seed=3, n=2), s)[0] == 0
    assert (s / "kvasir-colon-test-00042.tar").read_bytes() == b"mine" and (s / "notes.txt").is_file()


def test_shard_refuses_a_folder_zsadx_did_not_write(tmp_path, capsys):
    s = tmp_path / "mine"
    s.mkdir()
    (s / "notes.txt").write_text("mine")
    rc, _, err = shard_cli(capsys, _converted(tmp_path, capsys, "kvasir"), s)
    assert rc == 2 and "not written by `zsadx data shard`" in one_error_line(err)
    assert sorted(p.name for p in s.iterdir()) == ["notes.txt"]
    converted = _converted(tmp_path, capsys, "btad")
    rc, _, err = shard_cli(capsys, converted, converted)  # the converted dataset's own folder
    assert rc == 2 and "as 'dataset', not as shards" in one_error_line(err)


# ------------------------------------------------------------------------------------------
# Issue 16.10: names from the index stay inside the shard folder
# ------------------------------------------------------------------------------------------

def test_index_entries_leading_outside_the_folder_are_refused(tmp_path, capsys):
    s = tmp_path / "S"
    assert shard_cli(capsys, _converted(tmp_path, capsys, "kvasir"), s)[0] == 0
    outside = tmp_path / "outside.tar"
    shutil.copy(next(s.glob("*.tar")), outside)
    index = json.loads((s / "index.json").read_text())
    index["groups"][0]["shards"][0]["name"] = "../outside.tar"
    (s / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as err:
        select_shards(s, "kvasir")
    assert "'../outside.tar'" in str(err.value) and "index.json" in str(err.value) and "\n" not in str(err.value)


def test_a_marker_listing_a_file_outside_the_folder_deletes_nothing_there(tmp_path, capsys):
    s = tmp_path / "S"
    assert shard_cli(capsys, _converted(tmp_path, capsys, "kvasir"), s)[0] == 0
    victim = tmp_path / "victim.tar"
    victim.write_bytes(b"precious")
    (marker,) = (s / "_progress").glob("*.json")
    m = json.loads(marker.read_text())
    m["shards"].append({"name": "../victim.tar", "count": 1, "bytes": 8})
    m["keys"] = ["changed"]  # so the group is rewritten and its listed tars deleted
    marker.write_text(json.dumps(m))
    rc, _, err = shard_cli(capsys, _converted(tmp_path, capsys, "kvasir", seed=4), s)
    assert rc == 2 and "../victim.tar" in one_error_line(err)
    assert victim.read_bytes() == b"precious"


def test_hostile_dataset_and_class_names_stay_inside_the_folder(tmp_path, capsys):
    m = _converted(tmp_path, capsys, "kvasir")
    lines = [json.loads(line) for line in (m / "manifest.jsonl").read_text().splitlines()]
    for rec in lines:
        rec["dataset"], rec["cls"] = "../../x", "../evil/.."
    (tmp_path / "hostile.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    s = tmp_path / "deep" / "S"
    assert shard_cli(capsys, tmp_path / "hostile.jsonl", s)[0] == 0
    refs = select_shards(s, "../../x")
    assert refs and all(Path(r.path).resolve().parent == s.resolve() for r in refs)
    assert not list((tmp_path / "deep").glob("*.tar")) and not list(tmp_path.glob("*.tar"))


# ------------------------------------------------------------------------------------------
# Issue 16.12: one-line errors naming the file
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["truncate", "garble", "list"])
def test_a_broken_index_is_one_line_naming_it(tmp_path, capsys, how):
    s = tmp_path / "S"
    assert shard_cli(capsys, _converted(tmp_path, capsys, "btad"), s)[0] == 0
    path = s / "index.json"
    text = path.read_text()
    path.write_text({"truncate": text[: len(text) // 2], "garble": "\x00" + text[1:], "list": "[1, 2]"}[how])
    with pytest.raises(ShardError, match="index.json.*re-run `zsadx data shard"):
        load_index(s)
    rc, _, err = run(capsys, "eval", "--method", "methods/clip-tiny", "--shards", s, "--dataset", "btad",
                     "--out", tmp_path / "e", "method.backbone.image_size=64", "data.num_workers=0")
    line = one_error_line(err)
    assert rc == 2 and str(path) in line and "re-run `zsadx data shard" in line
    # The writer rebuilds a broken index from its progress markers.
    assert shard_cli(capsys, _converted(tmp_path, capsys, "kvasir"), s)[0] == 0
    assert {g["dataset"] for g in load_index(s)["groups"]} == {"btad", "kvasir"}


def test_a_decompression_bomb_is_skipped_by_convert_and_one_line_in_shard(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_raw("btad", raw)
    victim = sorted((raw / "BTech_Dataset_transformed" / "02" / "test" / "ok").iterdir())[0]
    bomb_png(victim)
    rc, out, _ = convert_cli(capsys, "btad", raw, tmp_path / "m")
    assert rc == 0 and f"skipped {victim}: unreadable image: image too large" in out
    assert victim.as_posix() not in {r.image for r in read_manifest(tmp_path / "m")}
    # A manifest whose image became a bomb after conversion: shard says which file, in one line.
    rec = read_manifest(tmp_path / "m")[0]
    bomb_png(Path(rec.image))
    rc, _, err = shard_cli(capsys, tmp_path / "m", tmp_path / "s")
    line = one_error_line(err)
    assert rc == 2 and rec.image in line and "too large" in line


@pytest.mark.parametrize("bad", ["text", "bomb"])
@pytest.mark.parametrize("where", ["--image", "--ref"])
def test_predict_refuses_a_non_image_or_a_bomb_in_one_line(tmp_path, capsys, bad, where):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(good)
    path = tmp_path / "bad.png"
    if bad == "text":
        path.write_text("this is not an image\n")
    else:
        bomb_png(path)
    image, ref = (path, good) if where == "--image" else (good, path)
    rc, _, err = run(capsys, "predict", "--method", "methods/fade-tiny", "--image", image, "--ref", ref)
    line = one_error_line(err)
    assert rc == 2 and str(path) in line
    assert ("not an image file" in line) if bad == "text" else ("too large" in line)


# ------------------------------------------------------------------------------------------
# Issue 15.5: high-bit-depth images are scaled, not clipped
# ------------------------------------------------------------------------------------------

W = 300


def _gradients(folder: Path) -> None:
    x = np.linspace(0.0, 1.0, W)
    g8 = np.tile(np.rint(x * 255).astype(np.uint8), (8, 1))
    g16 = np.tile(np.rint(x * 65535).astype(np.uint16), (8, 1))
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(g8).save(folder / "grad8.png")
    Image.fromarray(g16).save(folder / "grad16.png")
    Image.fromarray(g16).save(folder / "grad16tif.tif")


def test_16_bit_png_and_tiff_give_the_8_bit_pixels_in_shards(tmp_path, capsys):
    raw = tmp_path / "grads"
    _gradients(raw / "normal")
    (raw / "anomalous").mkdir()
    assert Image.open(raw / "normal" / "grad16.png").mode.startswith("I")  # really 16-bit on disk
    shutil.copy(raw / "normal" / "grad8.png", raw / "anomalous" / "a.png")
    assert convert_cli(capsys, "folder", raw, tmp_path / "m")[0] == 0
    for size in ("original", "64"):
        s = tmp_path / f"s-{size}"
        assert run(capsys, "data", "shard", tmp_path / "m", "--out", s, "--size", size, "--workers", "1")[0] == 0
        pixels = {}
        for ref in select_shards(s, "folder"):
            for sample in iter_tar(ref.path):
                pixels[sample["__key__"]] = np.asarray(Image.open(io.BytesIO(sample["img.png"])), dtype=int)
        p8 = pixels["normal/grad8"]
        for key in ("normal/grad16", "normal/grad16tif"):
            assert np.abs(pixels[key] - p8).max() <= 1, key
            assert (pixels[key] == 255).mean() < 0.05  # not clipped to white (was 99.6%)


def test_the_loaders_and_predict_use_the_same_rule(tmp_path):
    _gradients(tmp_path)
    t = EvalTransform(size=W)
    a8, a16 = (t.image(load_image(tmp_path / f"grad{b}.png")) for b in (8, 16))
    std = torch_tensor(t.std).view(3, 1, 1)
    assert float(((a16 - a8) * std).abs().max()) <= 1 / 255 + 1e-6
    from zsadx.predict import read_images

    (im,) = read_images(str(tmp_path / "grad16.png"), [])
    assert np.abs(np.asarray(to_rgb8(im), int) - np.asarray(to_rgb8(load_image(tmp_path / "grad8.png")), int)).max() <= 1


@pytest.mark.parametrize("mode", ["I;16B", "I", "F", "F-unnormalised"])
def test_other_high_bit_modes_are_scaled_by_their_bit_depth(mode):
    x = np.linspace(0.0, 1.0, W)
    want = np.rint(x * 255)
    if mode == "I;16B":
        im = Image.frombytes("I;16B", (W, 1), np.rint(x * 65535).astype(">u2").tobytes())
    elif mode == "I":
        im = Image.fromarray(np.rint(x * 65535).astype(np.int32)[None])
    elif mode == "F":
        im = Image.fromarray(x.astype(np.float32)[None])
    else:
        im = Image.fromarray((x * 65535).astype(np.float32)[None])
    assert im.mode == mode.split("-")[0]
    got = np.asarray(to_rgb8(im), int)[0, :, 0]
    assert np.abs(got - want).max() <= 1


def torch_tensor(values):
    import torch

    return torch.tensor(values)


def test_tars_listed_in_the_index_are_the_tars_written(tmp_path, capsys):
    """Temp names of a killed shard run are removed by the next run, never listed."""
    s = tmp_path / "S"
    m = _converted(tmp_path, capsys, "kvasir")
    assert shard_cli(capsys, m, s)[0] == 0
    (s / ".kvasir-colon-test-00000.tar.tmp-123-abcd1234").write_bytes(b"half")
    (s / "kvasir-colon-test-00000.tar.tmp").write_bytes(b"half, older zsadx")
    assert shard_cli(capsys, _converted(tmp_path, capsys, "kvasir", seed=2), s)[0] == 0
    assert not [p for p in s.iterdir() if ".tmp" in p.name]
    with tarfile.open(next(s.glob("*.tar"))) as tar:
        assert tar.getmembers()


def test_an_interrupted_reshard_keeps_the_other_datasets_readable_and_resumes(tmp_path, capsys, monkeypatch):
    from zsadx.data import shards as mod

    s = tmp_path / "S"
    kvasir, btad = _converted(tmp_path, capsys, "kvasir"), _converted(tmp_path, capsys, "btad")
    write_shards(kvasir / "manifest.jsonl", s, size=32, progress=False, workers=1)
    kv_refs = select_shards(s, "kvasir")
    real, calls = mod._add, {"n": 0}

    def dying_add(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed in the middle of btad's groups
        return real(*a, **k)

    monkeypatch.setattr(mod, "_add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        write_shards(btad / "manifest.jsonl", s, size=32, progress=False, workers=1)
    monkeypatch.setattr(mod, "_add", real)
    assert select_shards(s, "kvasir") == kv_refs  # still readable while btad is unfinished
    with pytest.raises(ShardError, match="btad/.*interrupted: .*run the same command again"):
        select_shards(s, "btad")
    index = write_shards(btad / "manifest.jsonl", s, size=32, progress=False, workers=1)
    assert "pending" not in index and {g["dataset"] for g in index["groups"]} == {"kvasir", "btad"}
    assert _listed(index) == set(_tars(s)) and not [p for p in s.iterdir() if ".tmp" in p.name]
