"""The training loop: Accelerate (DDP, mixed precision, DeepSpeed ZeRO), checkpoints, resume, signals.

Only the method's trainable parameters reach the optimizer; the frozen backbone is never in
optimizer state nor in checkpoints. Batches come from the shard mixture in ``global`` mode, so a
run's weights do not depend on the number of processes, and a resumed run replays the data stream
to the exact position it stopped at: killed and resumed equals uninterrupted (same seed and world
size). SIGTERM / SIGUSR1 (SLURM pre-emption) make every rank agree to checkpoint and stop.

One folder holds one run: without ``resume`` a folder holding a run is refused (``overwrite=true``
starts over), a resume must not change what the checkpoint computed (see
:func:`zsadx.training.checkpoint.config_differences`), and the log is cut back to the checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from zsadx import tracking
from zsadx.config import save_resolved, to_dict
from zsadx.errors import UserError
from zsadx.files import atomic_write_json
from zsadx.models.checkpoints import TRAINER_FORMAT
from zsadx.training import checkpoint as ckpt
from zsadx.tracking import TrackerConfig
from zsadx.training.config import TrainConfig

log = logging.getLogger(__name__)

# SIGTERM: SLURM pre-emption / time limit; SIGUSR1: `--signal` warnings; SIGUSR2: submitit's warning.
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _worker_init(_: int) -> None:
    # Data workers leave pre-emption to the main process (SLURM signals every process of a step).
    for s in PREEMPT_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers, cpu = [], False
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            # accelerate leaves the backend unset without CUDA, and DeepSpeed then disagrees on the world size.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        else:
            # Without cpu=True accelerate silently falls back to DistributedType.NO: no gradient sync.
            cpu = True
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation,
                       kwargs_handlers=handlers, cpu=cpu, **tracker_arguments(cfg.trackers(), cfg.out_dir))


def tracker_arguments(trackers: TrackerConfig, out_dir: str) -> dict:
    """Accelerator(log_with=..., project_config=...) for the run's trackers; nothing without any."""
    if not trackers.log_with:
        return {}
    from accelerate.utils import ProjectConfiguration

    where = tracking.logging_dir(trackers, out_dir)
    return {"log_with": list(dict.fromkeys(trackers.log_with)),
            "project_config": ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(where))}


def start_tracking(acc, cfg: TrainConfig, resumed: Optional[dict]) -> None:
    """Start the run's trackers on the main process; a resumed run (``resumed``: its checkpoint's
    state) continues its tracker runs."""
    trackers = cfg.trackers()
    if not trackers.log_with or not acc.is_main_process:
        return
    if cfg.tensorboard:
        log.warning("tensorboard: true is deprecated (it now means tracking.log_with=[tensorboard]); its event "
                    "files are in %s", tracking.logging_dir(trackers, cfg.out_dir) / trackers.project)
    ids = tracking.new_run_ids(trackers, tracking.read_run_ids(cfg.out_dir) if resumed is not None else {})
    tracking.prepare_stores(trackers, cfg.out_dir)
    acc.init_trackers(trackers.project, init_kwargs=tracking.init_kwargs(
        trackers, cfg.out_dir, "train", ids, resumed["step"] if resumed is not None else None))
    tracking.store_configuration(acc.trackers, to_dict(cfg), resumed["config"] if resumed is not None else None)
    tracking.write_run_ids(cfg.out_dir, tracking.started_run_ids(acc.trackers, ids))


def train_values(rec: dict, optimizer) -> dict[str, float]:
    """A log record as tracker scalars ``train/<key>``; the learning rate of every parameter group
    when there are several (ACD-CLIP's image / text)."""
    values = {f"train/{k}": v for k, v in rec.items() if k != "step"}
    if len(optimizer.param_groups) > 1:
        values.update({f"train/lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)})
    return tracking.scalars(values)


def build_optimizer(cfg: TrainConfig, method) -> torch.optim.Optimizer:
    groups = method.param_groups() if hasattr(method, "param_groups") else {"default": method.trainable_parameters()}
    unknown = set(cfg.optim.group_lr) - set(groups)
    if unknown:
        from zsadx.config import ConfigError, suggest

        name = sorted(unknown)[0]
        raise ConfigError(f"'optim.group_lr.{name}': {cfg.method.name} has no parameter group '{name}'"
                          + suggest(name, groups) + f"; groups: {', '.join(groups)}")
    params = [{"params": list(p), "lr": cfg.optim.group_lr.get(name, cfg.optim.lr), "name": name}
              for name, p in groups.items() if list(p)]
    if not params:
        raise ValueError(f"method '{cfg.method.name}' has no trainable parameters")
    cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer):
    gamma = cfg.optim.gamma if cfg.optim.scheduler == "exponential" else 1.0
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)


