"""Paper-style results tables from finished evaluation cells (or any folder of results files).

Rows: datasets grouped by domain (industrial first), with a per-domain average row; columns: one
axis of the cells (method by default; or train_set, shots, seed); each cell: the chosen metrics
(e.g. image AUROC / AP) as mean over seeds (with std when there are several), x100. The best value
per row and metric is bold. Missing cells (not run, failed, undefined metric) show as '-'. A
dataset evaluated on a subset of its classes (a partial download, ``--classes``) is a row of its
own, ``mvtec-ad (2/15 classes)``, left out of the domain average.
Formats: md, csv, tex, json; ``plot`` draws a grouped bar chart (PNG) of the first metric.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

DOMAIN_ORDER = ("industrial", "medical")


@dataclass
class Record:
    method: str
    train_set: str
    dataset: str
    domain: str
    seed: int
    shots: int
    metrics: dict
    classes: tuple[str, ...] = ()     # the classes evaluated
    n_catalog: int = 0                # how many classes the whole dataset has (0: unknown, taken as full)
    subset: bool = False              # evaluated on part of the dataset's classes

    def row_label(self, name_classes: bool = False) -> str:
        """The table row: the dataset, or the dataset with how many (and which) of its classes were evaluated."""
        if not self.subset:
            return self.dataset
        names = f": {', '.join(sorted(self.classes))}" if name_classes else ""
        return f"{self.dataset} ({len(self.classes)}/{self.n_catalog or '?'} classes{names})"


def _coverage(res: dict) -> dict:
    """Record fields on class coverage from a results file (older files lack them: a full set)."""
    catalog = res.get("catalog_classes") or []
    return {"classes": tuple(res.get("classes") or ()), "n_catalog": len(catalog), "subset": bool(res.get("subset"))}


def parse_cell_id(cell_id: str) -> Optional[tuple[str, str, str, int, int]]:
    """``eval/<method>/<train_set>/<dataset>/seed<k>[-<n>shot]`` -> (method, train_set, dataset, seed,
    shots); None for a training cell's id."""
    parts = cell_id.split("/")
    if parts[0] != "eval" or len(parts) != 5:
        return None
    seed_part = parts[4]
    seed = int(seed_part.split("-")[0].removeprefix("seed"))
    shots = int(seed_part.split("-")[1].removesuffix("shot")) if "-" in seed_part else 0
    return parts[1], parts[2], parts[3], seed, shots


def collect(root: str | Path) -> list[Record]:
    """Finished cells under a grid folder (cell markers), else plain results files of ``zsadx eval``."""
    root = Path(root)
    records = []
    markers = sorted(root.rglob("cell.json"))
    if markers:
        for m in markers:
            data = json.loads(m.read_text())
            if data.get("status") != "done" or not data.get("result"):
                continue
            cell = parse_cell_id(data["id"])
            if cell is None:
                continue
            method, train_set, dataset, seed, shots = cell
            res = json.loads(Path(data["result"]).read_text())
            records.append(Record(method, train_set, dataset, res.get("domain", "industrial"), seed, shots,
                                  res["mean"], **_coverage(res)))
        return records
    for f in sorted(root.rglob("*.json")):
        try:
            res = json.loads(f.read_text())
        except ValueError:
            continue
        if not isinstance(res, dict) or "mean" not in res or "dataset" not in res:
            continue
        cfg = res.get("config", {})
        method = cfg.get("method", {}).get("name", res.get("method", "?"))
        train_set = Path(cfg["checkpoint"]).stem if cfg.get("checkpoint") else (
            "untrained" if cfg.get("untrained") else "zero-shot")
        records.append(Record(method, train_set, res["dataset"], res.get("domain", "industrial"),
                              int(cfg.get("seed", 0)), int(cfg.get("method", {}).get("shots", 0)), res["mean"],
                              **_coverage(res)))
    return records


