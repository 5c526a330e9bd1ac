"""Grid specs (``configs/grids/*.yaml``) and their expansion into train and eval cells.

A grid is methods x (train set -> test datasets) x seeds (x shots). The (train set -> test
datasets) pairs come from a protocol:

* ``explicit``: every train set of ``train_sets`` against every dataset of ``test_sets``;
* ``paper``: MVTec AD's test split -> every other dataset, VisA's test split -> MVTec AD (the
  AnomalyCLIP / FAPrompt / ACD-CLIP protocol);
* ``adaclip``: MVTec AD + CVC-ColonDB -> everything else, VisA + CVC-ClinicDB -> MVTec AD and CVC-ColonDB;
* ``leave-one-domain-out``: all datasets of one domain -> every dataset of the other (both ways);
* ``leave-one-dataset-out``: all datasets but one -> that one.

Training-free methods skip training: one eval cell per (dataset, seed, shots), whatever the
protocol. Trained methods get one train cell per (train set, seed) and eval cells that need its
checkpoint. A method with given ``checkpoints`` (one file per train set of the protocol, e.g. the
papers' released weights) gets no train cell: its eval cells evaluate the given file, under the
train set's name, as if it had been trained here. Nothing here runs anything.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from zsadx.config import ConfigError, load_config, load_yaml, suggest, to_dict
from zsadx.files import resolve_within, safe_component
from zsadx.tracking import TrackerConfig


@dataclass
class GridMethod:
    config: str = ""                      # method config, e.g. methods/winclip-tiny
    train: Optional[str] = None           # train config for trained methods, e.g. train/anomalyclip-tiny
    label: Optional[str] = None           # column name in tables (default: the method's name)
    overrides: list[str] = field(default_factory=list)        # method.* overrides (eval and train)
    train_overrides: list[str] = field(default_factory=list)  # trainer overrides (max_steps=..., optim.lr=...)
    shots: list[int] = field(default_factory=lambda: [0])
    # Instead of `train`: train set name -> checkpoint file (zsadx's final.pt or an official file),
    # one for every train set of the protocol. Relative paths: against the grid's `checkpoints_root`.
    checkpoints: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainSet:
    name: str = ""
    sources: list[dict] = field(default_factory=list)         # [{dataset, split, classes, weight}]


@dataclass
class ProtocolConfig:
    type: Literal["explicit", "paper", "adaclip", "leave-one-domain-out", "leave-one-dataset-out"] = "explicit"
    datasets: list[str] = field(default_factory=list)         # the pool the protocol draws from


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1                        # per training job (one `accelerate launch` per node); evaluations use 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: Optional[float] = None
    time_min: int = 60
    array_parallelism: int = 64
    setup: list[str] = field(default_factory=list)            # shell lines run before each job
    additional: dict[str, Any] = field(default_factory=dict)  # any other sbatch option


@dataclass
class GridConfig:
    name: str = ""
    out_dir: str = "runs/grids/grid"
    shards: str = "data/shards"           # shard root holding every dataset of the grid
    methods: list[GridMethod] = field(default_factory=list)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    train_sets: list[TrainSet] = field(default_factory=list)  # for protocol 'explicit'
    test_sets: list[str] = field(default_factory=list)        # for protocol 'explicit'
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_overrides: list[str] = field(default_factory=list)   # EvalConfig overrides (data.batch_size=...)
    # Experiment trackers for every cell, training and evaluation alike: replaces the method and
    # training configs' own `tracking` sections; `train_overrides` / `eval_overrides` still win.
    tracking: Optional[TrackerConfig] = None
    # Folder that relative `methods[*].checkpoints` paths are read from; itself relative to the
    # current folder, like `shards` and `out_dir` (default: the current folder).
    checkpoints_root: str = "."
    cluster: Literal["slurm", "local", "debug"] = "local"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def validate(self) -> None:
        if not self.methods:
            raise ConfigError("'methods' is empty: name at least one {config: methods/...}")
        for i, m in enumerate(self.methods):
            if not m.config:
                raise ConfigError(f"'methods[{i}].config' is required")
            if m.train and m.checkpoints:
                raise ConfigError(f"'methods[{i}]' ({m.label or m.config}) has both 'train' and 'checkpoints': "
                                  f"train it here (keep 'train') or evaluate given files (keep 'checkpoints')")
            for ts, path in m.checkpoints.items():
                if not isinstance(path, str) or not path.strip():
                    raise ConfigError(f"'methods[{i}].checkpoints.{ts}': give the checkpoint file's path, got {path!r}")
        if not self.seeds:
            raise ConfigError("'seeds' is empty")
        if self.slurm.nodes < 1:
            raise ConfigError(f"'slurm.nodes' must be at least 1, got {self.slurm.nodes}")
        self._check_path_names()

    def _check_path_names(self) -> None:
        """Labels, train set and dataset names become folders of the cells: one path component each."""
        for i, m in enumerate(self.methods):
            if m.label is not None:
                safe_component(m.label, f"grid key 'methods[{i}].label':")
        for i, d in enumerate(self.protocol.datasets):
            safe_component(d, f"grid key 'protocol.datasets[{i}]':")
        for i, d in enumerate(self.test_sets):
            safe_component(d, f"grid key 'test_sets[{i}]':")
        for i, ts in enumerate(self.train_sets):
            safe_component(ts.name, f"grid key 'train_sets[{i}].name':")
            for j, src in enumerate(ts.sources):
                safe_component(src.get("dataset", ""), f"grid key 'train_sets[{i}].sources[{j}].dataset':")


@dataclass(frozen=True)
class Pairing:
    train_set: TrainSet
    tests: tuple[str, ...]


def _domain(dataset: str) -> str:
    from zsadx.data.convert.plugins import load_all

    return load_all().get(dataset).entry.domain


def _test_split_set(*datasets: str) -> TrainSet:
    return TrainSet(name="+".join(datasets), sources=[{"dataset": d, "split": "test"} for d in datasets])


def protocol_pairings(cfg: GridConfig) -> list[Pairing]:
    """(train set -> test datasets) pairs of the grid's protocol."""
    p = cfg.protocol
    pool = list(dict.fromkeys(p.datasets or cfg.test_sets))
    if p.type == "explicit":
        if not cfg.train_sets and any(m.train or m.checkpoints for m in cfg.methods):
            raise ConfigError("protocol 'explicit' with trained methods (or given checkpoints) needs 'train_sets'")
        return [Pairing(ts, tuple(cfg.test_sets)) for ts in cfg.train_sets] or [Pairing(TrainSet("none"), tuple(cfg.test_sets))]
    if p.type == "paper":
        out = [Pairing(_test_split_set("mvtec-ad"), tuple(d for d in pool if d != "mvtec-ad"))]
        if "mvtec-ad" in pool:
            out.append(Pairing(_test_split_set("visa"), ("mvtec-ad",)))
        return [x for x in out if x.tests]
    if p.type == "adaclip":
        special = ("mvtec-ad", "cvc-colondb")
        out = [Pairing(_test_split_set("mvtec-ad", "cvc-colondb"), tuple(d for d in pool if d not in special)),
               Pairing(_test_split_set("visa", "cvc-clinicdb"), tuple(d for d in pool if d in special))]
        return [x for x in out if x.tests]
    if p.type == "leave-one-domain-out":
        by_domain: dict[str, list[str]] = {}
        for d in pool:
            by_domain.setdefault(_domain(d), []).append(d)
        if len(by_domain) < 2:
            raise ConfigError("protocol 'leave-one-domain-out' needs datasets of two domains in 'protocol.datasets'")
        return [Pairing(_test_split_set(*train), tuple(d for o, ds in by_domain.items() if o != dom for d in ds))
                for dom, train in by_domain.items()]
    if p.type == "leave-one-dataset-out":
        if len(pool) < 2:
            raise ConfigError("protocol 'leave-one-dataset-out' needs at least two datasets")
        return [Pairing(_test_split_set(*(d for d in pool if d != held)), (held,)) for held in pool]
    raise ConfigError(f"'protocol.type': unknown protocol '{p.type}'")


