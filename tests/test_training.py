"""The trainer: real processes (accelerate launch, DeepSpeed ZeRO-2, signals), tiny AnomalyCLIP."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, launch_cmd, make_shards, run_checked, subprocess_env
from zsadx.config import ConfigError, load_config
from zsadx.training.config import TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # Auxiliary data (MVTec-style) and a held-out target (VisA-style) in one shard folder.
    return make_shards(tmp_path_factory.mktemp("train"), {"mvtec-ad": 2, "visa": 1})


def train_args(shards: Path, out: Path, *overrides: str, method: str = "anomalyclip") -> list[str]:
    return ["--config", f"train/{method}-tiny", f"data.sources=[{{shards: {shards}, dataset: mvtec-ad}}]",
            f"out_dir={out}", "progress=false", "log_every=1", *overrides]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The trainable state in final.pt (which also records the method and backbone it is for)."""
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


def assert_same(a: dict, b: dict, atol: float = 0.0, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


# 1 vs 2 processes sum the same gradients in another order (DDP's all-reduce, other per-rank
# batches): float32 sums differ in the last bits, and Adam's normalised update turns that into a
# relative weight difference of ~1e-6 (measured up to 1.4e-5 absolute on one ACD-CLIP element on
# another CPU). rtol 1e-4 + atol 1e-5 bounds that, machine-independently; a 1% change of a tensor
# is 100x the bound and must fail (checked below, on the same weights).
PROCESS_COUNT_TOL = {"rtol": 1e-4, "atol": 1e-5}


def read_log(out: Path) -> list[dict]:
    f = out / "train_log.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


@pytest.mark.parametrize("method", ["anomalyclip", "faprompt", "adaclip", "acdclip"])
def test_two_processes_train_the_weights_of_one(shards, tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    run_checked(launch_cmd(1, "zsadx.train", *train_args(shards, one, "data.batch_size=4", "max_steps=4", method=method)))
    run_checked(launch_cmd(2, "zsadx.train", *train_args(shards, two, "data.batch_size=2", "max_steps=4", method=method)))
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    # Same global batches (the mixture's global mode), gradients averaged by DDP: same trajectory.
    assert [r["loss"] for r in read_log(one)] == pytest.approx([r["loss"] for r in read_log(two)], rel=1e-4)
    w1, w2 = weights(one / "final.pt"), weights(two / "final.pt")
    assert_same(w1, w2, **PROCESS_COUNT_TOL)
    with pytest.raises(AssertionError):  # the tolerance still catches a real divergence
        assert_same(w1, {k: v * 1.01 if v.is_floating_point() else v for k, v in w2.items()}, **PROCESS_COUNT_TOL)


# Expected DeepSpeed module-state prefixes: trainable modules only, never the backbone.
TRAINABLE_PREFIXES = {"anomalyclip": ("prompts.",),
                      "acdclip": ("image_adapters.", "image_blends.", "seg_heads.", "det_heads.", "gateway.",
                                  "text_adapters.", "text_blends.", "text_norms.")}


@pytest.mark.parametrize("method", list(TRAINABLE_PREFIXES))
def test_deepspeed_zero2_runs_and_resumes_exactly(shards, tmp_path, method):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ("data.batch_size=2", "max_steps=6", "checkpoint_every=3", "data.batches_per_epoch=4")
    run_checked(launch_cmd(2, "zsadx.train", *train_args(shards, full, *args, method=method),
                           accelerate_config="zero2"))
    ds = full / "checkpoints" / "step-00000003" / "ds"
    assert sorted(p.name for p in ds.iterdir()) == ["mp_rank_00_model_states.pt",
                                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    module = torch.load(ds / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]  # DeepSpeed's own file, from this run
    assert module and all(k.startswith(TRAINABLE_PREFIXES[method]) for k in module), list(module)[:5]
    # Cut the run back to its step-3 checkpoint, as if killed just after it, and resume.
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    (cut / "final.pt").unlink()
    run_checked(launch_cmd(2, "zsadx.train", *train_args(shards, cut, *args, "resume=latest", method=method),
                           accelerate_config="zero2"))
    assert_same(weights(full / "final.pt"), weights(cut / "final.pt"))


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            cwd=REPO)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        logged = read_log(out)
        if logged and logged[-1]["step"] >= step:
            assert proc.poll() is None, "the run ended before it could be interrupted: make it longer"
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_checked(launch_cmd(1, "zsadx.train", *train_args(shards, out, *INTERRUPT_ARGS)))
    return out


# Workers on: the data position of a resumed run must not depend on what the workers had prefetched.
INTERRUPT_ARGS = ("data.batch_size=4", "epochs=100", "max_steps=60", "checkpoint_every=5", "data.num_workers=1")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGUSR1", "SIGUSR2"])
def test_killed_and_resumed_equals_uninterrupted(shards, uninterrupted, tmp_path, how):
    out = tmp_path / "run"
    proc = _start(launch_cmd(1, "zsadx.train", *train_args(shards, out, *INTERRUPT_ARGS, "resume=latest")))
    _wait_for_step(proc, out, 12)
    proc.send_signal(getattr(signal, how))
    rc = proc.wait(timeout=120)
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    state = torch.load(last / "trainer.pt", map_location="cpu", weights_only=True)
    if how == "SIGKILL":
        assert rc == -signal.SIGKILL
        assert state["reason"] == "periodic"
    else:  # pre-emption: a checkpoint at the step it stopped, then exit 128 + signal
        assert rc == 128 + getattr(signal, how), proc.stderr.read()[-3000:]
        assert state["reason"] == f"signal {int(getattr(signal, how))}"
        assert state["step"] == read_log(out)[-1]["step"] >= 12
        assert not (out / "final.pt").exists()
    assert not list((out / "checkpoints").glob("*.tmp"))
    run_checked(launch_cmd(1, "zsadx.train", *train_args(shards, out, *INTERRUPT_ARGS, "resume=latest")))
    assert_same(weights(uninterrupted / "final.pt"), weights(out / "final.pt"))
    assert json.loads((out / "run.json").read_text())["steps"] == 60
    assert [r["step"] for r in read_log(out)] == list(range(1, 61))  # one run: no step logged twice


def test_checkpoints_hold_only_trainable_state(uninterrupted):
    from zsadx.models.methods.base import build_method

    cfg = load_config(TrainConfig, uninterrupted / "config.yaml")
    method = build_method(cfg.method)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in method.trainable_parameters())
    ckpts = sorted((uninterrupted / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-00000050", "step-00000055", "step-00000060"]  # keep_checkpoints: 3
    state = torch.load(ckpts[-1] / "trainer.pt", map_location="cpu", weights_only=True)
    assert set(state["method"]) == trainable and not any("backbone" in k for k in state["method"])
    assert set(weights(uninterrupted / "final.pt")) == trainable
    # Adam's two moments for the trainable parameters only, never for the frozen CLIP.
    moments = sum(v.numel() for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step")
    assert moments == 2 * n_trainable
    assert {"rng", "scheduler", "epoch", "batch_in_epoch", "step", "code_version", "config"} <= set(state)
    assert n_trainable < 0.01 * sum(p.numel() for p in method.backbone.parameters())


# Steps that make each tiny method learn on synthetic MVTec-style data (measured pixel AUROC on the
# held-out VisA-style set, untrained -> trained): AnomalyCLIP 0.49 -> 0.95, FAPrompt 0.55 -> 0.96,
# AdaCLIP 0.51 -> 0.99 (300 steps; the test runs fewer for AdaCLIP, whose step re-encodes 48 prompts
# per image), ACD-CLIP 0.59 -> 0.98 (200 steps).
LEARNING_STEPS = {"anomalyclip": 300, "faprompt": 300, "adaclip": 120, "acdclip": 200}


@pytest.mark.parametrize("method", list(LEARNING_STEPS))
def test_training_beats_the_untrained_method_on_held_out_data(shards, tmp_path, method):
    from zsadx.cli import main

    out = tmp_path / "run"
    run_checked(launch_cmd(1, "zsadx.train", *train_args(shards, out, "data.batch_size=8", "epochs=1000",
                                                           f"max_steps={LEARNING_STEPS[method]}", "log_every=50",
                                                           method=method)))
    auroc = {}
    for name, ckpt in [("untrained", ["untrained=true"]), ("trained", ["--checkpoint", str(out / "final.pt")])]:
        # Through the command line, with the method config the run saved (same random backbone).
        assert main(["eval", "--method", str(out / "method.yaml"), "--shards", str(shards), "--dataset", "visa",
                     "--out", str(tmp_path / name), "data.num_workers=0", *ckpt]) == 0
        (result,) = (tmp_path / name).glob(f"{method}-*-visa.json")
        auroc[name] = json.loads(result.read_text())["mean"]["pixel_auroc"]
    # Held-out dataset, no checkpoint selection on it.
    assert auroc["trained"] > auroc["untrained"] + 0.2, auroc


def test_train_config_errors_name_the_key(shards):
    src = f"data.sources=[{{shards: {shards}, dataset: mvtec-ad}}]"
    with pytest.raises(ConfigError, match="'optim.lrr'.*did you mean 'lr'"):
        load_config(TrainConfig, "train/anomalyclip-tiny", overrides=[src, "optim.lrr=1"])
    with pytest.raises(ConfigError, match="data.sources"):
        load_config(TrainConfig, "train/anomalyclip-tiny", overrides=["data.sources=[]"])
    from zsadx.models.methods.base import build_method
    from zsadx.training.loop import build_optimizer

    cfg = load_config(TrainConfig, "train/anomalyclip-tiny", overrides=[src, "optim.group_lr={imagee: 0.1}"])
    with pytest.raises(ConfigError, match="'optim.group_lr.imagee'"):
        build_optimizer(cfg, build_method(cfg.method))


def test_params_command_counts_the_trainable_prompts(capsys):
    from zsadx.cli import main

    assert main(["params", "methods/anomalyclip-tiny"]) == 0
    out = capsys.readouterr().out
    # 2 x 4 context tokens + 2 deep prompts x 4 tokens, text width 64 (ViT-L-14-336: 43,008).
    assert "trainable" in out and out.split("trainable")[1].split()[0] == "1,024"
    assert "backbone" not in out.split("frozen backbone")[0]


# The loaders yield uint8 pixels; this trainer, with its loader patched to normalise on the CPU
# (the old float path), must train the same weights as the default one normalising on the device.
FLOAT_LOADER = """import sys
from zsadx.data.transforms import EvalTransform, normalise
uint8_pixels = EvalTransform.pixels
EvalTransform.pixels = lambda self, im: normalise(uint8_pixels(self, im))
from zsadx.cli import main
raise SystemExit(main(["train", *sys.argv[1:]]))
"""


def test_uint8_batches_are_normalised_on_the_device(shards, tmp_path):
    import sys

    on_device, in_loader = tmp_path / "device", tmp_path / "loader"
    args = ["data.batch_size=2", "max_steps=2", "data.num_workers=0"]
    run_checked(launch_cmd(1, "zsadx.train", *train_args(shards, on_device, *args)))
    run_checked([sys.executable, "-c", FLOAT_LOADER, *train_args(shards, in_loader, *args)])
    # Both compute (v / 255 - mean) / std in float32, on other sides of the loader: equal to
    # rounding, which two Adam steps keep at the 1e-6 relative level (tolerance as for 1 vs 2 processes).
    assert_same(weights(on_device / "final.pt"), weights(in_loader / "final.pt"), **PROCESS_COUNT_TOL)
    assert read_log(on_device)[0]["loss"] == pytest.approx(read_log(in_loader)[0]["loss"], rel=1e-5)
