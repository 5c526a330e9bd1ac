"""Issue 20 item 4: ``zsadx report GRID --out DIR``, one self-contained HTML page, checked in a real
headless Chromium (Debian's ``chromium``): the DOM after the page's script ran, sorting through the
header links, metric and domain views, escaping of hostile names, and a screenshot."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from conftest import make_shards, one_error_line, run_cli

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium: `apt-get install -y chromium`")

# A grid label that is markup: valid as a folder name, hostile in a page that does not escape it.
HOSTILE_LABEL = 'x<img src=x onerror="document.body.setAttribute(\'data-pwned\',1)">&amp;'
METRICS = "image_auroc,image_ap,image_f1_max,pixel_auroc,pixel_ap,pixel_f1_max,pixel_aupro"


# ---- a real grid, once per module ------------------------------------------------------------

@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict:
    """Two methods (one labelled with markup) on visa and bmad-brain, local executor (cells have job
    logs); mvtec-ad's shard is broken, so its two cells fail."""
    root = tmp_path_factory.mktemp("report")
    shards = make_shards(root / "data", {"visa": 1, "bmad-brain": 1, "mvtec-ad": 1}, size=64)
    broken = sorted(shards.glob("mvtec-ad-*-test-*.tar"))[0]
    broken.write_bytes(broken.read_bytes()[:300])
    spec = {"name": "report-test", "cluster": "local", "out_dir": str(root / "out"), "shards": str(shards),
            "methods": [{"config": "methods/clip-tiny", "label": "clip"},
                        {"config": "methods/winclip-tiny", "label": HOSTILE_LABEL}],
            "test_sets": ["visa", "bmad-brain", "mvtec-ad"], "eval_overrides": ["data.num_workers=0"]}
    (root / "grid.yaml").write_text(yaml.safe_dump(spec))
    from zsadx.cli import main

    assert main(["grid", "run", str(root / "grid.yaml")]) == 1          # the two mvtec-ad cells failed
    from launch import cache

    status = {m["id"]: m["status"] for f in (root / "out").rglob("cell.json") for m in [cache.read_marker(f.parent)]}
    assert sorted(status.values()) == ["done"] * 4 + ["failed"] * 2, status
    return {"root": root, "grid": root / "grid.yaml", "out": root / "out"}


@pytest.fixture(scope="module")
def report(grid) -> Path:
    """``zsadx report`` of the grid (with a 2-image qualitative figure)."""
    from zsadx.cli import build_parser, main

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert "report" in commands, "`zsadx report` is not registered in launch/cli.py (zsadx.eval.report.add_parser)"

    page_dir = grid["root"] / "page"
    assert main(["report", str(grid["grid"]), "--out", str(page_dir), "--figure-images", "2", "--device", "cpu"]) == 0
    return page_dir / "index.html"


def table_json(capsys, path, metrics: str = METRICS, *extra: str) -> dict:
    rc, out, err = run_cli(capsys, "table", path, "--format", "json", "--metrics", metrics, *extra)
    assert rc == 0, err
    return json.loads(out)


# ---- Chromium and the DOM it dumps -------------------------------------------------------------

def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"   # one per test: parallel runs do not share a profile lock
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}", *args]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses root without it
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