@dataclass
class TrainCell:
    method: str          # label
    train_set: str
    seed: int
    config: dict         # resolved TrainConfig as a dict
    folder: Path

    @property
    def id(self) -> str:
        return f"train/{self.method}/{self.train_set}/seed{self.seed}"


@dataclass
class EvalCell:
    method: str
    train_set: str       # 'zero-shot' for training-free methods
    dataset: str
    seed: int
    shots: int
    config: dict         # resolved EvalConfig as a dict (checkpoint filled in from the train cell)
    folder: Path
    train: Optional[TrainCell] = None

    @property
    def id(self) -> str:
        shot = f"-{self.shots}shot" if self.shots else ""
        return f"eval/{self.method}/{self.train_set}/{self.dataset}/seed{self.seed}{shot}"


@dataclass
class Plan:
    grid: GridConfig
    train: list[TrainCell]
    evals: list[EvalCell]


def _method_name(m: GridMethod) -> str:
    if m.label:
        return m.label
    return safe_component(load_yaml(m.config).get("name", Path(m.config).stem),
                          f"method name (key 'name' of {m.config}; or set the grid's 'label'):")


def _cell_folder(out: Path, *parts: str) -> Path:
    """``out/parts...``, refused when it would lie outside ``out`` (also through a symbolic link)."""
    folder = out.joinpath(*parts)
    resolve_within(out, folder.relative_to(out), "cell folder")
    return folder


