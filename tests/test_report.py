"""The Snakemake HTML report (`snakemake --report report.html`): every figure with its caption, self-contained,
and it renders in a headless browser.

The end-to-end tests run the offline demo (shortened to 6 images) in a fresh copy of the repository, build the
report there and inspect it. The screenshot tests need Chromium (Debian: ``apt-get install -y chromium``) and are
skipped without it. Set ``DIFFAUDIT_REPORT_SHOTS=<dir>`` to keep the screenshots.
"""
from __future__ import annotations

import ast
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, copy_repo

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
REPORT_DIR = REPO / "workflow" / "report"
REPORT_LINE = 'report: "workflow/report/workflow.rst"'
DEMO = "results/demo"
FIG = f"{DEMO}/figures"

# Every figure of the demo run (model mini): result path -> (category, phrases its caption must contain).
FIGURES = {
    f"{FIG}/quantitative_mini.png": ("Paper figure", ["Top panel", "1/min(g, n)", "log2", "above 1",
                                                      "+-1 standard deviation", "model mini"]),
    f"{FIG}/cross_model.png": ("Cross-model", ["one colour per model", "native resolution", "corner"]),
    f"{FIG}/paper_comparison_mini.png": ("Paper comparison", ["authors'", "status.json", "is empty",
                                                              "paper_reference: force"]),
    f"{FIG}/mini/qualitative_token_similarity.png": ("Qualitative", ["Positional embedding", "cosine similarity",
                                                                     "orange", "model mini"]),
    f"{FIG}/mini/qualitative_corner.png": ("Qualitative", ["Corner artifact", "corner token", "model mini"]),
    f"{FIG}/mini/qualitative_norms.png": ("Qualitative", ["High-norm anomalies", "L2 norm", "model mini"]),
    f"{FIG}/mini/qualitative_pca.png": ("Qualitative", ["principal component", "(red, green, blue)",
                                                        "model mini"]),
    f"{FIG}/experiments_mini.png": ("Experiments", ["baseline (black)", "bootstrap interval", "filled marker",
                                                  "paired bootstrap", "excludes 0"]),
    f"{FIG}/harm_mini.png": ("Harm", ["nearest-neighbour matching", "PCK", "position following", "position_mean"]),
}
TABLES = {f"{DEMO}/mini/credibility.csv": ["position_score", "corner_score", "anomaly_score", "safe"],
          f"{DEMO}/mini/harm.csv": ["pck", "position_following", "hub_ratio"],
          f"{DEMO}/mini/mitigations.csv": ["probe_acc8", "semantic_acc"]}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def js_object(html: str, script_id: str, name: str):
    """The JSON value assigned by ``var <name> = ...`` in the report's ``<script id=...>`` data block."""
    m = re.compile(rf"""<script id=["']{script_id}["']>\s*var {name} = """).search(html)
    assert m, f"no `var {name}` in a script {script_id!r} of the report"
    value, _ = json.JSONDecoder().raw_decode(html, m.end())
    return value


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(html: Path, png: Path, navigate_js: str | None = None) -> Image.Image:
    """Headless Chromium screenshot (1400x1000) of ``html``; ``navigate_js`` runs after the page has loaded."""
    target = html
    if navigate_js:
        text = html.read_text()
        at = text.rfind("</body>")  # the last one: the embedded libraries contain the string too
        target = png.with_suffix(".html")
        target.write_text(text[:at] + f"<script>{navigate_js}</script>" + text[at:])
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        proc = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1400,1000",
             "--virtual-time-budget=5000", target.resolve().as_uri()],
            capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert png.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    keep = os.environ.get("DIFFAUDIT_REPORT_SHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, Path(keep) / png.name)
    return Image.open(png).convert("RGB")


def assert_not_blank(img: Image.Image) -> np.ndarray:
    assert img.width >= 1000 and img.height >= 700, img.size
    a = np.asarray(img)
    colours = np.unique(a.reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"only {len(colours)} colours: a blank or nearly blank page"
    assert a.std() > 10, f"pixel sd {a.std():.1f}: a blank or nearly blank page"
    # neither almost all white nor almost all one background colour
    most = np.max(np.unique(a.reshape(-1, 3), axis=0, return_counts=True)[1]) / (a.shape[0] * a.shape[1])
    assert most < 0.9, f"{most:.0%} of the pixels have one colour"
    return a


# ---------------------------------------------------------------------------------------------
# Fast: the captions render (all of them, including those the demo does not produce)
# ---------------------------------------------------------------------------------------------

def caption_files_of_figures_smk() -> set[str]:
    """Caption files referenced in workflow/rules/figures.smk (``{view}`` expanded over QUALITATIVE)."""
    text = (REPO / "workflow" / "rules" / "figures.smk").read_text()
    views = ast.literal_eval(re.search(r"^QUALITATIVE = (\[.*\])", text, re.M).group(1))
    out = set()
    for name in re.findall(r"""caption=f?["']\.\./report/([^"']+)["']""", text):
        out |= {name.replace("{view}", v) for v in views} if "{view}" in name else {name}
    return out


def test_every_figure_rule_has_a_caption_file():
    names = caption_files_of_figures_smk()
    assert {"quantitative.rst", "cross_model.rst", "paper_comparison.rst", "credibility.rst"} <= names
    assert {f"qualitative_{v}.rst" for v in ["token_similarity", "corner", "norms", "pca"]} <= names
    missing = [n for n in names if not (REPORT_DIR / n).is_file()]
    assert not missing, missing
    assert (REPORT_DIR / "workflow.rst").is_file()


@pytest.mark.parametrize("configs,model", [(["params.yaml"], "sd15"), (["params.yaml", "config/demo.yaml"], "mini")])
def test_captions_render_without_rst_problems(configs, model):
    """Every caption renders as Snakemake renders it (Jinja, then docutils) with no warning, for the paper's
    configuration and the demo's; docutils warnings (bad markup, unknown link targets) are errors here."""
    from docutils.core import publish_parts
    from jinja2 import Environment, StrictUndefined

    cfg: dict = {}
    for c in configs:
        for k, v in yaml.safe_load((REPO / c).read_text()).items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    env = Environment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    names = ["Paper figure", "Qualitative", "Cross-model", "Tables"] + (["Paper comparison"] if model == "sd15"
                                                                       else [])
    category = namedtuple("Category", "name")  # hashable, like Snakemake's categories
    categories = {category(n): {} for n in names}
    links = "\n\n" + "\n".join(f".. _{n}: javascript:app.showCategory('{n}')" for n in names) + "\n"
    smk = SimpleNamespace(config=cfg, wildcards=SimpleNamespace(model=model))
    for path in sorted(REPORT_DIR.glob("*.rst")):
        text = env.from_string(path.read_text() + links).render(snakemake=smk, categories=categories, files=[])
        html = publish_parts(text, writer="html",
                             settings_overrides={"halt_level": 2, "report_level": 2, "warning_stream": False})
        body = html["html_body"]
        assert "system-message" not in body, (path.name, body)
        assert len(re.sub(r"<[^>]+>", "", body).split()) > 40, f"{path.name}: caption too short"
        if path.name != "workflow.rst":
            assert model in body, f"{path.name} does not name the model"


# ---------------------------------------------------------------------------------------------
# End to end: demo run, report, browser
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The demo (6 images at 256 px, one of its experiments) run in a fresh copy of the repository, and its report;
    returns (repo, report.html). The report's contents (every figure, its caption) are the same at 256 px and with
    one experiment as with the demo's 512 px and three: each experiment is another extraction and its analyses."""
    from diffaudit.config import load_config

    root = tmp_path_factory.mktemp("report")
    repo = copy_repo(root / "repo")
    assert REPORT_LINE in (repo / "Snakefile").read_text()  # the global description page
    # one merged file: Snakemake merges configfiles key by key, so a second file could not drop experiments
    cfg = load_config(repo / "params.yaml", repo / "config" / "demo.yaml")
    cfg["models"] = ["mini"]  # the report's contents on the first embedded model (the demo itself runs mini-cal)
    cfg["dataset"].update(n_images=6, size=256)
    cfg["harm"]["enabled"] = False  # the harm figure and tables are still written (empty, "not computed")
    cfg["experiments"] = {"circular": cfg["experiments"]["circular"]}
    short = root / "short.yaml"
    short.write_text(yaml.safe_dump(cfg, sort_keys=False))
    configs = ["--configfile", str(short)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for extra in (["--cores", "2"], ["--report", "report.html"]):
        proc = subprocess.run(SNAKEMAKE + extra + configs, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"snakemake {extra[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    html = repo / "report.html"
    assert html.is_file()
    return repo, html


@pytest.mark.slow
def test_report_holds_every_figure_with_its_caption(report):
    repo, html_path = report
    html = html_path.read_text()
    results = js_object(html, "results", "results")
    categories = js_object(html, "categories", "categories")

    # every figure the workflow wrote (PNG; the SVG twins stay out) is in the report, and nothing is missing
    written = {str(p.relative_to(repo)) for p in (repo / FIG).rglob("*.png")}
    assert written == set(FIGURES), written ^ set(FIGURES)
    assert set(FIGURES) | set(TABLES) <= set(results), (set(FIGURES) | set(TABLES)) - set(results)
    assert not [p for p in results if p.endswith(".svg")]

    in_category = {p: c for c, subs in categories.items() for paths in subs.values() for p in paths}
    for path, (category, phrases) in FIGURES.items():
        entry = results[path]
        assert in_category[path] == category, (path, in_category[path])
        assert entry["mime_type"] == "image/png"
        caption = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", entry["caption"]))
        for phrase in phrases:
            assert phrase in caption, (path, phrase, caption[:500])
        # the figure itself is embedded, byte for byte
        data = base64.b64decode(entry["data_uri"].split("base64,", 1)[1])
        assert data == (repo / path).read_bytes(), path
    for path, columns in TABLES.items():
        assert in_category[path] == ("Harm" if "harm" in path or "mitigations" in path else "Tables")
        for column in columns:
            assert column in results[path]["caption"], (path, column)
    # per-model results are filed under the model
    assert set(categories["Paper figure"]) == {"mini"} and set(categories["Qualitative"]) == {"mini"}
    assert {results[p]["labels"]["model"] for p in FIGURES if "cross_model" not in p} == {"mini"}
    # any other table (e.g. the analyses' own tables, if they are marked for the report) has a caption too
    for path, entry in results.items():
        assert len(entry["caption"]) > 200, f"{path} has no real caption"

    # the global description (Snakefile `report:`), and no docutils error anywhere
    desc = js_object(html, "workflow-desc", "workflow_desc")
    assert "U-Net representation audit" in desc and "mini on 6 images" in re.sub(r"<[^>]+>", "", desc)
    assert "system-message" not in html and "System Message" not in html
    # self-contained: no resource is loaded from elsewhere
    assert not re.search(r"""<(script|img|iframe)[^>]+src=["']?(https?:)?//""", html)
    assert not re.search(r"""<link[^>]+href=["']?(https?:)?//""", html)


@pytest.mark.slow
def test_report_renders_in_a_browser(request, tmp_path):
    if chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); screenshot check skipped")
    _, html = request.getfixturevalue("report")
    home = assert_not_blank(screenshot(html, tmp_path / "report_home.png"))

    # a figure page: select the category, show the figure, open its caption (the report has no URL routes)
    path = f"{FIG}/quantitative_mini.png"
    nav = ("setTimeout(function(){app.showCategory('Paper figure');"
           f"setTimeout(function(){{app.setView({{content: 'img', contentPath: results['{path}'].data_uri, "
           f"resultPath: '{path}'}});"
           f"setTimeout(function(){{app.showResultInfo('{path}');}}, 200);}}, 200);}}, 200);")
    page = assert_not_blank(screenshot(html, tmp_path / "report_quantitative_mini.png", nav))
    changed = np.any(np.abs(page.astype(int) - home.astype(int)) > 30, axis=2).mean()
    assert changed > 0.08, f"the figure page looks like the start page ({changed:.0%} of the pixels differ)"
    # the probe panel's red lines are on screen (the figure is drawn, not a broken image)
    r, g, b = (page[..., i].astype(int) for i in range(3))
    assert ((r > 150) & (g < 90) & (b < 90)).sum() > 200
