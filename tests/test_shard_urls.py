"""Issue 20 item 5: shard roots as URLs. A real HTTP server on 127.0.0.1 serves a shard folder (and a
``pipe:`` command reads it): `zsadx eval` gives the same results as from the folder itself; broken
servers, missing files and hostile index entries are one line naming the URL."""
from __future__ import annotations

import functools
import json
import shutil
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import free_port, make_shards, one_error_line, run_cli
from zsadx.data.loaders import EvalShards, MixtureSource, TrainMixture
from zsadx.data.shards import ShardError, load_index, select_shards
from zsadx.data.transforms import EvalTransform
from zsadx.errors import UnsafePathError
from zsadx.eval.evaluator import TIMING_KEYS

DATASET = "mvtec-ad"
CLASSES = ["bottle", "cable"]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines in the test output
        pass


class TruncatingHandler(QuietHandler):
    """Announces each tar's full length, sends half of it and hangs up: a transfer cut short."""

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if path.suffix != ".tar":
            return super().do_GET()
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("urls"), {DATASET: 2}, size=48)


@pytest.fixture(scope="module")
def served(shards):
    """(server root URL, handler swap): the shard folder's parent served over HTTP on 127.0.0.1."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(shards.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def serve(folder: Path, handler=QuietHandler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def results_of(out: Path) -> dict:
    """The one results file under ``out``, without this run's timings and its config (which names
    the shard root, the one thing the runs differ in)."""
    files = [p for p in out.glob("*.json")]
    assert len(files) == 1, files
    results = json.loads(files[0].read_text())
    return {k: v for k, v in results.items() if k not in TIMING_KEYS and k != "config"}


def eval_argv(root: str, out: Path, method: str = "methods/clip-tiny", *over: str) -> list[str]:
    return ["eval", "--method", method, "--shards", root, "--dataset", DATASET, "--classes", *CLASSES,
            "--out", str(out), "data.num_workers=0", "data.batch_size=4", "save_scores=true", *over]


@pytest.mark.parametrize("method,over", [("methods/clip-tiny", ()), ("methods/winclip-tiny", ("method.shots=1",))],
                         ids=["zero-shot", "few-shot"])
def test_eval_from_http_and_pipe_equals_the_folder(shards, served, tmp_path, capsys, method, over):
    """Zero-shot, and few-shot (its references come through the URL too): the same results file."""
    roots = {"folder": str(shards), "http": f"{served}/{shards.name}", "pipe": f"pipe:cat {shards}/{{name}}"}
    got = {}
    for kind, root in roots.items():
        rc, _, err = run_cli(capsys, *eval_argv(root, tmp_path / kind, method, *over))
        assert rc == 0, err
        got[kind] = results_of(tmp_path / kind)
    assert got["folder"]["images"] > 0 and len(got["folder"]["scores"]) == got["folder"]["images"]
    assert got["http"] == got["folder"] == got["pipe"]


def test_index_and_slices_from_a_url_with_workers(shards, served):
    """The remote index equals the local one, and each sample comes once across two workers x two
    ranks (zsadx's slicing by index counts, unchanged for URLs)."""
    url = f"{served}/{shards.name}"
    assert load_index(url) == load_index(shards)
    assert all(r.path.startswith(url + "/") for r in select_shards(url, DATASET, CLASSES))
    keys = []
    for rank in range(2):
        ds = EvalShards(url, DATASET, CLASSES, transform=EvalTransform(size=48), rank=rank, world_size=2)
        keys += [k for b in DataLoader(ds, batch_size=3, num_workers=2) for k in b["key"]]
    local = [k for b in DataLoader(EvalShards(shards, DATASET, CLASSES, transform=EvalTransform(size=48)),
                                   batch_size=3) for k in b["key"]]
    assert sorted(keys) == sorted(local) and len(set(keys)) == len(keys) > 0


def test_training_mixture_from_a_url_draws_the_same_batches(shards, served):
    def batches(root):
        ds = TrainMixture([MixtureSource(root, DATASET, "test", CLASSES)], batch_size=4, batches_per_epoch=3,
                          transform=EvalTransform(size=48), seed=3, shuffle_buffer=8, rank=0, world_size=1)
        return list(ds)

    local, remote = batches(str(shards)), batches(f"{served}/{shards.name}")
    for a, b in zip(local, remote, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_a_missing_folder_is_one_line_naming_the_url(served, tmp_path, capsys):
    url = f"{served}/no-such-folder"
    rc, _, err = run_cli(capsys, *eval_argv(url, tmp_path / "e"))
    line = one_error_line(err)
    assert rc == 2 and f"{url}/index.json" in line and "HTTP error" in line and "404" in line


def test_a_refused_connection_is_one_line_naming_the_url(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/shards"  # nothing listens there
    rc, _, err = run_cli(capsys, *eval_argv(url, tmp_path / "e"))
    line = one_error_line(err)
    assert rc == 2 and f"{url}/index.json" in line and "connection refused" in line


def test_a_transfer_cut_short_is_one_line_naming_the_tar(shards, tmp_path, capsys):
    server, root = serve(shards.parent, TruncatingHandler)
    try:
        url = f"{root}/{shards.name}"
        rc, _, err = run_cli(capsys, *eval_argv(url, tmp_path / "e"))
        line = one_error_line(err)
        tar = select_shards(url, DATASET, CLASSES)[0].path
        assert rc == 2 and tar in line and "truncated" in line
        assert not list((tmp_path / "e").glob("*.json"))  # no results file from half the data
    finally:
        server.shutdown()
        server.server_close()


def test_a_failing_pipe_command_is_one_line_naming_it(shards, tmp_path, capsys):
    root = f"pipe:cat {tmp_path}/gone/{{name}}"
    rc, _, err = run_cli(capsys, *eval_argv(root, tmp_path / "e"))
    line = one_error_line(err)
    assert rc == 2 and f"cat {tmp_path}/gone/index.json" in line and "exit status 1" in line
    rc, _, err = run_cli(capsys, *eval_argv(f"pipe:cat {shards}/index.json", tmp_path / "e"))
    assert rc == 2 and "needs '{name}'" in one_error_line(err)


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/x.tar", "x.tar; touch pwned", ".."])
def test_shard_names_from_a_remote_index_are_checked(shards, tmp_path, name):
    """A served index naming a file outside the folder, or shell syntax for a pipe: root, is refused
    before anything is fetched or run."""
    copy = tmp_path / "served"
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    index["groups"][0]["shards"][0]["name"] = name
    (copy / "index.json").write_text(json.dumps(index))
    server, root = serve(tmp_path)
    try:
        for url in (f"{root}/served", f"pipe:cd {tmp_path} && cat served/{{name}}"):
            with pytest.raises(UnsafePathError, match="not a plain file name"):
                select_shards(url, index["groups"][0]["dataset"])
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "pwned").exists()


def test_a_garbled_remote_tar_names_the_url(shards, tmp_path):
    """A broken header ends the tar early (its sample is left incomplete): an error naming the command."""
    copy = tmp_path / "served"
    shutil.copytree(shards, copy)
    ref = select_shards(copy, DATASET, CLASSES)[0]
    with tarfile.open(ref.path) as tar:
        third = tar.getmembers()[2].offset
    data = bytearray(Path(ref.path).read_bytes())
    data[third:third + 512] = b"\xff" * 512  # a broken header after the first sample's members
    Path(ref.path).write_bytes(bytes(data))
    url = f"pipe:cat {copy}/{{name}}"
    remote = select_shards(url, DATASET, CLASSES)[0].path
    with pytest.raises(ShardError, match="corrupt sample|truncated shard") as info:
        list(EvalShards(url, DATASET, CLASSES, transform=EvalTransform(size=48)))
    assert str(info.value).startswith(remote)


def test_shards_are_not_written_to_a_url(shards, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "data", "shard", shards.parent / "manifest.jsonl", "--out", "http://127.0.0.1:9/s")
    assert rc == 2 and "written to a local folder" in one_error_line(err)
    assert not Path("http:").exists()


def test_pipe_roots_honour_webdatasets_security_switch(shards, monkeypatch):
    """WDS_SECURE=1 (webdataset's switch: no commands from URLs) turns pipe: roots off, by name."""
    from webdataset import utils as wds_utils

    monkeypatch.setattr(wds_utils, "enforce_security", True)
    with pytest.raises(ShardError, match="WDS_SECURE=1"):
        load_index(f"pipe:cat {shards}/{{name}}")