def check_metrics(metrics: Sequence[str], records: Sequence[Record]) -> None:
    """Every asked-for metric is one zsadx computes (or one the results hold): a typo is an error."""
    from zsadx.config import ConfigError, suggest
    from zsadx.eval.metrics import METRIC_NAMES

    valid = list(dict.fromkeys([*METRIC_NAMES, *(k for r in records for k in r.metrics)]))
    if not metrics:
        raise ConfigError(f"'--metrics': no metric named; valid: {', '.join(valid)}")
    for m in metrics:
        if m not in valid:
            raise ConfigError(f"'--metrics': unknown metric '{m}'" + suggest(m, valid) + f"; valid: {', '.join(valid)}")


@dataclass
class Table:
    metrics: tuple[str, ...]
    columns: list[str]
    rows: list[tuple[str, str]]                            # (domain, dataset row label or '<domain> average')
    cells: dict[tuple[str, str], list[Optional[tuple[float, Optional[float]]]]]  # (row, col) -> per metric
    subset_rows: tuple[str, ...] = ()                      # rows of datasets evaluated on part of their classes


def _value(v) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _row_labels(records: Sequence[Record]) -> list[str]:
    """Each record's row. Different class subsets of one dataset with the same count would share a
    label (and be averaged together): those also name their classes."""
    subsets: dict[str, set] = {}
    for r in records:
        if r.subset:
            subsets.setdefault(r.row_label(), set()).add(tuple(sorted(r.classes)))
    return [r.row_label(name_classes=r.subset and len(subsets[r.row_label()]) > 1) for r in records]


def _mean_std(vals: list[Optional[float]]) -> Optional[tuple[float, Optional[float]]]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None


def build(records: Sequence[Record], metrics: Sequence[str], axis: str = "method",
          columns: Optional[Sequence[str]] = None) -> Table:
    """The table. A dataset evaluated on a subset of its classes gets its own row, labelled with the
    share of classes, and is never part of a domain average (it is not the dataset the average of
    other methods or papers stands for)."""
    check_metrics(metrics, records)
    cols = list(columns) if columns else list(dict.fromkeys(str(getattr(r, axis)) for r in records))
    labels = _row_labels(records)
    domains: dict[str, list[str]] = {}
    subset_rows: list[str] = []
    for r, label in zip(records, labels):
        domains.setdefault(r.domain, [])
        if label not in domains[r.domain]:
            domains[r.domain].append(label)
        if r.subset and label not in subset_rows:
            subset_rows.append(label)
    order = sorted(domains, key=lambda d: (DOMAIN_ORDER.index(d) if d in DOMAIN_ORDER else 9, d))
    rows, cells = [], {}
    for dom in order:
        for row in domains[dom]:
            for c in cols:
                mine = [r for r, label in zip(records, labels) if label == row and str(getattr(r, axis)) == c]
                cells[(row, c)] = [_mean_std([_value(r.metrics.get(m)) for r in mine]) for m in metrics]
        # The domain's full datasets, their average, then the subsets (after the average they are not in).
        full = [row for row in domains[dom] if row not in subset_rows]
        rows += [(dom, row) for row in full]
        if full:
            rows.append((dom, f"{dom} average"))
            for c in cols:
                per_metric = []
                for i in range(len(metrics)):
                    vals = [cells[(row, c)][i][0] for row in full if cells[(row, c)][i] is not None]
                    # An average over fewer datasets than the domain has would not be comparable.
                    per_metric.append((statistics.fmean(vals), None) if len(vals) == len(full) else None)
                cells[(f"{dom} average", c)] = per_metric
        rows += [(dom, row) for row in domains[dom] if row in subset_rows]
    return Table(tuple(metrics), cols, rows, cells, tuple(subset_rows))


def _fmt(v: Optional[tuple[float, Optional[float]]], bold: bool, fmt: str) -> str:
    if v is None:
        return "-"
    s = f"{100 * v[0]:.1f}" + (f"±{100 * v[1]:.1f}" if v[1] is not None else "")
    if bold:
        return {"md": f"**{s}**", "tex": f"\\textbf{{{s}}}"}.get(fmt, s)
    return s


