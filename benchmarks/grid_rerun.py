"""Re-running a finished grid: time to expand it, check every cell against the cache and submit nothing.

A paper-sized study is expanded (6 methods -- 2 training-free, 4 trained -- x 19 datasets under the
paper protocol x 3 seeds), every cell is marked done with its current key (as finished jobs leave
them), then ``zsadx grid run`` is timed end to end in a fresh process (Python and torch start-up
included) next to the time of ``zsadx --help`` as the floor any command pays.

    python benchmarks/grid_rerun.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DATASETS = ["mvtec-ad", "visa", "elpv", "sdd", "aitex", "btad", "dagm", "dtd-synthetic", "mpdd", "brainmri",
            "headct", "lag", "br35h", "cvc-colondb", "cvc-clinicdb", "kvasir", "endo", "isic", "tn3k"]


def main() -> None:
    from launch import cache
    from launch.grid import expand, load_grid

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "shards").mkdir()
        (tmp / "shards" / "index.json").write_text(json.dumps({"format_version": 1, "groups": [
            {"group": f"{d}-x-test", "dataset": d, "cls": "x", "split": "test", "shards": [], "counts": {}}
            for d in DATASETS]}))
        spec = {"name": "paper", "out_dir": str(tmp / "out"), "shards": str(tmp / "shards"), "seeds": [0, 1, 2],
                "protocol": {"type": "paper", "datasets": DATASETS}, "cluster": "local",
                "methods": [{"config": "methods/winclip"}, {"config": "methods/fade"},
                            *[{"config": f"methods/{m}", "train": f"train/{m}-mvtec"}
                              for m in ("anomalyclip", "faprompt")],
                            {"config": "methods/adaclip", "train": "train/adaclip-mvtec-colondb"},
                            {"config": "methods/acdclip", "train": "train/acdclip-mvtec"}]}
        grid_file = tmp / "grid.yaml"
        grid_file.write_text(yaml.safe_dump(spec))
        plan = expand(load_grid(str(grid_file)))
        for c in plan.train:
            cache.write_marker(c.folder, status="done", key=cache.train_key(c))
            Path(c.config["out_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(c.config["out_dir"]) / "final.pt").write_bytes(b"checkpoint " + c.id.encode())
        for c in plan.evals:
            cache.write_marker(c.folder, status="done", key=cache.eval_key(c))
        cells = len(plan.train) + len(plan.evals)
        t0 = time.perf_counter()
        floor = subprocess.run([sys.executable, "-m", "zsadx", "--help"], capture_output=True)
        t_floor = time.perf_counter() - t0
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "zsadx", "grid", "run", str(grid_file)], capture_output=True,
                              text=True)
        t_run = time.perf_counter() - t0
        assert floor.returncode == 0 and proc.returncode == 0, proc.stderr
        print(proc.stdout.strip())
        print(f"{'':34s} {'seconds':>8s}")
        print(f"{'zsadx --help (start-up floor)':34s} {t_floor:8.2f}")
        print(f"{f'zsadx grid run, {cells} cells all done':34s} {t_run:8.2f}")


if __name__ == "__main__":
    main()
