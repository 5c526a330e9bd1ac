"""Experiment trackers (TensorBoard, wandb, MLflow, ...) through Accelerate's tracker API.

Training logs loss parts, learning rate and samples/s; evaluation logs per-class and mean
metrics and a few overlays. Offline-first: wandb runs in offline mode unless told otherwise, and
TensorBoard writes event files, so a cluster without internet still keeps every curve.

Where each tracker writes (``logging_dir``, default ``<out_dir>/trackers``):

* tensorboard: ``<logging_dir>/<project>/events.out.tfevents.*`` (+ the config as hparams)
* wandb: ``<logging_dir>/wandb/offline-run-*`` (``wandb sync`` uploads it later)
* mlflow: the store at ``$MLFLOW_TRACKING_URI``, else ``file:<logging_dir>/mlruns``

A training run that is resumed continues its tracker run: TensorBoard in the same folder (the
steps a killed run logged after its checkpoint are purged), wandb and MLflow under the run ids
kept in ``<out_dir>/trackers.json``.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from zsadx.config import ConfigError, suggest

# Accelerate's tracker names and what `pip install` brings each one's package.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
WANDB_MODES = ("offline", "online", "disabled")
RUN_IDS = "trackers.json"   # in a training run's out_dir: the tracker runs a resume continues


@dataclass
class TrackerConfig:
    log_with: list[str] = field(default_factory=list)   # tensorboard | wandb | mlflow | ... (Accelerate names)
    project: str = "zsadx"
    run_name: Optional[str] = None                       # default: the run / results folder name
    tags: dict[str, str] = field(default_factory=dict)   # grid cells add grid, cell key, method, datasets
    logging_dir: Optional[str] = None                    # default: <out_dir>/trackers
    wandb_mode: Optional[str] = None                     # offline | online | disabled; default $WANDB_MODE, else offline
    images: int = 4                                      # overlays an evaluation sends to the trackers

    def validate(self) -> None:
        known = tracker_names() if self.log_with else []
        for i, name in enumerate(self.log_with):
            if name not in known:
                raise ConfigError(f"'tracking.log_with[{i}]': unknown tracker '{name}'" + suggest(name, known)
                                  + f"; known trackers: {', '.join(known)}")
            check_installed(name, f"tracking.log_with[{i}]")
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"'tracking.wandb_mode': '{self.wandb_mode}'; use one of {', '.join(WANDB_MODES)}")
        if self.images < 0:
            raise ConfigError(f"'tracking.images': {self.images}; use 0 (none) or a number of overlays")


def tracker_names() -> list[str]:
    """The trackers Accelerate knows (its own list, so a newer Accelerate's are accepted too)."""
    try:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return list(PACKAGES)
    return sorted(LOGGER_TYPE_TO_CLASS)


def check_installed(name: str, key: str = "tracking.log_with") -> None:
    """A tracker whose package is missing fails before anything runs, saying what to install
    (Accelerate itself would drop it silently)."""
    module = PACKAGES.get(name, name)
    if importlib.util.find_spec(module) is not None:
        return
    extra = " (or pip install 'zsadx[tensorboard]')" if name == "tensorboard" else ""
    raise ConfigError(f"'{key}': tracker '{name}' needs the {module} package, which is not installed: "
                      f"pip install {module}{extra}")


# ------------------------------------------------------------------------------------------
# What a run hands its trackers
# ------------------------------------------------------------------------------------------

def flatten_config(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {dotted key: int | float | str | bool | None}: the value types every
    tracker's hyperparameter view takes (lists become their JSON text)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, (list, tuple)):
        return {prefix: json.dumps(list(obj), default=str)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {prefix: obj}
    return {prefix: str(obj)}


def logging_dir(cfg: TrackerConfig, out_dir: str | os.PathLike) -> Path:
    return Path(cfg.logging_dir) if cfg.logging_dir else Path(out_dir) / "trackers"


def run_name(cfg: TrackerConfig, out_dir: str | os.PathLike) -> str:
    return cfg.run_name or Path(out_dir).resolve().name


def wandb_mode(cfg: TrackerConfig) -> str:
    return cfg.wandb_mode or os.environ.get("WANDB_MODE") or "offline"


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (undefined metrics are left out, not logged as NaN)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def init_kwargs(cfg: TrackerConfig, out_dir: str | os.PathLike, job: str, ids: Optional[dict] = None,
                resume_step: Optional[int] = None) -> dict[str, dict]:
    """Each tracker's start-up arguments: run name, tags, grid group, offline wandb, and on a
    resume the ids of the runs to continue (``ids``) and the first step logged again."""
    name, where, ids = run_name(cfg, out_dir), logging_dir(cfg, out_dir), ids or {}
    tags = {k: str(v) for k, v in cfg.tags.items()}
    wandb = {"name": name, "dir": str(where), "mode": wandb_mode(cfg), "job_type": job,
             "tags": [f"{k}={v}"[:64] for k, v in tags.items()]}  # wandb tags are at most 64 characters
    if tags.get("grid"):
        wandb["group"] = tags["grid"]
    if ids.get("wandb"):
        wandb.update(id=ids["wandb"], resume="allow")
    mlflow = {"run_name": name, "tags": tags, **({"run_id": ids["mlflow"]} if ids.get("mlflow") else {})}
    tensorboard = {"purge_step": resume_step + 1} if resume_step is not None else {}
    return {"wandb": wandb, "mlflow": mlflow, "tensorboard": tensorboard}


def prepare_stores(cfg: TrackerConfig, out_dir: str | os.PathLike) -> None:
    """Folders and stores the trackers write to; before they start (MLflow's store is global)."""
    where = logging_dir(cfg, out_dir)
    where.mkdir(parents=True, exist_ok=True)
    if "mlflow" in cfg.log_with:
        import mlflow

        users = os.environ.get("MLFLOW_TRACKING_URI")
        uri = users
        if not uri:  # offline: a file store in the run's folder (MLflow 3 asks for this opt-in)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (where / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        # MLflow also exports the URI to the environment, for child processes. A run's own file
        # store is not the user's: left there, every later run of this process (a local grid's
        # next cell) and every process it starts would take it for theirs and log into this run.
        # So the environment goes back to what the user had.
        if users is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = users


def store_configuration(trackers: list, config: dict, first: Optional[dict] = None) -> None:
    """The flattened run config (its tags as ``tracking.tags.<name>``) as each tracker's
    hyperparameters. On a resume (``first``: the config the run started with) MLflow, whose params
    cannot change, keeps the first values of the keys a resume may change (max_steps, ...); the
    others show the resumed run's."""
    values = flatten_config(config)
    kept = flatten_config(first) if first is not None else {}
    for t in trackers:
        if t.name == "mlflow":
            t.store_init_configuration({k: v for k, v in values.items() if kept.get(k, v) == v})
        else:
            t.store_init_configuration(values)


# ------------------------------------------------------------------------------------------
# Run ids a resumed training run continues
# ------------------------------------------------------------------------------------------

def read_run_ids(out_dir: str | os.PathLike) -> dict[str, str]:
    try:
        ids = json.loads((Path(out_dir) / RUN_IDS).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def new_run_ids(cfg: TrackerConfig, ids: dict[str, str]) -> dict[str, str]:
    """A wandb run id chosen here (so a resume can name it); MLflow makes its own."""
    if "wandb" in cfg.log_with and not ids.get("wandb"):
        alphabet = string.ascii_lowercase + string.digits
        ids = {**ids, "wandb": "".join(secrets.choice(alphabet) for _ in range(12))}
    return ids


def started_run_ids(trackers: list, ids: dict[str, str]) -> dict[str, str]:
    """``ids`` with the ids the started trackers got (MLflow's)."""
    for t in trackers:
        if t.name == "mlflow" and getattr(t, "active_run", None) is not None:
            ids = {**ids, "mlflow": t.active_run.info.run_id}
    return ids


def write_run_ids(out_dir: str | os.PathLike, ids: dict[str, str]) -> None:
    from zsadx.files import atomic_write_json

    if ids:
        atomic_write_json(Path(out_dir) / RUN_IDS, ids, indent=1)


# ------------------------------------------------------------------------------------------
# Images and evaluation results
# ------------------------------------------------------------------------------------------

def log_images(trackers: list, tag: str, files: list[Path], step: int = 0) -> None:
    """PNG files to every tracker that takes images: TensorBoard one image each (they differ in
    size), MLflow as artifacts, the others through Accelerate's ``log_images``."""
    if not files:
        return
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    for t in trackers:
        if t.name == "tensorboard":
            for f, a in zip(files, arrays):
                t.tracker.add_image(f"{tag}/{f.stem}", a, step, dataformats="HWC")
            t.tracker.flush()
        elif t.name == "mlflow":
            for f in files:
                t.log_artifact(str(f), artifact_path=tag)
        elif hasattr(t, "log_images"):
            t.log_images({tag: arrays}, step=step)


def evaluation_values(results: dict) -> dict[str, float]:
    """``eval/<dataset>/<class>/<metric>`` and ``eval/<dataset>/mean/<metric>``, plus images/s."""
    d = results["dataset"]
    values = {f"eval/{d}/{c}/{k}": v for c, m in results["per_class"].items() for k, v in m.items()}
    values.update({f"eval/{d}/mean/{k}": v for k, v in results["mean"].items()})
    values.update({f"eval/{d}/images": results.get("images"),
                   f"eval/{d}/images_per_second": results.get("images_per_second")})
    return scalars(values)


def start_trackers(cfg: TrackerConfig, out_dir: str | os.PathLike, config: dict, job: str) -> list:
    """Accelerate's trackers for a job that runs outside an Accelerator (evaluation), started the
    way ``Accelerator.init_trackers`` starts them."""
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    # Accelerate's trackers log through its logging utility, which refuses to run before its
    # state exists: an Accelerator makes it in training; here nothing has (wandb alone crashed).
    PartialState()
    prepare_stores(cfg, out_dir)
    kwargs = init_kwargs(cfg, out_dir, job)
    trackers = []
    for name in dict.fromkeys(cfg.log_with):
        cls = LOGGER_TYPE_TO_CLASS[name]
        if cls.requires_logging_directory:
            trackers.append(cls(cfg.project, str(logging_dir(cfg, out_dir)), **kwargs.get(name, {})))
        else:
            trackers.append(cls(cfg.project, **kwargs.get(name, {})))
    for t in trackers:
        t.start()
    store_configuration(trackers, config)
    return trackers


def log_evaluation(cfg: TrackerConfig, results: dict, out_dir: str | os.PathLike,
                   overlays: Optional[Path] = None) -> None:
    """One evaluation's metrics (and its first ``cfg.images`` overlays) as one tracker run."""
    if not cfg.log_with:
        return
    trackers = start_trackers(cfg, out_dir, results.get("config") or {}, "eval")
    try:
        values = evaluation_values(results)
        for t in trackers:
            t.log(values, step=0)
        files = sorted(overlays.glob("*.png"))[:cfg.images] if overlays is not None and overlays.is_dir() else []
        log_images(trackers, f"eval/{results['dataset']}/overlays", files)
    finally:
        for t in trackers:
            t.finish()