def given_checkpoints(cfg: GridConfig, index: int, pairings: list[Pairing]) -> dict[str, Path]:
    """``methods[index]``'s checkpoint per train set of the protocol, under ``checkpoints_root`` (kept
    relative when both are, like ``shards``: the cells' keys do not depend on the folder the grid is
    run from, and jobs run in the folder they were submitted from); every train
    set must have one, every name must be a train set, every file must exist (checked here, at plan
    time, so that nothing is submitted before a typo shows)."""
    m = cfg.methods[index]
    who = f"'methods[{index}].checkpoints' ({m.label or m.config})"
    names = [p.train_set.name for p in pairings]
    unknown = [ts for ts in m.checkpoints if ts not in names]
    if unknown:
        raise ConfigError(f"{who}: '{unknown[0]}' is not a train set of protocol '{cfg.protocol.type}'"
                          + suggest(unknown[0], names) + f"; its train sets: {', '.join(names)}")
    lacking = [ts for ts in names if ts not in m.checkpoints]
    if lacking:
        raise ConfigError(f"{who}: no checkpoint for train set '{lacking[0]}' of protocol '{cfg.protocol.type}' "
                          f"(add '{lacking[0]}: FILE'; it needs one for each of: {', '.join(names)})")
    root = Path(cfg.checkpoints_root).expanduser()
    out = {}
    for ts in names:
        path = root / Path(m.checkpoints[ts]).expanduser()
        if not path.is_file():
            why = "is a folder, not a checkpoint file" if path.is_dir() else "not found"
            raise ConfigError(f"{who}: train set '{ts}': checkpoint {path.absolute()} {why} (relative paths are read from "
                              f"'checkpoints_root': {root.absolute()})")
        out[ts] = path
    return out


def _train_cell(cfg: GridConfig, m: GridMethod, label: str, ts: TrainSet, seed: int) -> TrainCell:
    from zsadx.training.config import TrainConfig

    sources = [{"shards": cfg.shards, "split": "test", **s} for s in ts.sources]
    folder = _cell_folder(Path(cfg.out_dir), "train", label, ts.name, f"seed{seed}")
    tcfg = load_config(TrainConfig, m.train, data=_grid_tracking(cfg), overrides=[
        *[f"method.{o}" for o in m.overrides], *m.train_overrides, f"seed={seed}", f"out_dir={folder / 'run'}",
        "resume=latest", "progress=false", "data.sources=" + json.dumps(sources)])
    return TrainCell(label, ts.name, seed, to_dict(tcfg), folder)


def _grid_tracking(cfg: GridConfig) -> dict:
    """The grid's ``tracking`` section as config data for a cell ({} when the grid has none)."""
    return {} if cfg.tracking is None else {"tracking": to_dict(cfg.tracking)}


