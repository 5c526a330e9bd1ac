"""Shared fixtures: a tiny random CLIP and its checkpoint files, written once per session."""
from __future__ import annotations

import logging

import pytest
import torch

from zsadx.models.backbone import BackboneConfig, ClipBackbone

logging.getLogger().setLevel(logging.WARNING)

TINY = BackboneConfig(name="zsadx-tiny-p16", pretrained=None, image_size=224)


@pytest.fixture(scope="session")
def tiny_backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return ClipBackbone(TINY)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory, tiny_backbone):
    """The tiny model's weights in the file formats users have: open_clip, OpenAI state dict and JIT."""
    folder = tmp_path_factory.mktemp("weights")
    model = tiny_backbone.clip
    sd = tiny_backbone.clip_state_dict()
    files = {"open_clip": folder / "open_clip.pt", "openai_sd": folder / "openai_fp16.pt",
             "openai_jit": folder / "openai_jit.pt", "ddp": folder / "ddp.pt"}
    torch.save(sd, files["open_clip"])
    # OpenAI's plain state dicts are fp16 and carry three scalar extras.
    openai_sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    openai_sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                     vocab_size=torch.tensor(49408))
    torch.save(openai_sd, files["openai_sd"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, files["ddp"])
    traced = torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 224, 224)}, check_trace=False)
    traced.save(str(files["openai_jit"]))
    return files


# ----------------------------------------------------------------------------------------------
# Helpers for tests that start real processes (accelerate launch, the trainer)
# ----------------------------------------------------------------------------------------------
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(nproc: int, module: str, *args: str, accelerate_config: str | None = None) -> list[str]:
    """A python -m command, under ``accelerate launch`` with ``nproc`` CPU processes when nproc > 1."""
    if nproc == 1 and accelerate_config is None:
        return [sys.executable, "-m", module, *args]
    cfg = accelerate_config or "ddp-cpu-2"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / f"{cfg}.yaml"), "--num_processes", str(nproc),
            "--main_process_port", str(free_port()), "-m", module, *args]


def subprocess_env() -> dict:
    # One thread per process: two ranks on 2 cores, and bitwise-reproducible CPU kernels.
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
            "TOKENIZERS_PARALLELISM": "false"}


def run_checked(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def make_shards(root: Path, datasets: dict[str, int], size: int = 96, seed: int = 1) -> Path:
    """Synthetic downloads of ``datasets`` ({name: n}) -> manifests -> one shard folder."""
    from zsadx.data.convert import convert
    from zsadx.data.shards import write_shards
    from zsadx.data.synthetic import make_raw

    manifests = []
    for name, n in datasets.items():
        make_raw(name, root / "raw" / name, seed=seed, n=n)
        convert(name, root / "raw" / name, root / "manifests" / name, progress=False)
        manifests.append((root / "manifests" / name / "manifest.jsonl").read_text())
    (root / "manifest.jsonl").write_text("".join(manifests))
    write_shards(root / "manifest.jsonl", root / "shards", size=size, progress=False)
    return root / "shards"


@pytest.fixture
def full_disk(tmp_path):
    """A real 256 KiB tmpfs (root can mount one): writes past its size fail with ENOSPC."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``zsadx ARGV`` in this process: (exit code, stdout, stderr)."""
    from zsadx.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error_line(err: str) -> str:
    """The one line a terminal shows (what a progress bar overwrote with '\\r' is gone)."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("zsadx ") and ": error: " in lines[0]
    return lines[0]