def build_data(cfg: TrainConfig, rank: int, world: int):
    from zsadx.data.loaders import MixtureSource, TrainMixture
    from zsadx.data.shards import select_shards
    from zsadx.data.transforms import EvalTransform

    d = cfg.data
    sources = [MixtureSource(s.shards, s.dataset, s.split, s.classes, s.weight) for s in d.sources]
    bpe = d.batches_per_epoch
    if bpe is None:
        total = sum(r.count for s in sources for r in select_shards(s.shards, s.dataset, s.classes, s.split))
        bpe = max(1, math.ceil(total / (d.batch_size * world)))
    bpe = math.ceil(bpe / cfg.gradient_accumulation) * cfg.gradient_accumulation  # whole optimizer steps
    size = cfg.method.input_size or cfg.method.backbone.image_size
    transform = EvalTransform(size=size, mask_resize=d.mask_resize)
    return TrainMixture(sources, d.batch_size, bpe, transform, seed=cfg.seed, shuffle_buffer=d.shuffle_buffer,
                        max_skips=d.max_skips, rank=rank, world_size=world, mode="global")


def _on_every_rank(accelerator, write: Callable[[], None], path: Path) -> None:
    """Run a part of a checkpoint write on every rank; when it fails on any, every rank raises (a
    full disk as a DiskFullError naming ``path``) and the half-written ``path`` is removed."""
    failure: Optional[BaseException] = None
    try:
        write()
    except (OSError, RuntimeError) as exc:
        failure = ckpt.as_disk_full(exc, path) or exc
    if _any_rank(accelerator, failure is not None):
        if accelerator.is_main_process and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
        if failure is not None:
            raise failure
        raise RuntimeError(f"another process failed while writing {path}")


