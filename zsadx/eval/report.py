"""``zsadx report GRID --out DIR``: one static, self-contained HTML page of a grid's results.

No server, no CDN: the CSS and the script are in the page, images (the bar charts, the qualitative
figure) are data: URIs, so ``DIR/index.html`` can be opened from disk, mailed or archived. The page
holds the results table (the same table as ``zsadx table``: sortable by a click on a header, metric
columns chosen by check boxes), a view per domain (or of the domain averages only), the per-class
tables, the plots, the qualitative figure and every cell's status, config, code version and log.

The page's state lives in the URL hash (``#sort=-0:image_auroc&metrics=image_auroc&view=medical``):
a header is a link to the hash that sorts by it (``pc=`` for the per-class tables, which sort
together), a check box or the view menu rewrites the hash,
and the script applies whatever hash the page is opened with. Sorting by ``-KEY`` is descending;
missing values ('-') stay last either way.

Every string read from a file (dataset, method, class and metric names, configs, errors, paths) is
HTML-escaped before it reaches the page; numbers travel in ``data-mean`` / ``data-std`` attributes
as Python writes them (``repr``), so a reader of the DOM gets the values ``zsadx table --format
json`` prints.
"""
from __future__ import annotations

import argparse
import base64
import math
import os
import tempfile
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote

from zsadx.errors import UserError
from zsadx.eval import tables

PAGE = "index.html"
GENERATOR = "zsadx report"       # the page's <meta name="generator">: a page zsadx may replace
DEFAULT_CHECKED = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")   # `zsadx table`'s default


class ReportError(UserError):
    pass


# ------------------------------------------------------------------------------------------
# What the page shows about each cell
# ------------------------------------------------------------------------------------------

@dataclass
class CellInfo:
    id: str
    status: str
    error: Optional[str] = None
    seconds: Optional[float] = None
    code_version: Optional[str] = None
    config: Optional[str] = None                          # the cell's resolved config (YAML text)
    logs: list[tuple[str, Path]] = field(default_factory=list)   # (label, file)


def _read_text(path: Path) -> Optional[str]:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _eval_config_and_code(marker: dict, folder: Path) -> tuple[Optional[str], Optional[str]]:
    """An evaluation cell's ``{stem}.config.yaml`` (saved beside its results) and the results' code
    version. Only from the cell's own folder: a marker naming a file elsewhere shows nothing of it."""
    if not isinstance(marker.get("result"), str):
        return None, None
    result = Path(marker["result"])
    if not result.resolve().is_relative_to(folder.resolve()):
        return None, None
    res = tables.read_json(result) or {}
    return _read_text(result.with_name(result.stem + ".config.yaml")), res.get("code_version")


def _train_config_and_code(folder: Path) -> tuple[Optional[str], Optional[str]]:
    """A training cell's ``train.yaml`` and the code version its run recorded in ``run/run.json``."""
    run = tables.read_json(folder / "run" / "run.json") or {}
    return _read_text(folder / "train.yaml"), run.get("code_version")


def cell_info(marker_file: Path) -> CellInfo:
    """One cell from its marker; a marker that cannot be read is a cell with status 'unreadable'."""
    folder = marker_file.parent
    marker = tables.read_json(marker_file)
    if marker is None:
        return CellInfo(str(folder), "unreadable", error=f"{marker_file}: not a JSON object")
    cell_id = str(marker.get("id") or folder)
    config, code = (_train_config_and_code(folder) if cell_id.startswith("train/")
                    else _eval_config_and_code(marker, folder))
    logs = [(label, Path(marker[k])) for k, label in (("log", "job log"), ("log_file", "training log"))
            if isinstance(marker.get(k), str)]
    seconds = marker.get("seconds") if isinstance(marker.get("seconds"), (int, float)) else None
    return CellInfo(cell_id, str(marker.get("status") or "unknown"), marker.get("error"), seconds, code, config, logs)


