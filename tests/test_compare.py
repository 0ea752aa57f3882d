"""`longtail compare` and the bench suites' HTML report: three tiny real runs (a bench suite on
a 100-class CIFAR in the official format), the Markdown numbers against metrics.json, the config
differences against an independent diff, and the HTML opened in headless Chromium (skipped
where no Chromium is installed)."""

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import write_cifar100_folder
from PIL import Image

from longtail.cli import main
from longtail.core.config import diff_trees, load_yaml_tree
from longtail.engine.compare import (
    ABSENT,
    RunRecord,
    config_differences,
    duration,
    flatten,
    html_report,
    metrics_table,
)

ROOT = Path(__file__).resolve().parents[1]
CE = ROOT / "configs" / "methods" / "ce.yaml"
NAMES = ["ce", "ce-s1", "lr05"]  # the suite's three run folders


@pytest.fixture(scope="module")
def suite_runs(tmp_path_factory):
    """`longtail bench` on a three-run suite (CE seeds 0 and 1, CE at lr 0.05 for two epochs)
    on a 100-class CIFAR: (run folders, results folder)."""
    tmp = tmp_path_factory.mktemp("compare")
    data = write_cifar100_folder(tmp / "data", train_per_class=10, test_per_class=2)
    suite = {
        "description": "three tiny runs",
        "epochs": 1,
        "baseline": "ce",
        "overrides": [
            "model.backbone=resnet8",
            "data.imbalance_factor=10",
            "data.val_per_class=1",
            "train.batch_size=64",
            "train.eval_batch_size=128",
            "train.progress=false",
        ],
        "runs": [
            {"name": "ce", "data": "cifar100_lt", "config": str(CE), "seeds": [0, 1]},
            {
                "name": "lr05",
                "data": "cifar100_lt",
                "config": str(CE),
                "epochs": 2,
                "overrides": ["optim.lr=0.05", "train.eval_every=1"],
            },
        ],
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    args = ["bench", str(tmp / "tiny.yaml"), "--out", str(tmp / "runs")]
    args += ["--results", str(tmp / "results"), "--docs", str(tmp / "results.md")]
    args += ["--data-root", str(data), "--threads", "1"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = main(args)
    assert rc == 0, out.getvalue()
    return [tmp / "runs" / "tiny" / n for n in NAMES], tmp / "results"


@pytest.fixture(scope="module")
def compared(suite_runs, tmp_path_factory):
    """`longtail compare` on the three runs: (run folders, out folder, stdout)."""
    runs, _ = suite_runs
    out = tmp_path_factory.mktemp("report")
    with contextlib.redirect_stdout(io.StringIO()) as text:
        rc = main(["compare", *map(str, runs), "--out", str(out), "--names", *NAMES])
    assert rc == 0, text.getvalue()
    return runs, out, text.getvalue()


def markdown_rows(text: str, first_header: str):
    """The Markdown table whose header starts with ``first_header``, as dicts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[start:]]
    header, body = cells[0], []
    for row in cells[2:]:
        if len(row) != len(header):
            break
        body.append(dict(zip(header, row)))
    return body


def test_markdown_numbers_are_those_of_metrics_json(compared):
    runs, out, stdout = compared
    rows = markdown_rows((out / "compare.md").read_text(), "run")
    assert [r["run"] for r in rows] == NAMES and [r["seed"] for r in rows] == ["0", "1", "0"]
    columns = {
        "top-1": "top1",
        "top-5": "top5",
        "balanced": "mean_class_acc",
        "medium": "medium",
        "few": "few",
        "ECE": "ece",
    }
    for run, row in zip(runs, rows):
        m = json.loads((run / "metrics.json").read_text())
        assert len(m["class_counts"]) == 100  # top-5 is shown: more than 10 classes
        for key in ("top1", "top5", "mean_class_acc", "few", "ece"):
            assert isinstance(m[key], float), key  # numbers to compare, not empty groups
        for column, key in columns.items():
            assert row[column] == ("–" if m[key] is None else f"{m[key]:.2f}"), (run, column)
        assert m["many"] is None and row["many"] == "–"  # no class has > 100 training images
        assert row["val top-1"] == f"{m['val']['top1']:.2f}"
        assert row["train time"] == duration(m["train_seconds"])
        assert row["img/s"] == f"{m['images_per_s']:.0f}"
        assert row["epochs"] == str(m["epochs"]) and row["dataset"] == "cifar100-lt"
    assert [r["epochs"] for r in rows] == ["1", "1", "2"]
    assert stdout.splitlines()[0].startswith("| run | seed |") and "compare.html" in stdout


def test_config_differences_are_exactly_the_keys_that_differ(compared):
    runs, out, _ = compared
    trees = [load_yaml_tree(r / "config.yaml") for r in runs]
    expected = set(diff_trees(trees[0], trees[1])) | set(diff_trees(trees[0], trees[2]))
    diffs = dict(config_differences(trees))
    assert set(diffs) == expected
    assert diffs["seed"] == ["0", "1", "0"] and diffs["optim.lr"] == ["0.1", "0.1", "0.05"]
    assert diffs["train.epochs"] == ["1", "1", "2"] and "model.backbone" not in diffs
    table = markdown_rows((out / "compare.md").read_text(), "config key")
    assert {r["config key"].strip("`") for r in table} == expected
    lr = next(r for r in table if r["config key"] == "`optim.lr`")
    assert [lr[f"{n} (seed {s})"] for n, s in zip(NAMES, (0, 1, 0))] == ["0.1", "0.1", "0.05"]


def test_flatten_and_differences_by_hand():
    a = {"seed": 0, "optim": {"lr": 0.1, "name": "sgd"}, "schedule": {"milestones": [160, 180]}}
    b = {"seed": 0, "optim": {"lr": 0.1}, "schedule": {"milestones": [160]}, "hooks": {}}
    c = {"stages": [{"name": "s1", "optim": {"lr": 0.2}}]}
    assert flatten(a) == {
        "seed": 0,
        "optim.lr": 0.1,
        "optim.name": "sgd",
        "schedule.milestones": [160, 180],
    }
    assert flatten(c) == {"stages[0].name": "s1", "stages[0].optim.lr": 0.2}
    assert dict(config_differences([a, b])) == {
        "optim.name": ["sgd", ABSENT],
        "schedule.milestones": ["[160, 180]", "[160]"],
        "hooks": [ABSENT, "{}"],
    }
    assert config_differences([a, a]) == []


def test_top5_only_for_runs_with_more_than_ten_classes(tmp_path):
    def run(name, classes):
        m = {"top1": 50.0, "top5": 90.0, "mean_class_acc": 45.0, "class_counts": [5] * classes}
        return RunRecord(name, tmp_path, m, {"seed": 3})

    table = metrics_table([run("ten", 10)])
    assert "top-5" not in table.headers and table.rows[0][:2] == ["ten", "3"]
    table = metrics_table([run("ten", 10), run("hundred", 100)])
    column = table.headers.index("top-5")
    assert [r[column] for r in table.rows] == ["–", "90.00"]


def test_compare_refuses_an_unfinished_run(compared, tmp_path, capsys):
    runs, _, _ = compared
    partial = tmp_path / "partial"
    shutil.copytree(runs[0], partial)
    (partial / "metrics.json").unlink()
    assert main(["compare", str(runs[1]), str(partial), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has not finished" in err and "--resume" in err and "Traceback" not in err
    assert main(["compare", str(runs[0]), "--names", "a", "b", "--out", str(tmp_path)]) == 2
    assert "one name per run folder" in capsys.readouterr().err


class Page(HTMLParser):
    """Tables (id -> rows of cell texts and the rows' data-* attributes) and images of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.tags = {}, [], set()
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id") or f"t{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._row = {"cells": [], "data": {k: v for k, v in a.items() if k.startswith("data-")}}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def decode_png(src: str):
    assert src.startswith("data:image/png;base64,")
    raw = base64.b64decode(src.split(",", 1)[1], validate=True)
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        return im.format, im.size


def check_self_contained(page: Page, run_tables: int):
    assert not page.tags & {"script", "link", "iframe"}  # nothing to fetch, nothing to run
    assert len(page.images) >= run_tables
    for img in page.images:
        fmt, size = decode_png(img["src"])
        assert fmt == "PNG" and size == (int(img["width"]), int(img["height"]))


def test_html_is_self_contained_with_the_same_numbers(compared):
    runs, out, _ = compared
    page = parse((out / "compare.html").read_text())
    check_self_contained(page, 2)  # per-class accuracy and training curves
    rows = page.tables["metrics"][1:]
    assert [r["data"] for r in rows] == [
        {"data-run": n, "data-seed": s} for n, s in zip(NAMES, "010")
    ]
    md = markdown_rows((out / "compare.md").read_text(), "run")
    assert [r["cells"] for r in rows] == [list(r.values()) for r in md]
    assert len(page.tables["config-diff"]) > 3


def test_suite_results_have_top5_balanced_and_an_html_report(suite_runs):
    runs, results = suite_runs
    rows = markdown_rows((results / "tiny.md").read_text(), "run")
    assert [r["run"] for r in rows] == ["ce", "lr05"] and rows[0]["seeds"] == "2"
    m = [json.loads((r / "metrics.json").read_text()) for r in runs]
    mean = (m[0]["top5"] + m[1]["top5"]) / 2
    assert rows[0]["top-5"].startswith(f"{mean:.2f} ± ")
    assert rows[1]["top-5"] == f"{m[2]['top5']:.2f}"
    assert rows[1]["balanced"] == f"{m[2]['mean_class_acc']:.2f}"
    page = parse((results / "tiny.html").read_text())
    check_self_contained(page, 2)
    suite_rows = [r["cells"][0] for r in page.tables["suite"][1:]]
    assert suite_rows == ["ce", "lr05"]
    assert [r["data"]["data-run"] for r in page.tables["metrics"][1:]] == NAMES  # every seed
    assert [r["data"]["data-seed"] for r in page.tables["metrics"][1:]] == ["0", "1", "0"]


def chromium():
    for name in (os.environ.get("LONGTAIL_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    for name in ("google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


PROBE = """<script>window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('img').forEach(function (im) {
    var r = im.getBoundingClientRect();
    out.push([im.complete, im.naturalWidth, im.naturalHeight, r.width, r.height].join(','));
  });
  var p = document.createElement('pre'); p.id = 'probe'; p.textContent = out.join(';');
  document.body.appendChild(p);
});</script>"""


def browse(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = chromium()
    assert exe is not None
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    args += [f"--user-data-dir={profile}", "--window-size=1280,2400", *extra, page.as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(chromium() is None, reason="no Chromium (apt-get install chromium)")
@pytest.mark.parametrize("which", ["compare", "suite"])
def test_html_renders_in_headless_chromium(compared, suite_runs, tmp_path, which):
    _, out, _ = compared
    report = out / "compare.html" if which == "compare" else suite_runs[1] / "tiny.html"
    dom = browse(report, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = parse(dom.stdout)  # the DOM as the browser built it
    runs = page.tables["metrics"][1:]
    assert [r["data"]["data-run"] for r in runs] == NAMES
    assert [r["cells"][:2] for r in runs] == [[n, s] for n, s in zip(NAMES, "010")]
    assert len(page.images) >= 2
    for img in page.images:
        assert decode_png(img["src"])[0] == "PNG"
    # the images decoded and laid out: their natural and rendered sizes, read by a script
    # added to a copy of the page (the report itself has none)
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = browse(probe, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom")
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom.stdout)
    assert found, dom.stdout[-2000:]
    sizes = [s.split(",") for s in found.group(1).split(";")]
    assert len(sizes) == len(page.images)
    for complete, nat_w, nat_h, width, height in sizes:
        assert complete == "true" and int(nat_w) > 300 and int(nat_h) > 200
        assert float(width) > 300 and float(height) > 150


def test_html_report_escapes_text():
    text = html_report("a <b> & `c`", [])
    assert "<title>a &lt;b&gt; &amp; `c`</title>" in text and "<code>c</code>" in text