def _any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any."""
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return bool(t.item() > 0)


class _Preemption:
    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self) -> None:
        for s in PREEMPT_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing at the end of this step", signum)
        self.signum = signum

    def agreed(self, accelerator) -> bool:
        """Every rank stops at the same step if any rank was signalled."""
        return _any_rank(accelerator, bool(self.signum))


def prepare_run_folder(cfg: TrainConfig, is_main: bool) -> None:
    """One folder, one run: a folder holding a run is continued (``resume``) or replaced
    (``overwrite=true``), never silently trained over."""
    out = Path(cfg.out_dir)
    held = ckpt.holds_run(out)
    if held and not cfg.resume and not cfg.overwrite:
        raise RunFolderError(f"{out}: holds {held}; continue it with resume=latest, or start over with "
                             f"overwrite=true (deletes its checkpoints, final.pt and log)")
    if is_main and held and cfg.overwrite and not cfg.resume:
        log.warning("overwrite=true: deleting the run in %s", out)
        ckpt.remove_run(out)
    if is_main:
        ckpt.clean_partial(out)


class RunFolderError(UserError):
    """A run folder that holds another run, or a resume that would not continue the same run."""


def check_resume_config(cfg: TrainConfig, saved: dict, where: Path) -> None:
    """A resume continues the run in the checkpoint: a changed key that changes the result is refused
    (the checkpoint's optimizer state would silently keep the old lr, and config.yaml would lie)."""
    keys = ckpt.config_differences(saved, to_dict(cfg), tuple(cfg.resume_allow))
    if not keys:
        return
    fixed = [k for k in keys if any(ckpt.covers(r, k) for r in ckpt.STATE_KEYS)]
    how = ("these live in the checkpoint's state and cannot change in a resumed run" if fixed else
           "list the keys you mean to change in resume_allow=[...]")
    raise RunFolderError(f"{where}: this config differs from the run's ({', '.join(keys)}); {how}. Resume with the "
                         f"run's own config ({Path(cfg.out_dir) / 'config.yaml'}) or start a new run "
                         f"(another out_dir, or overwrite=true)")


def finished_result(out: Path, step: int) -> dict:
    """What a resume of a finished run returns without touching anything."""
    try:
        result = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        result = {"steps": step}
    return {**result, "already_finished": True}


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg.method``; the main process holds the run folder's lock throughout."""
    from zsadx.files import FolderLock

    acc = make_accelerator(cfg)
    if not acc.is_main_process:
        return _train(cfg, acc)
    # The lock is not inherited by forked data workers (FolderLock closes it in children): a worker
    # orphaned by a killed trainer would otherwise keep the folder locked and refuse the resume.
    with FolderLock(cfg.out_dir, "this training run", name=".zsadx-train.lock"):
        return _train(cfg, acc)


def _train(cfg: TrainConfig, acc) -> dict:
    from accelerate.utils import DistributedType, set_seed
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from zsadx.data.transforms import normalise
    from zsadx.models.checkpoints import check_identity, method_identity, save_method_checkpoint
    from zsadx.models.methods.base import build_method
    from zsadx.version import code_version

    is_ds = acc.distributed_type == DistributedType.DEEPSPEED
    out = Path(cfg.out_dir)
    prepare_run_folder(cfg, acc.is_main_process)
    acc.wait_for_everyone()
    resume = ckpt.find_resume(out, cfg.resume)
    if resume is None and cfg.resume and (out / "final.pt").is_file():
        raise RunFolderError(f"{out}: holds a finished run (final.pt) but no checkpoint to resume from; train it "
                             f"again with overwrite=true")
    state = ckpt.read_trainer(resume) if resume is not None else None
    if state is not None:
        check_resume_config(cfg, state["config"], resume / ckpt.TRAINER)
    set_seed(cfg.seed)  # same initial prompts/adapters on every rank
    method = build_method(cfg.method)
    method.train()
    method.backbone.eval()  # frozen: no dropout, no batch statistics
    optimizer = build_optimizer(cfg, method)
    scheduler = build_scheduler(cfg, optimizer)
    if is_ds:
        ds_cfg = acc.state.deepspeed_plugin.deepspeed_config
        ds_cfg["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds_cfg["gradient_accumulation_steps"] = cfg.gradient_accumulation
        ds_cfg["train_batch_size"] = cfg.data.batch_size * cfg.gradient_accumulation * acc.num_processes
        ds_cfg.setdefault("zero_allow_untested_optimizer", True)
        if cfg.optim.grad_clip:
            ds_cfg["gradient_clipping"] = cfg.optim.grad_clip
    model, optimizer = acc.prepare(method, optimizer)
    unwrapped = acc.unwrap_model(model)
    identity = method_identity(unwrapped)
    data = build_data(cfg, acc.process_index, acc.num_processes)
    n_trainable = sum(p.numel() for p in unwrapped.trainable_parameters())
    total_steps = cfg.epochs * data.batches_per_epoch // cfg.gradient_accumulation
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    epoch, batch_in_epoch, step = 0, 0, 0
    if state is not None:
        check_identity(state["identity"], unwrapped, resume / ckpt.TRAINER)
        if (out / "final.pt").is_file() and state["step"] >= total_steps:
            # resume=latest on a finished run: nothing to do, and nothing is rewritten.
            acc.wait_for_everyone()
            acc.end_training()
            return finished_result(out, state["step"])
        if state["world_size"] != acc.num_processes:
            log.warning("resuming a %d-process run with %d processes: data order changes",
                        state["world_size"], acc.num_processes)
        unwrapped.load_trainable_state_dict(state["method"])
        if is_ds:
            # DeepSpeed unpickles its own shards: only ever from this run's own checkpoint folder.
            if resume.resolve().parent != ckpt.checkpoint_dir(out).resolve():
                raise RunFolderError(f"resume={cfg.resume}: with DeepSpeed a run resumes only from its own "
                                     f"checkpoints ({ckpt.checkpoint_dir(out)}); use resume=latest")
            model.load_checkpoint(str(resume), tag="ds", load_module_strict=False)
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.load_rng(resume, acc.process_index, state["rng"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        if acc.is_main_process:
            log.info("resumed from %s (epoch %d, batch %d, step %d)", resume, epoch, batch_in_epoch, step)
    if acc.is_main_process:
        save_resolved(cfg, out)  # only now: a refused resume leaves the run's config.yaml as it was
        save_resolved(cfg.method, out, "method.yaml")  # for `zsadx eval --method <run>/method.yaml`
        ckpt.trim_log(out, step)  # the steps after the checkpoint are logged again below

    def write_rank_files(tmp: Path) -> None:
        if is_ds:
            model.save_checkpoint(str(tmp), tag="ds", exclude_frozen_parameters=True)
        ckpt.save_rng(tmp, acc.process_index)  # each rank's own generators

    def write_main_files(tmp: Path, final: Path, reason: str) -> None:
        trainer = {"format": TRAINER_FORMAT, "identity": identity, "method": unwrapped.trainable_state_dict(),
                   "optimizer": None if is_ds else optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(), "epoch": epoch,
                   "batch_in_epoch": batch_in_epoch, "step": step, "world_size": acc.num_processes,
                   "reason": reason, "code_version": code_version(), "config": to_dict(cfg)}
        ckpt.save(trainer, tmp / ckpt.TRAINER)
        ckpt.commit(tmp, final, cfg.keep_checkpoints)  # manifest last, then the rename

    def save(reason: str) -> Path:
        tmp, final = ckpt.temp_folder(out, step)
        main = acc.is_main_process
        # Each part ends when every rank is through it; a failure on any rank stops all of them.
        _on_every_rank(acc, lambda: ckpt.begin(tmp) if main else None, tmp)
        _on_every_rank(acc, lambda: write_rank_files(tmp), tmp)
        _on_every_rank(acc, lambda: write_main_files(tmp, final, reason) if main else None, tmp)
        return final

    pre = _Preemption()
    pre.install()
    start_tracking(acc, cfg, state)
    logf = open(out / "train_log.jsonl", "a") if acc.is_main_process else None
    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and acc.is_main_process), unit="step",
               desc=f"train {cfg.method.name}")
    t_log, samples_since = time.perf_counter(), 0
    stopped_by: Optional[int] = None
    done = step >= total_steps
    last_saved = step if resume is not None else -1
    while epoch < cfg.epochs and not done:
        data.set_epoch(epoch)
        data.skip_batches = batch_in_epoch
        loader = DataLoader(data, batch_size=None, num_workers=cfg.data.num_workers, worker_init_fn=_worker_init)
        for batch in loader:
            if "_skipped" in batch:
                continue
            with acc.accumulate(model):
                batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                batch["image"] = normalise(batch["image"])  # loaders hand over uint8: the device normalises
                losses = model(batch)
                acc.backward(losses["loss"])
                if acc.sync_gradients and not is_ds:
                    # Method-specific clipping first (ACD-CLIP clips each blend weight on its own).
                    for params, max_norm in getattr(unwrapped, "grad_clip_groups", list)():
                        torch.nn.utils.clip_grad_norm_(params, max_norm)
                    if cfg.optim.grad_clip:
                        acc.clip_grad_norm_(unwrapped.trainable_parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            samples_since += batch["image"].shape[0] * acc.num_processes
            if not acc.sync_gradients:
                continue
            step += 1
            bar.update()
            if step % cfg.log_every == 0 or step == total_steps:
                loss = acc.reduce(losses["loss"].detach().float(), reduction="mean").item()
                dt = time.perf_counter() - t_log
                rec = {"step": step, "epoch": epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                       "samples_per_second": samples_since / dt if dt > 0 else None}
                rec.update({k: acc.reduce(v.detach().float(), reduction="mean").item()
                            for k, v in losses.items() if k != "loss"})
                if logf:
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                    bar.set_postfix(loss=f"{loss:.4f}")
                acc.log(train_values(rec, optimizer), step=step)
                t_log, samples_since = time.perf_counter(), 0
            if pre.agreed(acc):
                stopped_by = pre.signum or signal.SIGTERM
                save(f"signal {stopped_by}")
                last_saved = step
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save("periodic")
                last_saved = step
            if step >= total_steps:
                done = True
                break
        if stopped_by is not None:
            break
        if batch_in_epoch >= data.batches_per_epoch:
            scheduler.step()
            epoch, batch_in_epoch = epoch + 1, 0
            if not cfg.checkpoint_every and not done:
                save("epoch")
                last_saved = step
    bar.close()
    if stopped_by is None and last_saved != step:
        save("final")
    result = {"steps": step, "epochs_done": epoch, "trainable_parameters": n_trainable,
              "world_size": acc.num_processes, "stopped_by_signal": stopped_by, "code_version": code_version()}

    def write_final() -> None:
        if stopped_by is None:
            save_method_checkpoint(unwrapped, out / "final.pt")
        atomic_write_json(out / "run.json", result, indent=2)

    _on_every_rank(acc, write_final if acc.is_main_process else (lambda: None), out / "final.pt")
    if logf:
        logf.close()
    acc.end_training()
    if stopped_by is not None:
        raise SystemExit(128 + int(stopped_by))
    return result
