"""``zsadx grid plan|run|status GRID``, ``zsadx table GRID_OR_RUN_DIR``, ``zsadx figure GRID`` and
``zsadx report GRID``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("grid", help="plan, run and follow a study grid (submitit: slurm, local or debug)")
    gsub = p.add_subparsers(dest="grid_command", required=True)
    for name, help_ in [("plan", "print the cells and what is already done, run nothing"),
                        ("run", "submit the missing, stale, failed and lost cells (slurm: returns once "
                                "submitted; local and debug: run them all, then return)"),
                        ("status", "done / running / failed / lost cells, with each failure's log and last error line")]:
        g = gsub.add_parser(name, help=help_)
        g.add_argument("grid", help="grid config, e.g. grids/demo")
        g.add_argument("overrides", nargs="*", help="dotted overrides, e.g. cluster=local seeds=[0,1]")
        if name == "run":
            g.add_argument("--force", action="store_true", help="recompute finished cells too")
            g.add_argument("--wait", action="store_true", help="follow SLURM jobs until they end")
            g.add_argument("--wait-lock", action="store_true",
                           help="wait for another run of this grid to finish instead of refusing")
        g.set_defaults(func=_grid)
    t = sub.add_parser("table", help="results table of a grid folder or of any folder of results files")
    t.add_argument("path", help="grid config (grids/NAME), grid output folder, or folder of results files")
    t.add_argument("--format", default="md", choices=["md", "csv", "tex", "json"])
    t.add_argument("--metrics", default="image_auroc,image_ap,pixel_auroc,pixel_aupro",
                   help="comma-separated, e.g. pixel_auroc,pixel_aupro")
    t.add_argument("--columns", default="method", choices=["method", "train_set", "shots", "seed"],
                   help="which axis of the cells becomes the columns")
    t.add_argument("--per-class", action="store_true",
                   help="rows = each dataset's classes and its mean row, columns = the axis x the metrics")
    t.add_argument("--plot", help="also write a PNG bar chart of the first metric here")
    t.add_argument("--out", help="write the table to this file instead of stdout")
    t.set_defaults(func=_table)
    f = sub.add_parser("figure", help="the papers' qualitative figure: rows = images, columns = the image, its "
                                      "ground truth and each method's heat map at a shared colour scale")
    f.add_argument("grid", help="grid config (grids/NAME) or grid output folder")
    f.add_argument("--dataset", required=True, help="a dataset the grid evaluated, e.g. visa")
    f.add_argument("--out", required=True, help="fig.png or fig.pdf (the format follows the extension)")
    f.add_argument("--images", type=int, default=6, help="rows: anomalous test images drawn seeded (default 6)")
    f.add_argument("--classes", help="comma-separated: draw only among these classes")
    f.add_argument("--keys", help="comma-separated sample keys (as in the results files' scores) instead of a draw")
    f.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    f.add_argument("--methods", help="comma-separated method labels of the grid, in column order (default: all)")
    f.add_argument("--device", default="auto", help="where the methods run: auto (a GPU if there is one), cpu, cuda")
    f.set_defaults(func=_figure)
    from zsadx.eval import report

    report.add_parser(sub).set_defaults(func=_report)


def _grid(args: argparse.Namespace) -> int:
    from launch.grid import expand, load_grid

    t0 = time.perf_counter()
    plan = expand(load_grid(args.grid, args.overrides))
    if args.grid_command == "run":
        return _run(plan, args, t0)
    return _plan_or_status(plan, args.grid_command)


def _run(plan, args: argparse.Namespace, t0: float) -> int:
    """Exit 1 when a cell this run waited for failed or was lost."""
    from launch import fanout

    summary = fanout.run(plan, force=args.force, wait=args.wait, wait_lock=args.wait_lock)
    if not summary["train"] and not summary["eval"]:
        left = {why: len(ids) for why, ids in summary["skipped"].items() if ids}
        n = len(plan.train) + len(plan.evals)
        print(f"nothing to do: all {n} cells are done ({time.perf_counter() - t0:.1f} s)" if not left else
              f"nothing submitted: {n - sum(left.values())} of {n} cells done, "
              + ", ".join(f"{k} {why}" for why, k in left.items()))
    return 1 if summary["failed"] else 0


def _plan_or_status(plan, command: str) -> int:
    from launch import cache, fanout
    from launch.grid import absent_data, given_checkpoint_cells

    cells = [*plan.train, *plan.evals]
    for (method, train_set), path in given_checkpoint_cells(plan).items():
        print(f"given     {method}/{train_set}: {path} (sha256 {cache.file_sha(Path(path))})")
    absent = absent_data(plan)
    for line in absent.warnings("cannot run"):
        print(line)
    states = cache.states(cells)
    for c in cells:
        if c.id in absent.cells and states[c.id] != "done":
            states[c.id] = "no-data"
    for c in cells:
        s = states[c.id]
        line = f"{s:9s} {c.id}"
        if command == "status":
            marker = cache.read_marker(c.folder) or {}
            line += _where(s, marker)
        print(line)
        if command == "status" and s in ("failed", "lost"):
            for extra in fanout.failure_lines(s, marker):
                print(extra)
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    print(f"{len(plan.train)} training and {len(plan.evals)} evaluation cells: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 1 if command == "status" and (counts.get("failed") or counts.get("lost")) else 0


def _where(state: str, marker: dict) -> str:
    """Where an open (or lost) cell runs: its SLURM job, or its process and host."""
    if state not in ("running", "submitted", "lost", "failed"):
        return ""
    if marker.get("cluster") == "slurm" or (marker.get("job_id") and not marker.get("where")):
        return f"  [job {marker['job_id']}]" if marker.get("job_id") else ""
    where = marker.get("where") or {}
    return f"  [pid {where['pid']} on {where.get('host')}]" if where.get("pid") else ""


def _table(args: argparse.Namespace) -> int:
    from zsadx.eval import tables
    from zsadx.files import atomic_write_text

    root = _grid_folder(args.path)
    records = tables.collect(root)
    if not records:
        print(f"no finished evaluations under {root}", file=sys.stderr)
        return 1
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    table = tables.build(records, metrics, args.columns)
    if args.per_class:
        text = tables.render_per_class(tables.build_per_class(records, metrics, args.columns), args.format)
    else:
        text = tables.render(table, args.format)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        print(text)
    if args.plot:
        print(f"plot: {tables.plot(table, args.plot)}")
    return 0


def _grid_folder(path: str) -> Path:
    """A folder as given; a grid config: its output folder."""
    if Path(path).is_dir():
        return Path(path)
    from launch.grid import load_grid

    return Path(load_grid(path).out_dir)


def _report(args: argparse.Namespace) -> int:
    from zsadx.eval import report

    return report.main(args, _grid_folder(args.path), _cell_states(args.path))


def _cell_states(path: str) -> dict[str, str] | None:
    """Every planned cell's state (as `zsadx grid status` gives it) for a grid config; None for a folder,
    whose markers speak for themselves."""
    if Path(path).is_dir():
        return None
    from launch import cache
    from launch.grid import expand, load_grid

    plan = expand(load_grid(path))
    return cache.states([*plan.train, *plan.evals])


def _names(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _figure(args: argparse.Namespace) -> int:
    from zsadx.eval.figure import draw_figure

    methods = _names(args.methods)
    if not Path(args.grid).is_dir():  # a grid config: the columns in the grid's order, every cell accounted for
        from launch.grid import expand, load_grid

        methods = _planned_methods(expand(load_grid(args.grid)), args.dataset, methods)
    out = draw_figure(_grid_folder(args.grid), args.dataset, args.out, images=args.images,
                      classes=_names(args.classes), keys=_names(args.keys), seed=args.seed,
                      methods=methods, device=args.device)
    print(f"figure: {out}")
    return 0


def _planned_methods(plan, dataset: str, methods: list[str] | None) -> list[str] | None:
    """The methods asked for, or the grid's methods that evaluate ``dataset`` in the grid's order;
    one none of whose cells there is done (not run yet, failed, running) is an error naming a cell."""
    from launch import cache
    from zsadx.eval.figure import FigureError

    cells = [c for c in plan.evals if c.dataset == dataset]
    if not cells:
        return methods  # the figure says which datasets the grid has
    methods = methods or list(dict.fromkeys(c.method for c in cells))
    for m in methods:
        mine = [c for c in cells if c.method == m]
        if not mine:
            continue  # not a method of this grid on this dataset: the figure says so
        # Done under an older code version (stale) still shows its maps; the figure itself refuses a
        # cell whose checkpoint or config changed since.
        if not any(cache.marker_status(c.folder)[0] == "done" for c in mine):
            raise FigureError(f"cell {mine[0].id} is {cache.state(mine[0])}, not done: finish it (`zsadx grid run "
                              f"{plan.grid.name or 'GRID'}`) or leave method '{m}' out with --methods")
    return methods