def collect_cells(root: Path, states: Optional[dict[str, str]] = None) -> list[CellInfo]:
    """Every cell with a marker under a grid folder, in id order (training cells first). ``states``
    (cell id -> state, from the grid's plan) overrides what the markers say (a 'running' cell whose
    process is gone is 'lost', a done one whose config changed 'stale') and adds the planned cells
    that have no marker yet."""
    cells = {c.id: c for c in map(cell_info, Path(root).rglob("cell.json"))}
    for cell_id, state in (states or {}).items():
        cells.setdefault(cell_id, CellInfo(cell_id, state)).status = state
    return sorted(cells.values(), key=lambda c: (not c.id.startswith("train/"), c.id))


# ------------------------------------------------------------------------------------------
# HTML pieces
# ------------------------------------------------------------------------------------------

def _attr(value) -> str:
    return escape(str(value), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _number(v: Optional[float]) -> str:
    """A value as Python writes it (what ``json.dumps`` prints), '' for a missing one."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))


def _sort_link(key: str, label: str, descending_first: bool, param: str = "sort") -> str:
    """A header link to the hash that sorts by ``key``: ``sort`` for the results table, ``pc`` for
    the per-class tables (all sorted alike: they share columns)."""
    first = f"-{key}" if descending_first else key
    return f'<a class="sort" href="#{param}={_attr(quote(first, safe=""))}">{label}</a>'


def metric_key(column_index: int, metric: str) -> str:
    """The sort key of one table column: the axis value's index and the metric."""
    return f"{column_index}:{metric}"


def short_metric(metric: str) -> str:
    """A header's label as papers print it (image_auroc -> I-AUROC, pixel_f1_max -> P-F1-MAX)."""
    for prefix, letter in (("image_", "I-"), ("pixel_", "P-")):
        if metric.startswith(prefix):
            return letter + metric.removeprefix(prefix).replace("_", "-").upper()
    return metric


def _grouped_head(first: Sequence[str], columns: Sequence[str], metrics: Sequence[str], param: str) -> str:
    """Two header rows: ``first`` (spanning both), a group per axis value, then one header per
    metric of each group: a link that sorts by it, through the hash parameter ``param``."""
    top = [*first, *(f'<th class="group" colspan="{len(metrics)}" data-group="{j}">{escape(col)}</th>'
                     for j, col in enumerate(columns))]
    metric_row = []
    for j, col in enumerate(columns):
        for i, m in enumerate(metrics):
            key = metric_key(j, m)
            label = _sort_link(key, escape(short_metric(m)), True, param)
            metric_row.append(f'<th class="m{i}" data-key="{_attr(key)}" data-column="{_attr(col)}" data-group="{j}" '
                              f'data-metric="{_attr(m)}" title="{_attr(m)}">{label}</th>')
    return "<thead><tr>" + "".join(top) + "</tr><tr>" + "".join(metric_row) + "</tr></thead>"


def _value_cell(v: tables.Value, i: int, best: Optional[float], key: Optional[str] = None) -> str:
    """One metric's cell: the table's text (bold when best), the numbers in data-mean / data-std."""
    is_best = best is not None and v is not None and v[0] == best
    text = escape(tables._fmt(v, False, "csv"))
    mean, std = (v if v is not None else (None, None))
    key_attr = f' data-key="{_attr(key)}"' if key else ""
    return (f'<td class="m{i}{" best" if is_best else ""}"{key_attr} data-mean="{_number(mean)}" '
            f'data-std="{_number(std)}">{f"<b>{text}</b>" if is_best else text}</td>')


def results_table(table: tables.Table) -> str:
    first = [f'<th rowspan="2" data-key="domain">{_sort_link("domain", "domain", False)}</th>',
             f'<th rowspan="2" data-key="dataset">{_sort_link("dataset", "dataset", False)}</th>']
    rows = []
    for dom, row in table.rows:
        kind = "avg" if row == f"{dom} average" else ("subset" if row in table.subset_rows else "dataset")
        tds = [f'<td data-key="domain">{escape(dom)}</td>', f'<td data-key="dataset">{escape(row)}</td>']
        tds += [_value_cell(table.cells[(row, col)][i], i, tables._best(table, row, i), metric_key(j, m))
                for j, col in enumerate(table.columns) for i, m in enumerate(table.metrics)]
        rows.append(f'<tr class="{kind}" data-domain="{_attr(dom)}">' + "".join(tds) + "</tr>")
    head = _grouped_head(first, table.columns, table.metrics, "sort")
    return f'<table id="results">{head}<tbody>' + "\n".join(rows) + "</tbody></table>"


def per_class_tables(table: tables.ClassTable) -> str:
    """The per-class view (``zsadx table --per-class``): a table per dataset, its classes then its
    mean row; the metric check boxes apply here too, and a header sorts every table's classes by
    it (the mean row stays last)."""
    datasets = list(dict.fromkeys((dom, ds) for dom, ds, _ in table.rows))
    first = [f'<th rowspan="2" data-key="class">{_sort_link("class", "class", False, "pc")}</th>']
    parts = []
    for dom, ds in datasets:
        classes = [c for d, name, c in table.rows if name == ds and d == dom]
        trs = []
        for c in classes:
            values = [table.cells[(ds, c, col)] for col in table.columns]
            bests = [tables._best_of([v[i] for v in values]) for i in range(len(table.metrics))]
            tds = "".join(_value_cell(v[i], i, bests[i]) for v in values for i in range(len(table.metrics)))
            label = "mean" if c is None else c
            kind = "avg" if c is None else "class"
            trs.append(f'<tr class="{kind}"><td class="class">{escape(label)}</td>{tds}</tr>')
        n = len(classes) - 1
        parts.append(f'<details class="per-class" data-domain="{_attr(dom)}" data-dataset="{_attr(ds)}" open>'
                     f"<summary>{escape(ds)} ({escape(dom)}, {n} class{'es' if n != 1 else ''})</summary>"
                     f'<table class="per-class">{_grouped_head(first, table.columns, table.metrics, "pc")}'
                     "<tbody>" + "".join(trs) + "</tbody></table></details>")
    return "".join(parts)


def metric_boxes(table: tables.Table) -> str:
    shown = [m for m in table.metrics if m in DEFAULT_CHECKED] or list(table.metrics)
    boxes = [f'<label><input type="checkbox" class="metric-box" data-metric="{_attr(m)}" data-index="{i}"'
             f'{" data-default checked" if m in shown else ""}> {escape(m)}</label>'
             for i, m in enumerate(table.metrics)]
    return '<div id="metric-boxes">metrics: ' + " ".join(boxes) + "</div>"


def view_menu(table: tables.Table) -> str:
    domains = list(dict.fromkeys(d for d, _ in table.rows))
    options = [("all", "all datasets"), ("averages", "domain averages only"), *((d, f"{d} only") for d in domains)]
    opts = "".join(f'<option value="{_attr(v)}">{escape(label)}</option>' for v, label in options)
    return f'<label>view: <select id="view">{opts}</select></label>'


def plots(table: tables.Table) -> str:
    """One bar chart per metric (``tables.plot``), shown while its metric is checked."""
    figures = []
    with tempfile.TemporaryDirectory(prefix="zsadx-report-") as tmp:
        for i, m in enumerate(table.metrics):
            png = tables.plot(table, Path(tmp) / f"{i}.png", metric_index=i).read_bytes()
            figures.append(f'<figure class="m{i}"><img alt="{_attr(m)} bar chart" src="{_data_uri(png)}">'
                           f'<figcaption>{escape(m)} (x100)</figcaption></figure>')
    return "".join(figures)


def _link(label: str, target: Path, out_dir: Path) -> str:
    """A link to a file, relative to the page (the page and the grid move together)."""
    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(out_dir))
    missing = "" if target.is_file() else ' <span class="missing">(missing)</span>'
    return f'<a href="{_attr(quote(rel))}">{escape(label)}</a>{missing}'