def expand(cfg: GridConfig) -> Plan:
    """The grid's cells with fully resolved configs (fails on any bad key, and on a given checkpoint
    that is not there, before anything runs)."""
    from zsadx.eval.evaluator import EvalConfig
    from zsadx.training.config import TrainConfig

    out = Path(cfg.out_dir)
    pairings = protocol_pairings(cfg)
    zero_shot = [Pairing(TrainSet("zero-shot"), tuple(dict.fromkeys(d for p in pairings for d in p.tests)))]
    given = {i: given_checkpoints(cfg, i, pairings) for i, m in enumerate(cfg.methods) if m.checkpoints}
    trains: dict[str, TrainCell] = {}
    evals: dict[str, EvalCell] = {}
    for (i, m), seed in itertools.product(enumerate(cfg.methods), cfg.seeds):
        label = _method_name(m)
        method_over = [f"method.{o}" for o in m.overrides]
        for pairing in (pairings if m.train or m.checkpoints else zero_shot):
            tcell = None
            if m.train:
                tcell = _train_cell(cfg, m, label, pairing.train_set, seed)
                tcell = trains.setdefault(tcell.id, tcell)
            for dataset, shots in itertools.product(pairing.tests, m.shots):
                folder = _cell_folder(out, "eval", label, pairing.train_set.name, dataset,
                                      f"seed{seed}" + (f"-{shots}shot" if shots else ""))
                ecfg = load_config(EvalConfig, data={"method": load_yaml(m.config), **_grid_tracking(cfg)}, overrides=[
                    *method_over, f"method.shots={shots}", *cfg.eval_overrides, f"seed={seed}",
                    f"data.shards={cfg.shards}", f"data.dataset={dataset}", f"out_dir={folder}",
                    "progress=false"])  # cells log to files (debug: beside the grid's own progress lines)
                if tcell is not None:  # the trained method's own config, so the checkpoint fits
                    ecfg.method = load_config(TrainConfig, data=tcell.config).method
                    ecfg.method.shots = shots
                    ecfg.checkpoint = str(tcell.folder / "run" / "final.pt")
                elif i in given:
                    ecfg.checkpoint = str(given[i][pairing.train_set.name])
                cell = EvalCell(label, pairing.train_set.name, dataset, seed, shots, to_dict(ecfg), folder, tcell)
                evals.setdefault(cell.id, cell)
    return Plan(cfg, list(trains.values()), list(evals.values()))


def given_checkpoint_cells(plan: Plan) -> dict[tuple[str, str], str]:
    """(method, train set) -> the given checkpoint file its eval cells evaluate."""
    return {(c.method, c.train_set): c.config["checkpoint"] for c in plan.evals
            if c.train is None and c.config.get("checkpoint")}


@dataclass
class AbsentData:
    """Datasets the grid needs that its shard folders do not hold, and the cells that need them."""
    datasets: dict[str, list[str]]   # shard folder -> absent datasets
    errors: dict[str, str]           # shard folder -> why its index cannot be read
    cells: set[str]                  # ids of the cells that cannot run

    def warnings(self, action: str) -> list[str]:
        """One line per shard folder; ``action``: what happens to the cells ('are not submitted')."""
        n = len(self.cells)
        lines = [f"warning: {root}: no shard index usable ({why}); {n} cell(s) that need it {action}"
                 for root, why in self.errors.items()]
        lines += [f"warning: {root} has no dataset {', '.join(names)}; the {n} cell(s) that need "
                  f"{'it' if len(names) == 1 else 'them'} {action} (shard them with `zsadx data shard`, "
                  f"or remove them from the grid)" for root, names in self.datasets.items()]
        return lines


def _datasets_needed(plan: Plan) -> dict[str, list[tuple[str, str]]]:
    """cell id -> [(shard folder, dataset)] it reads."""
    need = {c.id: [(s["shards"], s["dataset"]) for s in c.config["data"]["sources"]] for c in plan.train}
    for c in plan.evals:
        need[c.id] = [(c.config["data"]["shards"], c.config["data"]["dataset"])]
    return need


def absent_data(plan: Plan) -> AbsentData:
    """What the shard indexes lack (read once per shard folder); an eval cell whose training cell
    cannot run cannot run either."""
    from zsadx.data.shards import load_index
    from zsadx.errors import UserError

    need = _datasets_needed(plan)
    present: dict[str, Optional[set[str]]] = {}
    errors: dict[str, str] = {}
    for root in dict.fromkeys(r for pairs in need.values() for r, _ in pairs):
        try:
            present[root] = {g["dataset"] for g in load_index(root)["groups"]}
        except (UserError, OSError, ValueError, KeyError, TypeError) as exc:
            present[root], errors[root] = None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    absent: dict[str, list[str]] = {}
    cells = set()
    for cell_id, pairs in need.items():
        for root, dataset in pairs:
            if present[root] is None or dataset not in present[root]:
                cells.add(cell_id)
                if present[root] is not None and dataset not in absent.setdefault(root, []):
                    absent[root].append(dataset)
    cells |= {c.id for c in plan.evals if c.train is not None and c.train.id in cells}
    return AbsentData({r: sorted(d) for r, d in absent.items() if d}, errors, cells)


def load_grid(path: str, overrides=()) -> GridConfig:
    return load_config(GridConfig, path, overrides=overrides)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
