"""Paper-style results tables from finished evaluation cells (or any folder of results files).

Rows: datasets grouped by domain (industrial first), with a per-domain average row; columns: one
axis of the cells (method by default; or train_set, shots, seed); each cell: the chosen metrics
(e.g. image AUROC / AP) as mean over seeds (with std when there are several), x100. The best value
per row and metric is bold. Missing cells (not run, failed, undefined metric) show as '-'. A
dataset evaluated on a subset of its classes (a partial download, ``--classes``) is a row of its
own, ``mvtec-ad (2/15 classes)``, left out of the domain average.
Formats: md, csv, tex, json; ``plot`` draws a grouped bar chart (PNG) of the first metric.

Per-class tables (``zsadx table --per-class``, as papers' appendices print them): rows are the
classes of each dataset, then the dataset's mean row (the results files' mean over classes);
columns are the axis values (methods) x the metrics.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

DOMAIN_ORDER = ("industrial", "medical")

log = logging.getLogger(__name__)


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
    per_class: dict = field(default_factory=dict)   # class -> metrics, as the results file holds them

    def row_label(self, name_classes: bool = False) -> str:
        """The table row: the dataset, or the dataset with how many (and which) of its classes were evaluated."""
        if not self.subset:
            return self.dataset
        names = f": {', '.join(sorted(self.classes))}" if name_classes else ""
        return f"{self.dataset} ({len(self.classes)}/{self.n_catalog or '?'} classes{names})"


def _coverage(res: dict) -> dict:
    """Record fields on class coverage from a results file (older files lack them: a full set)."""
    catalog = res.get("catalog_classes") or []
    return {"classes": tuple(res.get("classes") or ()), "n_catalog": len(catalog), "subset": bool(res.get("subset")),
            "per_class": res.get("per_class") or {}}


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


def read_json(path: Path, what: Optional[str] = None) -> Optional[dict]:
    """A JSON object, or None (with a warning naming the file when ``what`` says what it is): one
    cut-off marker (a killed job, a full disk) leaves that cell out instead of failing a whole table,
    figure or report."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        if what:
            log.warning("%s %s is unreadable (%s): left out; `zsadx grid status` shows the cell", what, path,
                        type(exc).__name__)
        return None
    return data if isinstance(data, dict) else None


def collect(root: str | Path) -> list[Record]:
    """Finished cells under a grid folder (cell markers), else plain results files of ``zsadx eval``."""
    root = Path(root)
    records = []
    markers = sorted(root.rglob("cell.json"))
    if markers:
        for m in markers:
            data = read_json(m, "cell marker")
            if not data or data.get("status") != "done" or not data.get("result"):
                continue
            cell = parse_cell_id(str(data.get("id", "")))
            if cell is None:
                continue
            method, train_set, dataset, seed, shots = cell
            res = read_json(Path(data["result"]), f"results file of cell {data['id']}")
            if not res or "mean" not in res:
                continue
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


def _columns(records: Sequence[Record], axis: str, columns: Optional[Sequence[str]]) -> list[str]:
    return list(columns) if columns else list(dict.fromkeys(str(getattr(r, axis)) for r in records))


def _datasets_by_domain(records: Sequence[Record], labels: Sequence[str]) -> dict[str, list[str]]:
    """Domain -> its dataset rows (in the records' order), the domains industrial first."""
    domains: dict[str, list[str]] = {}
    for r, label in zip(records, labels):
        domains.setdefault(r.domain, [])
        if label not in domains[r.domain]:
            domains[r.domain].append(label)
    order = sorted(domains, key=lambda d: (DOMAIN_ORDER.index(d) if d in DOMAIN_ORDER else 9, d))
    return {d: domains[d] for d in order}


def build(records: Sequence[Record], metrics: Sequence[str], axis: str = "method",
          columns: Optional[Sequence[str]] = None) -> Table:
    """The table. A dataset evaluated on a subset of its classes gets its own row, labelled with the
    share of classes, and is never part of a domain average (it is not the dataset the average of
    other methods or papers stands for)."""
    check_metrics(metrics, records)
    cols = _columns(records, axis, columns)
    labels = _row_labels(records)
    domains = _datasets_by_domain(records, labels)
    subset_rows = list(dict.fromkeys(label for r, label in zip(records, labels) if r.subset))
    rows, cells = [], {}
    for dom in domains:
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


# ------------------------------------------------------------------------------------------
# Per-class tables
# ------------------------------------------------------------------------------------------

Value = Optional[tuple[float, Optional[float]]]   # mean (and std over seeds) of one metric


@dataclass
class ClassTable:
    metrics: tuple[str, ...]
    columns: list[str]
    rows: list[tuple[str, str, Optional[str]]]          # (domain, dataset row label, class; None: the mean row)
    cells: dict[tuple[str, Optional[str], str], list[Value]]   # (dataset, class, column) -> per metric