def cells_table(cells: Sequence[CellInfo], out_dir: Path) -> str:
    head = "<tr><th>cell</th><th>status</th><th>seconds</th><th>code version</th><th>log</th><th>config</th></tr>"
    rows = []
    for c in cells:
        error = f'<div class="error">{escape(str(c.error))}</div>' if c.error else ""
        logs = " ".join(_link(label, path, out_dir) for label, path in c.logs) or "-"
        config = (f"<details><summary>config</summary><pre>{escape(c.config)}</pre></details>" if c.config else "-")
        rows.append(f'<tr class="cell" data-status="{_attr(c.status)}"><td class="id">{escape(c.id)}</td>'
                    f'<td class="status {_attr(c.status)}">{escape(c.status)}{error}</td>'
                    f'<td>{"-" if c.seconds is None else escape(str(c.seconds))}</td>'
                    f'<td class="code">{escape(c.code_version or "-")}</td><td>{logs}</td><td>{config}</td></tr>')
    return f'<table id="cells"><thead>{head}</thead><tbody>' + "\n".join(rows) + "</tbody></table>"


def status_summary(cells: Sequence[CellInfo]) -> str:
    counts: dict[str, int] = {}
    for c in cells:
        counts[c.status] = counts.get(c.status, 0) + 1
    return ", ".join(f"{n} {escape(s)}" for s, n in sorted(counts.items())) or "no cells"