def _best(table: Table, row: str, i: int) -> Optional[float]:
    vals = [table.cells[(row, c)][i][0] for c in table.columns if table.cells[(row, c)][i] is not None]
    return max(vals) if len(vals) > 1 else None


def render(table: Table, fmt: str = "md") -> str:
    if fmt == "json":
        return json.dumps({"metrics": table.metrics, "columns": table.columns, "subset_rows": list(table.subset_rows),
                           "rows": [{"domain": d, "dataset": r, **{c: table.cells[(r, c)] for c in table.columns}}
                                    for d, r in table.rows]}, indent=2)
    head = ["domain", "dataset", *table.columns]
    body = []
    for dom, row in table.rows:
        cells = []
        for c in table.columns:
            parts = []
            for i, v in enumerate(table.cells[(row, c)]):
                best = _best(table, row, i)
                parts.append(_fmt(v, best is not None and v is not None and v[0] == best, fmt))
            cells.append(" / ".join(parts))
        body.append([dom, row, *cells])
    caption = " / ".join(table.metrics) + " (x100; mean±std over seeds; '-' = missing)"
    if table.subset_rows:
        caption += ("; 'k/n classes': evaluated on k of the dataset's n classes only, left out of the "
                    "domain average")
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(head)
        w.writerows(body)
        return buf.getvalue()
    if fmt == "tex":
        lines = ["\\begin{tabular}{ll" + "c" * len(table.columns) + "}", "\\toprule",
                 " & ".join(_tex(h) for h in head) + " \\\\", "\\midrule"]
        for r in body:
            lines.append(" & ".join(_tex(x) if not x.startswith("\\textbf") else x for x in r) + " \\\\")
            if r[1].endswith("average"):
                lines.append("\\midrule")
        lines += ["\\bottomrule", "\\end{tabular}", f"% {caption}"]
        return "\n".join(lines)
    if fmt != "md":
        raise ValueError(f"unknown table format '{fmt}' (md, csv, tex, json)")
    out = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    out += [f"| {' | '.join(r)} |" for r in body]
    return "\n".join(out) + f"\n\n{caption}\n"


def _tex(s: str) -> str:
    return s.replace("_", "\\_").replace("±", "$\\pm$").replace("%", "\\%")


def plot(table: Table, path: str | Path, metric_index: int = 0) -> Path:
    """Grouped bar chart of one metric: a group per dataset row, a bar per column (PIL only)."""
    from PIL import Image, ImageDraw

    rows = [r for _, r in table.rows]
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    bar, h, top, left = 14, 300, 30, 50
    gap = max(16, 84 - len(table.columns) * bar)   # room for the row label under each group
    width = left + len(rows) * (len(table.columns) * bar + gap) + 180
    img = Image.new("RGB", (width, h + top + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), f"{table.metrics[metric_index]} (x100)", fill="black")
    for y in range(0, 101, 25):
        yy = top + h - int(h * y / 100)
        d.line([(left - 4, yy), (width - 180, yy)], fill=(220, 220, 220))
        d.text((8, yy - 6), str(y), fill="black")
    x = left
    for r in rows:
        for j, c in enumerate(table.columns):
            v = table.cells[(r, c)][metric_index]
            if v is not None:
                d.rectangle([x, top + h - int(h * v[0]), x + bar - 2, top + h], fill=colours[j % len(colours)])
            x += bar
        d.text((x - len(table.columns) * bar, top + h + 6), r.replace(" average", " avg")[:14], fill="black")
        x += gap
    for j, c in enumerate(table.columns):
        d.rectangle([width - 170, top + 18 * j, width - 160, top + 18 * j + 10], fill=colours[j % len(colours)])
        d.text((width - 155, top + 18 * j - 2), c[:24], fill="black")
    from zsadx.files import atomic_target

    path = Path(path)
    with atomic_target(path) as tmp:
        img.save(tmp, format="PNG")
    return path