def build_per_class(records: Sequence[Record], metrics: Sequence[str], axis: str = "method",
                    columns: Optional[Sequence[str]] = None) -> ClassTable:
    """Rows: each dataset's classes (as its results files list them), then its mean row -- the
    results files' own mean over classes, so the row equals the dataset's row of :func:`build`."""
    check_metrics(metrics, records)
    cols = _columns(records, axis, columns)
    labels = _row_labels(records)
    subsets = {label for r, label in zip(records, labels) if r.subset}
    rows, cells = [], {}
    for dom, datasets in _datasets_by_domain(records, labels).items():
        for ds in sorted(datasets, key=lambda d: d in subsets):   # as in build: the subsets after the full sets
            mine = [r for r, label in zip(records, labels) if label == ds]
            classes = list(dict.fromkeys(c for r in mine for c in r.per_class))
            for c in [*classes, None]:
                rows.append((dom, ds, c))
                for col in cols:
                    chosen = [r for r in mine if str(getattr(r, axis)) == col]
                    values = [r.metrics if c is None else r.per_class.get(c, {}) for r in chosen]
                    cells[(ds, c, col)] = [_mean_std([_value(v.get(m)) for v in values]) for m in metrics]
    return ClassTable(tuple(metrics), cols, rows, cells)


def render_per_class(table: ClassTable, fmt: str = "md") -> str:
    if fmt == "json":
        return json.dumps({"metrics": table.metrics, "columns": table.columns,
                           "rows": [{"domain": d, "dataset": ds, "class": c if c is not None else "mean",
                                     "mean_row": c is None, **{col: table.cells[(ds, c, col)] for col in table.columns}}
                                    for d, ds, c in table.rows]}, indent=2)
    body = []
    for _, ds, c in table.rows:
        values = [table.cells[(ds, c, col)] for col in table.columns]
        shown = []
        for i in range(len(table.metrics)):
            best = _best_of([v[i] for v in values])
            shown.append([_fmt(v[i], best is not None and v[i] is not None and v[i][0] == best, fmt) for v in values])
        # columns: method-major (each method's metrics side by side)
        body.append([ds, c if c is not None else "mean", *(shown[i][j] for j in range(len(table.columns))
                                                          for i in range(len(table.metrics)))])
    caption = (" / ".join(table.metrics) + " per class (x100; mean±std over seeds; '-' = missing); 'mean': "
               "the results files' mean over the dataset's classes")
    if fmt == "csv":
        return _csv([["dataset", "class", *(f"{col} {m}" for col in table.columns for m in table.metrics)], *body])
    # Printed tables name each dataset once, on its first class's row.
    body = [[r[0] if i == 0 or body[i - 1][0] != r[0] else "", *r[1:]] for i, r in enumerate(body)]
    if fmt == "tex":
        return _tex_per_class(table, body, caption)
    if fmt != "md":
        raise ValueError(f"unknown table format '{fmt}' (md, csv, tex, json)")
    head = ["dataset", "class", *(f"{col} {m}" for col in table.columns for m in table.metrics)]
    out = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    out += [f"| {' | '.join(r)} |" for r in body]
    return "\n".join(out) + f"\n\n{caption}\n"


def _tex_per_class(table: ClassTable, body: list[list[str]], caption: str) -> str:
    k = len(table.metrics)
    groups = " & ".join(f"\\multicolumn{{{k}}}{{c}}{{{_tex(col)}}}" for col in table.columns)
    rules = "".join(f"\\cmidrule(lr){{{3 + j * k}-{2 + (j + 1) * k}}}" for j in range(len(table.columns)))
    lines = ["\\begin{tabular}{ll" + "c" * (k * len(table.columns)) + "}", "\\toprule",
             f" & & {groups} \\\\", rules,
             " & ".join(["dataset", "class", *(_tex(m) for _ in table.columns for m in table.metrics)]) + " \\\\",
             "\\midrule"]
    for r in body:
        if r[1] == "mean":
            lines.append("\\cmidrule(lr){2-" + str(2 + k * len(table.columns)) + "}")
        lines.append(" & ".join(_tex(x) if not x.startswith("\\textbf") else x for x in r) + " \\\\")
        if r[1] == "mean":
            lines.append("\\midrule")
    lines[-1] = "\\bottomrule"
    lines += ["\\end{tabular}", f"% {caption}"]
    return "\n".join(lines)


def _csv(rows: list[list[str]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _best_of(values: Sequence[Value]) -> Optional[float]:
    """The highest mean, when at least two values compete."""
    vals = [v[0] for v in values if v is not None]
    return max(vals) if len(vals) > 1 else None


def _fmt(v: Optional[tuple[float, Optional[float]]], bold: bool, fmt: str) -> str:
    if v is None:
        return "-"
    s = f"{100 * v[0]:.1f}" + (f"±{100 * v[1]:.1f}" if v[1] is not None else "")
    if bold:
        return {"md": f"**{s}**", "tex": f"\\textbf{{{s}}}"}.get(fmt, s)
    return s


def _best(table: Table, row: str, i: int) -> Optional[float]:
    return _best_of([table.cells[(row, c)][i] for c in table.columns])


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
        return _csv([head, *body])
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