# ------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f6f8;vertical-align:bottom}
td[data-key=domain],td[data-key=dataset],td.class,#cells td,#cells th{text-align:left}
th a.sort{color:#124;text-decoration:none} th a.sort:hover{text-decoration:underline}
th[aria-sort=ascending] a.sort::after{content:" \\25B2"} th[aria-sort=descending] a.sort::after{content:" \\25BC"}
.metric{font-weight:normal;color:#555;font-size:12px} tr.avg td{background:#f8f8f0;font-style:italic}
tr.subset td{color:#666} td.best{background:#e8f4e8} .controls{margin:6px 0} .controls label{margin-right:12px}
#plots figure{display:inline-block;vertical-align:top;margin:6px 12px 6px 0;max-width:48%}
figcaption{font-size:12px;color:#555} td,th{white-space:nowrap} th.group{text-align:center}
img{max-width:100%} .status.done{color:#161} .status.failed,.status.lost,.status.unreadable{color:#a11}
.error{font-size:12px;color:#a11;white-space:pre-wrap} pre{font-size:12px;max-height:300px;overflow:auto}
.missing{color:#a11;font-size:12px} .note{color:#555}
"""

# The page's behaviour: apply the hash on load and on every change; controls only rewrite the hash.
SCRIPT = r"""
(function () {
  var table = document.getElementById('results');
  if (!table) return;
  var groups = Array.prototype.slice.call(document.querySelectorAll('th.group'));
  var original = Array.prototype.slice.call(table.tBodies[0].rows);
  var boxes = Array.prototype.slice.call(document.querySelectorAll('.metric-box'));
  var view = document.getElementById('view');
  function state() {
    var p = new URLSearchParams(location.hash.slice(1));
    return {sort: p.get('sort') || '', pc: p.get('pc') || '', view: p.get('view') || 'all',
            metrics: p.has('metrics') ? p.get('metrics').split(',').filter(Boolean) : null};
  }
  function hashOf(s) {
    var p = new URLSearchParams();
    if (s.sort) p.set('sort', s.sort);
    if (s.pc) p.set('pc', s.pc);
    if (s.metrics) p.set('metrics', s.metrics.join(','));
    if (s.view && s.view !== 'all') p.set('view', s.view);
    return '#' + p.toString();
  }
  function sortValue(cell) {  // [missing?, value]: numbers from data-mean, text otherwise
    if (cell.hasAttribute('data-mean')) {
      var v = cell.getAttribute('data-mean');
      return v === '' ? null : parseFloat(v);
    }
    return cell.textContent;
  }
  // A table whose header links sort its rows through the hash parameter `param`; rows of class
  // `pinned` (the per-class tables' mean row) keep their place at the end.
  function sorter(el, param, pinned) {
    var heads = Array.prototype.slice.call(el.tHead.querySelectorAll('th[data-key]'));  // a row's cells, in order
    var body = el.tBodies[0], rows0 = Array.prototype.slice.call(body.rows);
    function columnOf(key) {
      for (var i = 0; i < heads.length; i++) if (heads[i].dataset.key === key) return i;
      return -1;
    }
    return function (s) {
      var spec = s[param], desc = spec.charAt(0) === '-', col = columnOf(desc ? spec.slice(1) : spec);
      var isPinned = function (r) { return pinned !== null && r.classList.contains(pinned); };
      var free = rows0.filter(function (r) { return !isPinned(r); }), last = rows0.filter(isPinned);
      if (col >= 0) {
        var keyed = free.map(function (r, i) { return [sortValue(r.cells[col]), i, r]; });
        keyed.sort(function (a, b) {  // missing values last, ties in the table's order
          if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null) || a[1] - b[1];
          var c = typeof a[0] === 'number' ? a[0] - b[0] : a[0].localeCompare(b[0]);
          return (desc ? -c : c) || a[1] - b[1];
        });
        free = keyed.map(function (x) { return x[2]; });
      }
      free.concat(last).forEach(function (r) { body.appendChild(r); });
      for (var i = 0; i < heads.length; i++) {
        var th = heads[i], key = th.dataset.key, link = th.querySelector('a.sort');
        var on = i === col, numeric = th.hasAttribute('data-metric');
        th.removeAttribute('aria-sort');
        if (on) th.setAttribute('aria-sort', desc ? 'descending' : 'ascending');
        var next = Object.assign({}, s);
        next[param] = on ? (desc ? key : '-' + key) : (numeric ? '-' + key : key);
        link.setAttribute('href', hashOf(next));
      }
    };
  }
  var sorters = [sorter(table, 'sort', null)].concat(Array.prototype.map.call(
    document.querySelectorAll('table.per-class'), function (t) { return sorter(t, 'pc', 'avg'); }));
  function showMetrics(chosen) {
    boxes.forEach(function (b) {
      var shown = chosen === null ? b.hasAttribute('data-default') : chosen.indexOf(b.dataset.metric) >= 0;
      b.checked = shown;
      b.toggleAttribute('checked', shown);  // the attribute too: a dumped DOM shows the state
      document.querySelectorAll('.m' + b.dataset.index).forEach(function (el) {
        el.style.display = shown ? '' : 'none';
      });
    });
    groups.forEach(function (g) {  // a column's group header spans its shown metrics
      var mine = g.parentNode.parentNode.querySelectorAll('th[data-metric]');
      var n = Array.prototype.filter.call(mine, function (th) {
        return th.dataset.group === g.dataset.group && th.style.display !== 'none';
      }).length;
      g.colSpan = Math.max(n, 1);
      g.style.display = n ? '' : 'none';
    });
  }
  function showView(v) {
    var known = Array.prototype.some.call(view.options, function (o) { return o.value === v; });
    if (!known) v = 'all';  // a hash from another grid's page
    view.value = v;
    Array.prototype.forEach.call(view.options, function (o) { o.toggleAttribute('selected', o.value === v); });
    original.forEach(function (r) {
      var shown = v === 'all' || (v === 'averages' ? r.classList.contains('avg') : r.dataset.domain === v);
      r.style.display = shown ? '' : 'none';
    });
    document.querySelectorAll('details.per-class').forEach(function (d) {  // the domain's per-class tables
      d.style.display = v === 'all' || v === 'averages' || d.dataset.domain === v ? '' : 'none';
    });
  }
  function apply() {
    var s = state();
    sorters.forEach(function (sortBy) { sortBy(s); });
    showMetrics(s.metrics);
    showView(s.view);
    document.body.setAttribute('data-applied', location.hash);
  }
  boxes.forEach(function (b) {
    b.addEventListener('change', function () {
      var s = state();
      s.metrics = boxes.filter(function (x) { return x.checked; }).map(function (x) { return x.dataset.metric; });
      location.hash = hashOf(s);
    });
  });
  view.addEventListener('change', function () { var s = state(); s.view = view.value; location.hash = hashOf(s); });
  window.addEventListener('hashchange', apply);
  apply();
})();
"""


def _section(title: str, body: str, section_id: str) -> str:
    return f'<section id="{section_id}"><h2>{escape(title)}</h2>{body}</section>'


def results_sections(table: Optional[tables.Table]) -> str:
    if table is None:
        return _section("Results", '<p class="note">no finished evaluations yet</p>', "results-section")
    caption = "x100; mean±std over seeds; best per row and metric bold; '-' = missing; click a header to sort"
    if table.subset_rows:
        caption += "; 'k/n classes': evaluated on k of the dataset's n classes, left out of the domain average"
    controls = f'<div class="controls">{metric_boxes(table)}{view_menu(table)}</div>'
    return (_section("Results", controls + results_table(table) + f'<p class="note">{caption}</p>',
                     "results-section")
            + _section("Plots", plots(table), "plots"))


def figure_section(figure_png: Optional[bytes], note: Optional[str]) -> str:
    if figure_png is None:
        return _section("Qualitative figure", f'<p class="note">{escape(note or "not drawn")}</p>', "figure")
    body = f'<img id="figure-img" alt="qualitative figure" src="{_data_uri(figure_png)}">'
    return _section("Qualitative figure", body + (f'<p class="note">{escape(note)}</p>' if note else ""), "figure")


def per_class_section(table: Optional[tables.ClassTable]) -> str:
    if table is None:
        return ""
    note = ('<p class="note">per dataset: its classes, then the mean row (the results files\' mean over '
            "classes, as in the results table); x100, mean±std over seeds; click a header to sort every "
            "dataset's classes by it (the mean row stays last)</p>")
    return _section("Per class", note + per_class_tables(table), "per-class")


def page(title: str, table: Optional[tables.Table], class_table: Optional[tables.ClassTable],
         cells: Sequence[CellInfo], out_dir: Path, figure_png: Optional[bytes] = None,
         figure_note: Optional[str] = None) -> str:
    parts = [f'<h1>{escape(title)}</h1><p class="note">cells: {status_summary(cells)}</p>',
             results_sections(table), figure_section(figure_png, figure_note), per_class_section(class_table),
             _section("Cells", cells_table(cells, out_dir), "cells-section")]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta name="generator" content="{GENERATOR}"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(p for p in parts if p)
            + f"\n<script>{SCRIPT}</script></body></html>\n")


# ------------------------------------------------------------------------------------------
# Writing it
# ------------------------------------------------------------------------------------------

def _check_replaceable(target: Path) -> None:
    """Only a page zsadx wrote is replaced: any other file of that name is the user's."""
    if not target.exists():
        return
    head = target.read_bytes()[:4096].decode("utf-8", "replace") if target.is_file() else ""
    if f'<meta name="generator" content="{GENERATOR}">' not in head:
        raise ReportError(f"{target} exists and is not a zsadx report: choose another --out folder "
                          "(zsadx replaces only pages it wrote)")


def default_metrics(records: Sequence[tables.Record]) -> list[str]:
    """Every metric zsadx computes that the results hold, in zsadx's order."""
    from zsadx.eval.metrics import METRIC_NAMES

    held = {k for r in records for k in r.metrics}
    return [m for m in METRIC_NAMES if m in held] or list(DEFAULT_CHECKED)


def build_tables(records: Sequence[tables.Record], metrics: Optional[Sequence[str]],
                 axis: str) -> tuple[Optional[tables.Table], Optional[tables.ClassTable]]:
    """The results table and the per-class table (None, None without finished evaluations)."""
    if not records:
        return None, None
    metrics = list(metrics) if metrics else default_metrics(records)
    return tables.build(records, metrics, axis), tables.build_per_class(records, metrics, axis)


@dataclass
class FigureRequest:
    dataset: Optional[str] = None   # None: the first dataset with finished cells
    images: int = 4
    seed: int = 0
    device: str = "auto"


def draw_figure_png(root: Path, request: FigureRequest) -> tuple[Optional[bytes], str]:
    """The qualitative figure (``zsadx figure``) as PNG bytes and its note; when it cannot be drawn
    (no finished cell, a method cell not done, ...), no bytes and the one-line reason: the rest of
    the report does not depend on it."""
    from zsadx.eval import figure

    dataset = request.dataset or next(iter(figure.figure_datasets(root)), None)
    if dataset is None:
        return None, "not drawn: no dataset with finished evaluation cells"
    with tempfile.TemporaryDirectory(prefix="zsadx-report-") as tmp:
        try:
            path = figure.draw_figure(root, dataset, Path(tmp) / "figure.png", images=request.images,
                                      seed=request.seed, device=request.device)
        except UserError as exc:
            return None, f"not drawn for {dataset}: {exc}"
        png = path.read_bytes()
    return png, (f"{dataset}: {request.images} anomalous test images drawn with seed {request.seed} "
                 f"(`zsadx figure {root} --dataset {dataset} --images {request.images} --seed {request.seed}`)")


def write_report(root: str | Path, out_dir: str | Path, metrics: Optional[Sequence[str]] = None,
                 axis: str = "method", title: Optional[str] = None,
                 figure: Optional[FigureRequest] = FigureRequest(),
                 states: Optional[dict[str, str]] = None) -> Path:
    """``out_dir/index.html`` for the grid (or results) folder ``root``; returns the page's path.
    ``figure=None`` leaves the qualitative figure out; ``states``: see :func:`collect_cells`."""
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise ReportError(f"{root}: no such folder (give a grid config or a grid output folder)")
    target = out_dir / PAGE
    _check_replaceable(target)
    table, class_table = build_tables(tables.collect(root), metrics, axis)
    cells = collect_cells(root, states)
    figure_png, figure_note = (draw_figure_png(root, figure) if figure is not None
                               else (None, "left out (--no-figure)"))
    html = page(title or f"zsadx report: {root}", table, class_table, cells, out_dir, figure_png, figure_note)
    out_dir.mkdir(parents=True, exist_ok=True)
    from zsadx.files import atomic_write_text

    return atomic_write_text(target, html)


# ------------------------------------------------------------------------------------------
# Command line (registered next to `zsadx table`, which resolves a grid config to its folder)
# ------------------------------------------------------------------------------------------

def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="one self-contained HTML page of a grid's results (no server needed)")
    p.add_argument("path", help="grid config (grids/NAME), grid output folder, or folder of results files")
    p.add_argument("--out", required=True, help="folder for index.html (a page zsadx wrote there is replaced)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metric columns (default: every metric the results hold; the page "
                        "selects among them)")
    p.add_argument("--columns", default="method", choices=["method", "train_set", "shots", "seed"],
                   help="which axis of the cells becomes the columns")
    p.add_argument("--title", default=None)
    p.add_argument("--figure-dataset", default=None,
                   help="dataset of the qualitative figure (default: the first with finished cells)")
    p.add_argument("--figure-images", type=int, default=4, help="rows of the qualitative figure (default 4)")
    p.add_argument("--figure-seed", type=int, default=0, help="seed of the figure's image draw (default 0)")
    p.add_argument("--device", default="auto", help="where the figure's methods run: auto, cpu, cuda")
    p.add_argument("--no-figure", action="store_true", help="leave the qualitative figure out (no model runs)")
    return p


def main(args: argparse.Namespace, root: str | Path, states: Optional[dict[str, str]] = None) -> int:
    """The command: ``root`` is the grid's output folder, ``states`` its planned cells' states (for
    a grid config; None for a folder: the markers' statuses)."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    figure = None if args.no_figure else FigureRequest(args.figure_dataset, args.figure_images, args.figure_seed,
                                                       args.device)
    path = write_report(root, args.out, metrics, args.columns, args.title, figure, states)
    print(f"report: {path}")
    return 0
