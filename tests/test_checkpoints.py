"""Checkpoints you can trust (issue 16.1-16.5, 16.12, 15.7): safe loading, manifests and fallback,
honest resumes, checkpoint identity, one run per folder, one log per run.

Real runs of the tiny AnomalyCLIP through ``python -m zsadx.train`` (the CLI: errors are one line
with exit code 2), real files damaged as a disk, a kill or an attacker would leave them.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_shards, run_checked, subprocess_env
from zsadx.config import ConfigError, load_config, load_yaml
from zsadx.models.checkpoints import CheckpointError, save_method_checkpoint
from zsadx.training import checkpoint as ckpt

pytestmark = pytest.mark.slow

RUN_ARGS = ("data.batch_size=2", "max_steps=4", "checkpoint_every=2", "log_every=1", "progress=false")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("ckpt"), {"mvtec-ad": 2})


def train_cmd(shards: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "zsadx.train", "--config", "train/anomalyclip-tiny",
            f"data.sources=[{{shards: {shards}, dataset: mvtec-ad}}]", f"out_dir={out}", *RUN_ARGS, *overrides]


def train(shards: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(shards, out, *overrides), capture_output=True, text=True, timeout=600,
                          env=subprocess_env(), cwd=REPO)


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A finished run: checkpoints at steps 2 and 4, final.pt, a log of steps 1..4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_checked(train_cmd(shards, out))
    return out


def copy_run(src: Path, dst: Path, keep_final: bool = True) -> Path:
    shutil.copytree(src, dst)
    (dst / ".zsadx-train.lock").unlink(missing_ok=True)
    if not keep_final:
        (dst / "final.pt").unlink()
    return dst


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error the CLI prints (exit 2), asserting there is exactly one and no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("zsadx train: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def state_of(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["state"] if "state" in obj else obj["method"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = state_of(a), state_of(b)
    assert wa.keys() == wb.keys()
    for k in wa:  # one process, same code path: the same float operations in the same order
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0, msg=lambda m: f"{k}: {m}")


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".zsadx-train.lock"}


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for any command a crafted file runs)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_payload(path: Path, marker: Path) -> None:
    torch.save({"format": "zsadx-trainer/1", "x": _Payload(marker)}, path)


# ------------------------------------------------------------------------------------------
# 16.1: nothing zsadx loads is unpickled beyond tensors and plain values
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["trainer.pt", "rng-rank0.pt"])
def test_resume_refuses_a_pickle_payload_naming_the_file(shards, finished, tmp_path, name):
    out = copy_run(finished, tmp_path / "run", keep_final=False)
    step = out / "checkpoints" / "step-00000004"
    marker = tmp_path / "payload-ran"
    plant_payload(step / name, marker)
    ckpt.write_manifest(step, 4)  # the attacker rewrites the manifest too: verification cannot help
    line = error_line(train(shards, out, "resume=latest"))
    assert str(step / name) in line and "never unpickles" in line
    assert not marker.exists()


@pytest.mark.parametrize("where", ["final.pt", "downloaded.pt"])
def test_eval_refuses_a_pickle_payload_naming_the_file(shards, finished, tmp_path, capsys, where):
    from zsadx.cli import main

    out = copy_run(finished, tmp_path / "run")
    file = out / where
    marker = tmp_path / "payload-ran"
    plant_payload(file, marker)
    rc = main(["eval", "--method", str(out / "method.yaml"), "--checkpoint", str(file), "--shards", str(shards),
               "--dataset", "mvtec-ad", "--out", str(tmp_path / "eval"), "data.num_workers=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(file) in err[0], err
    assert not marker.exists()


def test_every_file_a_run_writes_loads_with_weights_only(finished):
    for f in [finished / "final.pt", *finished.glob("checkpoints/step-*/*.pt")]:
        assert isinstance(torch.load(f, map_location="cpu", weights_only=True), dict), f


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    import random

    import numpy as np

    random.random(), np.random.randn(), torch.randn(1)  # noqa: B018 - move every generator off its seed
    np.random.randn()  # numpy's cached Gaussian (has_gauss) is part of the state too
    ckpt.save_rng(tmp_path, 0)
    expected = (random.random(), np.random.randn(3).tolist(), torch.randn(3))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    ckpt.load_rng(tmp_path, 0, fallback={})
    got = (random.random(), np.random.randn(3).tolist(), torch.randn(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


# ------------------------------------------------------------------------------------------
# 16.2: a damaged newest checkpoint is skipped (with a warning naming it); none -> one line
# ------------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"trainer.pt truncated": ("trainer.pt", _truncate),
          "trainer.pt garbage": ("trainer.pt", lambda p: p.write_bytes(b"\x00garbage" * 1000)),
          "rng-rank0.pt truncated": ("rng-rank0.pt", _truncate)}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_takes_the_newest_checkpoint_that_verifies(shards, finished, tmp_path, damage):
    out = copy_run(finished, tmp_path / "run", keep_final=False)
    name, spoil = DAMAGE[damage]
    spoil(out / "checkpoints" / "step-00000004" / name)
    # A full disk or a kill during the next checkpoint left a half-written step folder behind.
    half = out / "checkpoints" / "step-00000006.tmp"
    half.mkdir()
    (half / "trainer.pt").write_bytes(b"half")
    proc = train(shards, out, "resume=latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping checkpoint" in proc.stderr and "step-00000004" in proc.stderr
    assert_same_weights(finished / "final.pt", out / "final.pt")  # resumed from step 2, same result
    assert not half.exists() and ckpt.verify(out / "checkpoints" / "step-00000004") is None


def test_resume_with_no_checkpoint_that_verifies_is_one_line(shards, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run", keep_final=False)
    for step in ckpt.list_checkpoints(out):
        _truncate(step / "trainer.pt")
    line = error_line(train(shards, out, "resume=latest"))
    assert "no checkpoint verifies" in line and "step-00000002" in line and "overwrite=true" in line


def test_a_full_disk_is_one_line_naming_the_path_and_leaves_no_half_checkpoint(shards, tmp_path):
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {tmp_path}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs `unshare -rm` and tmpfs mounts (user namespaces) for a real full disk")
    disk = tmp_path / "disk"
    disk.mkdir()
    # 32 KiB: room for the config and the log, not for the first checkpoint (~50 KB).
    cmd = " ".join(f"'{a}'" for a in train_cmd(shards, disk / "run"))
    script = (f"mount -t tmpfs -o size=32k tmpfs {disk} && {cmd}; echo rc=$?; "
              f"find {disk} -name '*.tmp*'; echo listed")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env=subprocess_env(), cwd=REPO)
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("zsadx train: error:")]
    assert len(lines) == 1 and "no space left" in lines[0], proc.stderr
    assert str(disk / "run" / "checkpoints" / "step-00000002.tmp" / "rng-rank0.pt") in lines[0]  # the file
    assert proc.stdout.split("rc=2")[1].split("listed")[0].strip() == ""  # no step-N.tmp, no temp file left


# ------------------------------------------------------------------------------------------
# 16.3: a resume continues the same run; config.yaml is the config that ran
# ------------------------------------------------------------------------------------------

def test_resume_with_a_changed_learning_rate_is_refused(shards, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = (out / "config.yaml").read_bytes()
    line = error_line(train(shards, out, "resume=latest", "optim.lr=0.5", "data.shuffle_buffer=3"))
    assert "(data.shuffle_buffer, optim.lr)" in line and "cannot change" in line
    assert (out / "config.yaml").read_bytes() == before
    line = error_line(train(shards, out, "resume=latest", "data.shuffle_buffer=3"))
    assert "(data.shuffle_buffer)" in line and "resume_allow" in line


def test_resume_may_train_longer_and_records_it(shards, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    run_checked(train_cmd(shards, out, "resume=latest", "max_steps=6"))
    cfg = load_yaml(out / "config.yaml")
    assert cfg["max_steps"] == 6 and cfg["optim"]["lr"] == pytest.approx(1e-3)
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "run.json").read_text())["steps"] == 6


# ------------------------------------------------------------------------------------------
# 16.4 / 16.5 / 16.12: eval with any checkpoint; identity checked; one line for a bad one
# ------------------------------------------------------------------------------------------

def method_from(yaml_path: Path | str, *overrides: str):
    from zsadx.eval.evaluator import EvalConfig
    from zsadx.models.methods.base import build_method

    cfg = load_config(EvalConfig, data={"method": load_yaml(yaml_path), "data": {"shards": "-", "dataset": "-"}},
                      overrides=list(overrides))
    return build_method(cfg.method)


def test_a_training_checkpoint_loads_for_evaluation(shards, finished, tmp_path):
    from zsadx.cli import main

    step = finished / "checkpoints" / "step-00000002"
    expected = state_of(step / "trainer.pt")
    for given in (step, step / "trainer.pt"):
        m = method_from(finished / "method.yaml")
        m.load_checkpoint(str(given))
        assert all(torch.equal(m.trainable_state_dict()[k], v) for k, v in expected.items())
    for given in (step, step / "trainer.pt"):  # the unpickling error of issue 16.4 came through here
        assert main(["eval", "--method", str(finished / "method.yaml"), "--checkpoint", str(given),
                     "--shards", str(shards), "--dataset", "mvtec-ad", "--out", str(tmp_path / "eval"),
                     "data.num_workers=0"]) == 0


def test_checkpoints_record_method_backbone_and_trainable_keys(finished):
    final = torch.load(finished / "final.pt", map_location="cpu", weights_only=True)
    trainer = torch.load(finished / "checkpoints" / "step-00000004" / "trainer.pt", weights_only=True)
    for identity in (final, trainer["identity"]):
        assert identity["method"] == "anomalyclip"
        bb = identity["backbone"]
        assert (bb["name"], bb["pretrained"], bb["init_seed"], bb["image_size"]) == ("zsadx-tiny-p16", None, 0, 64)
        assert (bb["width"], bb["text_width"], bb["layers"], bb["patch_size"]) == (64, 64, 4, 16)
        assert identity["trainable_keys"] == sorted(final["state"])


@pytest.mark.parametrize("other", ["faprompt", "backbone p14", "backbone init_seed"])
def test_a_checkpoint_of_another_method_or_backbone_is_one_line_naming_both(tmp_path, other):
    trained = method_from("methods/anomalyclip-tiny")
    file = save_method_checkpoint(trained, tmp_path / "final.pt")
    target = {"faprompt": lambda: method_from("methods/faprompt-tiny"),
              # Same text width (64): the prompts fit, and a plain load_state_dict succeeded silently.
              "backbone p14": lambda: method_from("methods/anomalyclip-tiny", "method.backbone.name=zsadx-tiny-p14",
                                                  "method.backbone.image_size=56"),
              "backbone init_seed": lambda: method_from("methods/anomalyclip-tiny", "method.backbone.init_seed=1")}
    with pytest.raises(CheckpointError) as err:
        target[other]().load_checkpoint(str(file))
    msg = str(err.value)
    assert "\n" not in msg and str(file) in msg and "method 'anomalyclip' on backbone zsadx-tiny-p16" in msg
    expected = {"faprompt": "method 'faprompt'", "backbone p14": "zsadx-tiny-p14", "backbone init_seed": "init_seed 1"}
    assert expected[other] in msg.split("but this is")[1]


def test_a_wrong_or_truncated_checkpoint_through_the_cli_is_one_line(shards, finished, tmp_path, capsys):
    from zsadx.cli import main

    truncated = tmp_path / "final.pt"
    truncated.write_bytes((finished / "final.pt").read_bytes()[:1000])
    for method, file in [(str(finished / "method.yaml"), truncated), ("methods/faprompt-tiny", finished / "final.pt")]:
        rc = main(["eval", "--method", method, "--checkpoint", str(file), "--shards", str(shards),
                   "--dataset", "mvtec-ad", "--out", str(tmp_path / "eval"), "data.num_workers=0"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and str(file) in err[0], err


def test_a_plain_state_dict_of_an_older_zsadx_loads_with_a_warning(tmp_path, caplog):
    trained = method_from("methods/anomalyclip-tiny")
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(1.0)
    torch.save(trained.trainable_state_dict(), tmp_path / "old.pt")
    m = method_from("methods/anomalyclip-tiny")
    m.load_checkpoint(str(tmp_path / "old.pt"))
    assert all(torch.equal(v, trained.trainable_state_dict()[k]) for k, v in m.trainable_state_dict().items())
    assert "plain state dict" in caplog.text


def test_values_that_would_fail_later_fail_at_validation_naming_the_key(shards):
    from zsadx.training.config import TrainConfig

    src = f"data.sources=[{{shards: {shards}, dataset: mvtec-ad}}]"
    cases = {"method.backbone.image_size=65": "'backbone.image_size': 65 is not a multiple of zsadx-tiny-p16's "
                                              "patch size 16",
             "method.input_size=70": "'method.input_size': 70 is not a multiple",
             "method.sigma=.nan": "'method.sigma'", "method.sigma=-1": "'method.sigma'",
             "method.shots=-1": "'method.shots'", "data.batch_size=0": "'data.batch_size'",
             "log_every=0": "'log_every'", "optim.lr=0": "'optim.lr'",
             "resume_allow=[optim.lr]": "'resume_allow[0]': optim.lr cannot change",
             "resume_allow=[max_step]": "did you mean 'max_steps'"}
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
            load_config(TrainConfig, "train/anomalyclip-tiny", overrides=[src, override])


# ------------------------------------------------------------------------------------------
# 15.7: one run per folder, one log per run
# ------------------------------------------------------------------------------------------

def test_resume_after_a_kill_logs_every_step_once(shards, finished, tmp_path):
    # As killed just before the step-4 checkpoint: the log holds steps 1..4 (and half a line), the
    # newest checkpoint is step 2.
    out = copy_run(finished, tmp_path / "run", keep_final=False)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 5, "ep')
    run_checked(train_cmd(shards, out, "resume=latest"))
    assert logged_steps(out) == [1, 2, 3, 4]
    assert_same_weights(finished / "final.pt", out / "final.pt")


def test_a_second_train_into_a_run_folder_is_refused_without_resume(shards, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = snapshot(out)
    line = error_line(train(shards, out))
    assert str(out) in line and "resume=latest" in line and "overwrite=true" in line
    assert snapshot(out) == before
    # A killed run (checkpoints, no final.pt) is refused too: starting over would mix two logs.
    (out / "final.pt").unlink()
    assert "checkpoints" in error_line(train(shards, out))
    # A finished run without checkpoints is not silently retrained by resume=latest either.
    other = copy_run(finished, tmp_path / "other")
    shutil.rmtree(other / "checkpoints")
    assert "no checkpoint to resume from" in error_line(train(shards, other, "resume=latest"))


def test_resume_of_a_finished_run_changes_nothing(shards, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = snapshot(out)
    proc = run_checked(train_cmd(shards, out, "resume=latest"))
    assert json.loads(proc.stdout)["already_finished"] is True
    assert snapshot(out) == before


def test_overwrite_starts_the_run_over(shards, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    run_checked(train_cmd(shards, out, "overwrite=true", "max_steps=2"))
    assert logged_steps(out) == [1, 2]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is deleted