class Browser:
    """Headless Chromium driven over the DevTools protocol on ``--remote-debugging-pipe`` (fd 3: our
    commands, fd 4: its replies, NUL-terminated JSON): real mouse clicks on the page."""

    def __init__(self, tmp_path: Path, width: int = 1280, height: int = 900):
        import fcntl

        cmd_r, self._cmd_w = os.pipe()
        self._reply_r, reply_w = os.pipe()

        def onto_3_and_4():  # through fds >= 10, so neither end overwrites the other
            a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(reply_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
               f"--user-data-dir={tmp_path / 'cdp-profile'}", f"--window-size={width},{height}", "about:blank"]
        if os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")
        self.proc = subprocess.Popen(cmd, pass_fds=(3, 4), preexec_fn=onto_3_and_4, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(reply_w)
        self._buf, self._id, self.session, self._events = b"", 0, None, []

    def send(self, method: str, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._id:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]
            self._events.append(reply.get("method"))

    def wait_for(self, event: str) -> None:
        while event not in self._events:
            self._events.append(self._receive().get("method"))
        self._events.remove(event)

    def _receive(self, timeout: float = 60) -> dict:
        import select

        while b"\0" not in self._buf:
            assert select.select([self._reply_r], [], [], timeout)[0], "Chromium did not answer"
            chunk = os.read(self._reply_r, 1 << 16)
            assert chunk, "Chromium closed its pipe"
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> None:
        """A new tab at ``url``, once its load event fired (its inline script has run)."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        assert self.js("location.href") == url, "the load event of another page"

    def js(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def click(self, selector: str) -> None:
        """A left click of the mouse at the middle of the element (scrolled into view)."""
        x, y = self.js(f"(function () {{ var e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
                       " var b = e.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        self.js("new Promise(r => setTimeout(r, 50))")   # let the hashchange handler run

    def dom(self) -> "Node":
        return Dom(self.js("document.documentElement.outerHTML")).root

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self._cmd_w)
            os.close(self._reply_r)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path)
    yield b
    b.close()


class Node:
    def __init__(self, tag: str, attrs: dict, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.texts = tag, attrs, parent, [], []

    def text(self) -> str:
        return "".join(t if isinstance(t, str) else t.text() for t in self.texts)

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str, **attrs) -> list["Node"]:
        return [n for n in self.iter() if n.tag == tag and all(n.attrs.get(k.replace("_", "-")) == v
                                                                  for k, v in attrs.items())]

    def find(self, tag: str, **attrs) -> "Node":
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag} {attrs}>"
        return found[0]

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def hidden(self, inherited: bool = True) -> bool:
        """display: none on the element (or an ancestor): what the page's script sets."""
        n = self
        while n is not None:
            if "display: none" in (n.attrs.get("style") or ""):
                return True
            n = n.parent if inherited else None
        return False


class Dom(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#document", {})
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        n = Node(tag, {k: ("" if v is None else v) for k, v in attrs}, self.node)
        self.node.children.append(n)
        self.node.texts.append(n)
        if tag not in self.VOID:
            self.node = n

    def handle_endtag(self, tag):
        n = self.node
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is not self.root:
            self.node = n.parent

    def handle_data(self, data):
        self.node.texts.append(data)


def dom(tmp_path: Path, page: Path, hash_: str = "") -> Node:
    out = chromium(tmp_path, "--dump-dom", page.resolve().as_uri() + hash_).stdout
    root = Dom(out).root
    assert root.find("body").attrs.get("data-applied") == hash_, "the page's script did not run"
    return root


def results_rows(root: Node) -> list[dict]:
    """The results table as the DOM holds it: per row its domain, dataset, cells and visibility."""
    table = root.find("table", id="results")
    rows = []
    for tr in table.find("tbody").find_all("tr"):
        tds = tr.find_all("td")
        rows.append({"domain": tds[0].text(), "dataset": tds[1].text(), "hidden": tr.hidden(), "cells": tds[2:]})
    return rows


def metric_heads(root: Node) -> list[Node]:
    return [th for th in root.find("table", id="results").find_all("th") if "data-metric" in th.attrs]


def expected_text(v) -> str:
    """The table's cell text, re-expressed: x100 to one decimal, ±std when there are several seeds."""
    if v is None:
        return "-"
    return f"{100 * v[0]:.1f}" + ("" if v[1] is None else f"±{100 * v[1]:.1f}")


def assert_cells_equal_json(root: Node, js: dict) -> None:
    heads = metric_heads(root)
    assert [(th.attrs["data-column"], th.attrs["data-metric"]) for th in heads] == [
        (c, m) for c in js["columns"] for m in js["metrics"]]
    rows = results_rows(root)
    assert [(r["domain"], r["dataset"]) for r in rows] == [(r["domain"], r["dataset"]) for r in js["rows"]]
    for dom_row, js_row in zip(rows, js["rows"]):
        values = [v for c in js["columns"] for v in js_row[c]]
        assert len(dom_row["cells"]) == len(values)
        for td, v in zip(dom_row["cells"], values):
            assert td.text() == expected_text(v), (js_row["dataset"], td.attrs)
            if v is None:
                assert td.attrs["data-mean"] == "" and td.attrs["data-std"] == ""
                continue
            assert float(td.attrs["data-mean"]) == pytest.approx(v[0], rel=1e-12, abs=0)
            assert (td.attrs["data-std"] == "") == (v[1] is None)


# ---- the page ----------------------------------------------------------------------------------

@needs_chromium
def test_report_table_in_chromium_equals_zsadx_table_json_and_screenshot(grid, report, tmp_path, capsys):
    root = dom(tmp_path, report)
    js = table_json(capsys, grid["grid"])
    assert js["columns"] == ["clip", HOSTILE_LABEL] and {r["dataset"] for r in js["rows"]} >= {"visa", "bmad-brain"}
    assert_cells_equal_json(root, js)
    # Shown by default: `zsadx table`'s default metrics; the others are a check box away.
    boxes = {b.attrs["data-metric"]: "checked" in b.attrs for b in root.find_all("input", type="checkbox")}
    assert boxes == {m: m in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro") for m in METRICS.split(",")}
    assert {th.attrs["data-metric"] for th in metric_heads(root) if not th.hidden()} == {
        m for m, on in boxes.items() if on}
    # A screenshot of the page as Chromium renders it: a real PNG of the window's size, not blank.
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", report.resolve().as_uri())
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1280, 900)
    lo, hi = img.getextrema()
    assert hi - lo > 100, "blank screenshot"


@needs_chromium
def test_a_header_link_sorts_descending_then_ascending_with_missing_values_last(grid, report, tmp_path, capsys):
    js = table_json(capsys, grid["grid"])
    root = dom(tmp_path, report)
    col, metric = 1, "image_ap"          # the hostile-labelled method's image AP
    th = next(t for t in metric_heads(root) if t.attrs["data-key"] == f"{col}:{metric}")
    link = th.find("a").attrs["href"]
    assert link.startswith("#sort=-")

    def expected(descending: bool) -> list[str]:
        i = js["metrics"].index(metric)
        vals = [(r["dataset"], (r[js["columns"][col]][i] or [None])[0]) for r in js["rows"]]
        known = sorted((v for v in vals if v[1] is not None), key=lambda v: v[1], reverse=descending)
        return [d for d, _ in known] + [d for d, v in vals if v is None]

    def order(r: Node) -> list[str]:
        return [row["dataset"] for row in results_rows(r)]

    desc = dom(tmp_path, report, link)
    assert order(desc) == expected(True)
    th = next(t for t in metric_heads(desc) if t.attrs["data-key"] == f"{col}:{metric}")
    assert th.attrs.get("aria-sort") == "descending"
    again = th.find("a").attrs["href"]                        # the second click: ascending
    asc = dom(tmp_path, report, again)
    assert order(asc) == expected(False)
    assert_cells_equal_json(dom(tmp_path, report), js)         # no hash: the table's own order
    by_name = dom(tmp_path, report, "#sort=dataset")
    assert order(by_name) == sorted(order(by_name))


@needs_chromium
def test_real_clicks_on_a_header_and_a_check_box(grid, report, browser, capsys):
    """Mouse clicks (DevTools Input events) on the page: a header sorts descending, a second click
    ascending; unchecking a metric hides its columns and keeps the sort, all in the URL hash."""
    js = table_json(capsys, grid["grid"])
    browser.open(report.resolve().as_uri())
    i = js["metrics"].index("image_auroc")
    values = {r["dataset"]: (r[js["columns"][0]][i] or [None])[0] for r in js["rows"]}

    def order() -> list[str]:
        return [r["dataset"] for r in results_rows(browser.dom())]

    head = 'th[data-key="0:image_auroc"] a'
    browser.click(head)
    assert unquote(browser.js("location.hash")) == "#sort=-0:image_auroc"
    assert order() == sorted(values, key=lambda d: -values[d])   # ties keep the table's order, as sorted() does
    browser.click(head)
    assert order() == sorted(values, key=lambda d: values[d])
    browser.click('input.metric-box[data-metric="image_ap"]')
    assert unquote(browser.js("location.hash")) == "#sort=0:image_auroc&metrics=image_auroc,pixel_auroc,pixel_aupro"
    root = browser.dom()
    assert [th.attrs["data-metric"] for th in metric_heads(root) if not th.hidden()] == [
        "image_auroc", "pixel_auroc", "pixel_aupro"] * len(js["columns"])
    groups = [th for th in root.find("table", id="results").find_all("th") if "group" in th.classes()]
    assert all(th.attrs["colspan"] == "3" for th in groups)              # a method spans its shown metrics
    assert order() == sorted(values, key=lambda d: values[d])             # the sort stays


@needs_chromium
def test_metric_check_boxes_and_domain_views_from_the_hash(grid, report, tmp_path, capsys):
    js = table_json(capsys, grid["grid"])
    root = dom(tmp_path, report, "#metrics=pixel_ap%2Cimage_f1_max&view=medical")
    shown = [th.attrs["data-metric"] for th in metric_heads(root) if not th.hidden()]
    assert shown == ["image_f1_max", "pixel_ap"] * len(js["columns"])
    for row in results_rows(root):
        visible = [td for td in row["cells"] if not td.hidden(inherited=False)]
        assert len(visible) == 2 * len(js["columns"])
        assert row["hidden"] == (row["domain"] != "medical")
    boxes = {b.attrs["data-metric"]: "checked" in b.attrs for b in root.find_all("input", type="checkbox")}
    assert [m for m, on in boxes.items() if on] == ["image_f1_max", "pixel_ap"]
    assert [o.attrs["value"] for o in root.find("select", id="view").find_all("option") if "selected" in o.attrs] == [
        "medical"]
    averages = dom(tmp_path, report, "#view=averages")
    assert [r["dataset"] for r in results_rows(averages) if not r["hidden"]] == [
        r["dataset"] for r in js["rows"] if r["dataset"].endswith(" average")]
    unknown = dom(tmp_path, report, "#view=another-grids-domain")               # a bookmark of another page
    assert not any(r["hidden"] for r in results_rows(unknown))


@needs_chromium
def test_per_class_view_equals_zsadx_table_per_class_json(grid, report, tmp_path, capsys):
    js = table_json(capsys, grid["grid"], METRICS, "--per-class")
    root = dom(tmp_path, report, "#view=medical")
    tables_ = root.find("section", id="per-class").find_all("details")
    assert [(d.attrs["data-domain"], d.attrs["data-dataset"]) for d in tables_] == list(
        dict.fromkeys((r["domain"], r["dataset"]) for r in js["rows"]))
    for d in tables_:
        assert d.hidden() == (d.attrs["data-domain"] != "medical")          # the domain view applies here too
        mine = [r for r in js["rows"] if r["dataset"] == d.attrs["data-dataset"]]
        trs = d.find("tbody").find_all("tr")
        assert [tr.find("td").text() for tr in trs] == [r["class"] for r in mine]
        assert mine[-1]["mean_row"] and "avg" in trs[-1].classes()
        for tr, r in zip(trs, mine):
            values = [v for c in js["columns"] for v in r[c]]
            cells = tr.find_all("td")[1:]
            assert [td.text() for td in cells] == [expected_text(v) for v in values]
            for td, v in zip(cells, values):
                assert td.attrs["data-mean"] == "" if v is None else float(td.attrs["data-mean"]) == pytest.approx(
                    v[0], rel=1e-12, abs=0)


@needs_chromium
def test_a_per_class_header_sorts_every_datasets_classes_keeping_the_mean_row_last(grid, report, tmp_path, capsys):
    """``pc=``: every per-class table sorted by that column (missing values last), the mean row
    last, the results table untouched; the header link then offers the other direction and keeps
    the results table's own sort in the hash."""
    js = table_json(capsys, grid["grid"], METRICS, "--per-class")
    col, metric = 0, "pixel_auroc"
    i = js["metrics"].index(metric)
    plain = dom(tmp_path, report)
    first = plain.find("table", **{"class": "per-class"}).find("th", **{"data-key": f"{col}:{metric}"})
    assert first.find("a").attrs["href"] == f"#pc=-{col}%3A{metric}"

    def classes(root: Node) -> dict[str, list[str]]:
        return {d.attrs["data-dataset"]: [tr.find("td").text() for tr in d.find("tbody").find_all("tr")]
                for d in root.find("section", id="per-class").find_all("details")}

    def expected(descending: bool) -> dict[str, list[str]]:
        out = {}
        for ds in dict.fromkeys(r["dataset"] for r in js["rows"]):
            mine = [r for r in js["rows"] if r["dataset"] == ds]
            vals = [(r["class"], (r[js["columns"][col]][i] or [None])[0]) for r in mine if not r["mean_row"]]
            known = sorted((v for v in vals if v[1] is not None), key=lambda v: v[1], reverse=descending)
            out[ds] = [c for c, _ in known] + [c for c, v in vals if v is None] + [mine[-1]["class"]]
        return out

    results_order = [r["dataset"] for r in results_rows(plain)]
    desc = dom(tmp_path, report, f"#sort=dataset&pc=-{col}%3A{metric}")
    assert classes(desc) == expected(True) != classes(plain)
    assert [r["dataset"] for r in results_rows(desc)] == sorted(results_order)   # its own sort, kept
    th = desc.find("table", **{"class": "per-class"}).find("th", **{"data-key": f"{col}:{metric}"})
    assert th.attrs.get("aria-sort") == "descending"
    again = th.find("a").attrs["href"]
    assert again == f"#sort=dataset&pc={col}%3A{metric}"
    assert classes(dom(tmp_path, report, again)) == expected(False)
    by_name = classes(dom(tmp_path, report, "#pc=class"))
    assert all(names[:-1] == sorted(names[:-1]) for names in by_name.values())


@needs_chromium
def test_hostile_names_are_text_not_markup(grid, report, tmp_path):
    root = dom(tmp_path, report)
    body = root.find("body")
    assert "data-pwned" not in body.attrs                           # the label's onerror never ran
    imgs = root.find_all("img")
    assert imgs and all(i.attrs["src"].startswith("data:image/png;base64,") for i in imgs)   # no <img src=x>
    groups = [th.text() for th in root.find("table", id="results").find_all("th") if "group" in th.classes()]
    assert groups == ["clip", HOSTILE_LABEL]                         # shown literally, '&amp;' included
    ids = [td.text() for td in root.find_all("td") if "id" in td.classes()]
    assert f"eval/{HOSTILE_LABEL}/zero-shot/visa/seed0" in ids


@needs_chromium
def test_every_cell_shows_status_config_code_version_and_a_relative_log_link(grid, report, tmp_path):
    from launch import cache

    root = dom(tmp_path, report)
    rows = {tr.find("td").text(): tr for tr in root.find("table", id="cells").find("tbody").find_all("tr")}
    markers = {m["id"]: (m, f) for f in grid["out"].rglob("cell.json") for m in [cache.read_marker(f.parent)]}
    assert set(rows) == set(markers) and len(rows) == 6
    for cell_id, (marker, marker_file) in markers.items():
        tr = rows[cell_id]
        status = tr.find_all("td")[1]
        assert tr.attrs["data-status"] == marker["status"]
        if marker["status"] == "failed":
            assert "mvtec-ad" in cell_id and status.find("div").text() == marker["error"]
            assert tr.find_all("td")[3].text() == "-"                # no results: no code version
        else:
            res = json.loads(Path(marker["result"]).read_text())
            assert tr.find_all("td")[3].text() == res["code_version"]
            config = Path(marker["result"]).with_name(Path(marker["result"]).stem + ".config.yaml").read_text()
            assert tr.find("pre").text() == config
        # The log link is relative to the page and reaches the job's log file.
        href = tr.find("a").attrs["href"]
        assert not urlsplit(href).scheme and not href.startswith("/")
        assert (report.parent / unquote(href)).resolve() == Path(marker["log"]).resolve()
        assert Path(marker["log"]).is_file()


def test_page_is_self_contained_no_server_no_cdn(report):
    html = report.read_text()
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    root = Dom(html).root
    assert not root.find_all("link") and all("src" not in s.attrs for s in root.find_all("script"))
    assert root.find_all("script") and root.find_all("style")                    # inline, not fetched
    for a in root.find_all("a"):
        href = a.attrs["href"]
        assert href.startswith("#") or not urlsplit(href).scheme, href                # hash or a relative file
    figure = root.find("section", id="figure")
    assert figure.find_all("img"), figure.text()                                      # the qualitative figure


# ---- a folder of results files, hostile values in them -----------------------------------------

@needs_chromium
def test_results_files_with_missing_cells_and_markup_in_a_method_name(grid, tmp_path, capsys):
    """``zsadx report`` of a plain folder of results files: a method that evaluated one dataset
    only leaves '-' cells (sorted last), and a method name holding </script> and markup stays text."""
    folder = tmp_path / "results"
    folder.mkdir()
    hostile = "</script><script>document.body.setAttribute('data-pwned','1')</script><b>bold"
    for f in grid["out"].glob("eval/clip/zero-shot/*/seed0/clip-*.json"):   # the results files (mvtec-ad failed)
        shutil.copy(f, folder / f.name)
    brain = json.loads(next(folder.glob("*-bmad-brain.json")).read_text())
    brain["config"]["method"]["name"] = hostile
    (folder / "hostile-bmad-brain.json").write_text(json.dumps(brain))
    rc, out, err = run_cli(capsys, "report", folder, "--out", tmp_path / "page", "--no-figure")
    assert rc == 0, err
    page = tmp_path / "page" / "index.html"
    js = table_json(capsys, folder)
    assert js["columns"] == ["clip", hostile]
    assert [r["dataset"] for r in js["rows"] if r[hostile][0] is None] == ["visa", "industrial average"]
    root = dom(tmp_path, page)
    assert "data-pwned" not in root.find("body").attrs
    assert not [b for b in root.find_all("b") if b.text() == "bold"]
    assert_cells_equal_json(root, js)
    # The missing values (the table's first rows) sort last, descending and ascending alike.
    for hash_ in ("#sort=-1%3Aimage_auroc", "#sort=1%3Aimage_auroc"):
        order = [r["dataset"] for r in results_rows(dom(tmp_path, page, hash_))]
        assert order == ["bmad-brain", "medical average", "visa", "industrial average"], (hash_, order)
    assert "left out (--no-figure)" in root.find("section", id="figure").text()


# ---- what is already there ---------------------------------------------------------------------

def test_a_page_zsadx_did_not_write_is_never_replaced(grid, report, tmp_path, capsys):
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("<html>my lab's home page</html>")
    rc, out, err = run_cli(capsys, "report", grid["out"], "--out", mine, "--no-figure")
    assert rc == 2
    line = one_error_line(err)
    assert str(mine / "index.html") in line and "not a zsadx report" in line
    assert (mine / "index.html").read_text() == "<html>my lab's home page</html>"
    # A page it wrote it replaces (here: a copy of the module's report, now without the figure).
    again = tmp_path / "again"
    shutil.copytree(report.parent, again)
    assert "left out (--no-figure)" not in (again / "index.html").read_text()
    rc, out, err = run_cli(capsys, "report", grid["out"], "--out", again, "--no-figure")
    assert rc == 0, err
    assert "left out (--no-figure)" in (again / "index.html").read_text()


def test_a_marker_naming_a_file_outside_its_cell_shows_nothing_of_that_file(grid, report, tmp_path, capsys):
    grid_copy = tmp_path / "grid"
    shutil.copytree(grid["out"], grid_copy, ignore=shutil.ignore_patterns("*.lock"))
    marker_file = next(grid_copy.glob("eval/clip/zero-shot/visa/seed0/cell.json"))
    marker = json.loads(marker_file.read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = elsewhere / "x.json"
    shutil.copy(marker["result"], result)
    (elsewhere / "x.config.yaml").write_text("token: SECRET-1234\n")
    marker["result"] = str(result)
    marker_file.write_text(json.dumps(marker))
    rc, out, err = run_cli(capsys, "report", grid_copy, "--out", tmp_path / "page", "--no-figure")
    assert rc == 0, err
    html = (tmp_path / "page" / "index.html").read_text()
    assert "SECRET-1234" not in html
    row = next(tr for tr in Dom(html).root.find("table", id="cells").find_all("tr")
               if tr.find_all("td") and tr.find("td").text() == "eval/clip/zero-shot/visa/seed0")
    assert row.find_all("td")[3].text() == "-" and row.find_all("td")[5].text() == "-"   # no code version, no config


def test_a_figure_that_cannot_be_drawn_is_one_line_on_a_page_written_anyway(grid, report, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "report", grid["out"], "--out", tmp_path / "page", "--figure-dataset", "btad")
    assert rc == 0, err
    root = Dom((tmp_path / "page" / "index.html").read_text()).root
    note = root.find("section", id="figure").text()
    assert "not drawn for btad: " in note and not root.find("section", id="figure").find_all("img")
    assert len(results_rows(root)) == 4                                   # the rest of the report is there


def test_a_misspelt_metric_is_one_line_and_writes_nothing(grid, report, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "report", grid["out"], "--out", tmp_path / "page", "--metrics",
                           "image_auroc,pixel_aurco", "--no-figure")
    assert rc == 2
    line = one_error_line(err)
    assert "pixel_aurco" in line and "pixel_auroc" in line               # the key and the suggestion
    assert not (tmp_path / "page").exists()


def test_report_of_a_folder_that_does_not_exist_is_one_line(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "report", tmp_path / "nope", "--out", tmp_path / "page")
    assert rc == 2
    assert "nope" in one_error_line(err)
    assert not (tmp_path / "page").exists()


# ---- a grid config: every planned cell's state --------------------------------------------------

def _statuses(page: Path) -> dict[str, str]:
    rows = Dom(page.read_text()).root.find("table", id="cells").find("tbody").find_all("tr")
    return {tr.find("td").text(): tr.attrs["data-status"] for tr in rows}


def test_a_grid_config_gives_each_planned_cell_its_state_lost_and_missing_too(grid, report, tmp_path, capsys):
    """Through the grid config the page says what `zsadx grid status` says: a 'running' cell whose
    process is gone is lost, a cell without a marker is missing; a folder shows the markers' words."""
    from launch import cache

    running = grid["out"] / "eval/clip/zero-shot/bmad-brain/seed0"
    unmarked = grid["out"] / "eval" / HOSTILE_LABEL / "zero-shot/visa/seed0"
    saved = {f: f.read_bytes() for f in (running / "cell.json", unmarked / "cell.json")}
    try:
        ended = subprocess.Popen([sys.executable, "-c", ""])
        ended.wait()
        cache.write_marker(running, status="running", where={**cache.process_identity(os.getpid()), "pid": ended.pid})
        (unmarked / "cell.json").unlink()
        rc, out, err = run_cli(capsys, "report", grid["grid"], "--out", tmp_path / "planned", "--no-figure")
        assert rc == 0, err
        planned = _statuses(tmp_path / "planned" / "index.html")
        assert planned.pop("eval/clip/zero-shot/bmad-brain/seed0") == "lost"
        assert planned.pop(f"eval/{HOSTILE_LABEL}/zero-shot/visa/seed0") == "missing"
        assert sorted(planned.values()) == ["done", "done", "failed", "failed"]
        rc, out, err = run_cli(capsys, "report", grid["out"], "--out", tmp_path / "folder", "--no-figure")
        assert rc == 0, err
        markers = _statuses(tmp_path / "folder" / "index.html")
        assert markers["eval/clip/zero-shot/bmad-brain/seed0"] == "running"
        assert f"eval/{HOSTILE_LABEL}/zero-shot/visa/seed0" not in markers
    finally:
        for f, data in saved.items():
            f.write_bytes(data)
