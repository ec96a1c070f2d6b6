"""The explorer's page in a real browser: headless Chromium (the Debian package, ``apt-get install -y chromium``)
driven by Playwright for Python (the ``test`` extra; its own browser download is not used). Clicking a token must
paint exactly the colours of the numpy map, a click on the reference layer's norm map must write the label file,
and switching model, layer (also from a curve) and metric must redraw. Skipped with a reason when either is
missing."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from diffaudit.analyses.anomalies import REF_LAYER
from diffaudit.explorer.data import Explorer, similarity
from diffaudit.explorer.server import serve_in_thread

from test_explorer import H_LAYERS, N_IMG, make_harm_results, make_results

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y "
                                                         "chromium); the explorer's browser tests are skipped")
PANEL = 240  # px, .panel in explorer.css

BLUE, ORANGE, WHITE = np.array([26, 89, 255]), np.array([255, 140, 0]), np.array([255, 255, 255])
SEQ = np.array([[68, 1, 84], [33, 145, 140], [253, 231, 37]])


def _lerp(a, b, t):
    return np.floor(a + (b - a) * t[..., None] + 0.5)


def diverging(t):
    """explorer.js ``diverging``: white -> orange for t > 0, white -> blue for t < 0."""
    t = np.clip(t, -1, 1)
    return np.where((t < 0)[..., None], _lerp(WHITE, BLUE, -t), _lerp(WHITE, ORANGE, t))


def sequential(t):
    t = np.clip(t, 0, 1)
    return np.where((t < 0.5)[..., None], _lerp(SEQ[0], SEQ[1], t * 2), _lerp(SEQ[1], SEQ[2], (t - 0.5) * 2))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer_browser") / "results"
    arrays = make_results(root)
    labels = root.parent / "hand_labels" / "{model}.npy"
    srv, url = serve_in_thread(Explorer(root, labels=str(labels)))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield url, arrays, root.parent / "hand_labels", browser
        browser.close()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def page(site):
    url, _, _, browser = site
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url + "/")
    pg.wait_for_function("window.explorer && window.explorer.ready === true")
    yield pg
    pg.close()
    assert errors == []


def _settled(pg, token):
    pg.wait_for_function(
        "([y, x]) => { const S = window.explorer; return S.maps && S.maps.token[0] === y && S.maps.token[1] === x"
        " && !S.inflight && !S.pending; }", arg=list(token))


def _click_token(pg, selector, h, y, x):
    cell = PANEL / h
    pg.click(selector, position={"x": (x + 0.5) * cell, "y": (y + 0.5) * cell})


def _drawn(pg, selector="#panels .panel.sim"):
    """Per panel: its image index and the RGBA pixels of its token canvas (one pixel per token)."""
    return pg.evaluate("""(sel) => [...document.querySelectorAll(sel)].map((p) => {
        const c = p.querySelector('canvas.map'), ctx = c.getContext('2d');
        return {image: +p.dataset.image, w: c.width, h: c.height,
                px: Array.from(ctx.getImageData(0, 0, c.width, c.height).data)}; })""", selector)


def _expected_colours(arrays_layer, ref, y, x, images, metric):
    maps = [similarity(arrays_layer[i], arrays_layer[ref][:, y, x], metric,
                       arrays_layer[ref].mean(axis=(1, 2))) for i in images]
    if metric in ("cosine", "centred_cosine"):
        return [diverging(m.astype(np.float64)) for m in maps]
    if metric == "dot":
        top = max(max(abs(float(m.min())), abs(float(m.max()))) for m in maps)
        return [diverging(m.astype(np.float64) / top) for m in maps]
    top = max(float(m.max()) for m in maps)
    return [sequential(m.astype(np.float64) / top) for m in maps]


def _check_drawn(pg, arrays_layer, ref, y, x, metric):
    drawn = _drawn(pg)
    images = [d["image"] for d in drawn]
    want = _expected_colours(arrays_layer, ref, y, x, images, metric)
    h, w = arrays_layer.shape[2:]
    for d, exp in zip(drawn, want):
        assert (d["h"], d["w"]) == (h, w)
        rgba = np.array(d["px"]).reshape(h, w, 4)
        assert (rgba[..., 3] == 255).all()
        diff = np.abs(rgba[..., :3] - exp)
        assert diff.max() <= 1, (metric, d["image"], diff.max())
    # the numbers behind the colours are the numpy map
    values = pg.evaluate("window.explorer.maps.maps.map((m) => Array.from(m.values))")
    for i, v in zip(images, values):
        want_v = similarity(arrays_layer[i], arrays_layer[ref][:, y, x], metric, arrays_layer[ref].mean(axis=(1, 2)))
        assert np.allclose(np.array(v).reshape(h, w), want_v, rtol=1e-4, atol=1e-4)


def test_click_a_token_paints_the_numpy_map(page, site):
    _, arrays, _, _ = site
    layer = "down_blocks[0].resnets[0]"
    page.select_option("#layer", layer)
    a = arrays["m1"][layer]
    _click_token(page, '#panels .panel.sim[data-image="1"]', 16, 5, 9)
    _settled(page, (5, 9))
    assert page.evaluate("window.explorer.pinned") is True
    _check_drawn(page, a, 1, 5, 9, "cosine")
    # markers: best match of each image is the numpy argmax
    best = page.evaluate("window.explorer.maps.maps.map((m) => m.best)")
    for i, b in zip([0, 1, 2, 3], best):
        m = similarity(a[i], a[1][:, 5, 9], "cosine")
        assert tuple(b) == np.unravel_index(np.argmax(m), m.shape)
    for metric in ("dot", "l2", "centred_cosine", "rel_norm"):
        page.select_option("#metric", metric)
        page.wait_for_function("(m) => window.explorer.maps.metric === m && !window.explorer.inflight", arg=metric)
        _check_drawn(page, a, 1, 5, 9, metric)
    # the strip: every stored layer, in U-Net order
    page.wait_for_function("window.explorer.strip && window.explorer.strip.layers.length === 4")
    assert page.eval_on_selector_all(".strip-item", "els => els.map((e) => e.dataset.layer)") == \
        list(arrays["m1"].keys())
    # timing is recorded
    t = page.evaluate("window.explorer.timings[window.explorer.timings.length - 1]")
    assert t["server_ms"] is not None and t["paint_ms"] > 0
    # the arrow keys move the pinned token
    page.locator("#hint").click()  # focus away from the metric select
    page.keyboard.press("ArrowRight")
    _settled(page, (5, 10))
    _check_drawn(page, a, 1, 5, 10, "rel_norm")
    # the view is in the address: a reload restores it
    page.reload()
    page.wait_for_function("window.explorer && window.explorer.ready === true")
    _settled(page, (5, 10))
    assert page.evaluate("[window.explorer.model, window.explorer.layer, window.explorer.metric, "
                         "window.explorer.pinned]") == ["m1", layer, "rel_norm", True]
    _check_drawn(page, a, 1, 5, 10, "rel_norm")


def test_label_a_patch_saves_and_reloads(page, site):
    url, _, labels_dir, _ = site
    page.click("#to-ref")
    page.wait_for_function("(l) => window.explorer.norms && window.explorer.norms.layer === l", arg=REF_LAYER)
    _click_token(page, '#norms .panel.norm[data-image="2"]', 8, 5, 3)  # token (y=5, x=3) -> patch (x=2, y=4)
    page.wait_for_function("window.explorer.lastLabels !== undefined")
    saved = np.load(labels_dir / "m1.npy", allow_pickle=False)
    assert saved.dtype == np.int64 and saved.tolist() == [[2, 2, 4]]
    page.wait_for_function("window.explorer.norms.maps.find((m) => m.image === 2).labelled.length === 1")
    # a reload shows it
    page.reload()
    page.wait_for_function("window.explorer && window.explorer.ready === true")
    page.wait_for_function("window.explorer.norms && window.explorer.norms.layer === '%s'" % REF_LAYER)
    assert page.evaluate("window.explorer.norms.maps.find((m) => m.image === 2).labelled") == [[4, 2, 2]]
    # click again: removed
    page.evaluate("window.explorer.lastLabels = undefined")
    _click_token(page, '#norms .panel.norm[data-image="2"]', 8, 4, 2)
    page.wait_for_function("window.explorer.lastLabels !== undefined")
    assert np.load(labels_dir / "m1.npy").shape == (0, 3)


def test_switch_model_layer_and_curve(page, site):
    _, arrays, _, _ = site
    # a click on a curve selects that layer (index 1 = mid_block.attentions[0] in the run summary)
    box = page.locator('#curves svg[data-curve="acc_8x8"]').bounding_box()
    page.mouse.click(box["x"] + 24 + (320 - 48) / 3, box["y"] + 60)
    page.wait_for_function("window.explorer.layer === 'mid_block.attentions[0]'")
    # the experiment of m1
    page.select_option("#run", "e1")
    assert page.eval_on_selector_all("#layer option", "els => els.map((e) => e.value)") == \
        ["mid_block.attentions[0]", REF_LAYER]
    # the other model (two shards read as one store), another layer and images
    page.select_option("#model", "m2")
    page.fill("#images", f"{N_IMG - 1},0")
    page.dispatch_event("#images", "change")
    page.select_option("#layer", "up_blocks[3].attentions[2]")
    a = arrays["m2"]["up_blocks[3].attentions[2]"]
    _click_token(page, f'#panels .panel.sim[data-image="{N_IMG - 1}"]', 16, 15, 0)
    _settled(page, (15, 0))
    assert page.evaluate("window.explorer.model") == "m2"
    _check_drawn(page, a, N_IMG - 1, 15, 0, "cosine")


def test_mitigation_and_correspondence(site, tmp_path):
    """Select a mitigation (the maps are the mitigated ones, what it acts on is shown), pick a flip pair, click a
    token of its first image: the match marker sits on the nearest token and the ground truth is boxed."""
    from diffaudit.analyses.probe import image_split
    from diffaudit.harm.matching import nearest_tokens, tokens_of
    from diffaudit.harm.mitigations import fit_store_mitigations
    from diffaudit.store import ReprStore

    *_, browser = site
    root = tmp_path / "results"
    data = make_harm_results(root)
    layer = "down_blocks[0].resnets[0]"
    srv, url = serve_in_thread(Explorer(root))
    pg = browser.new_page(viewport={"width": 1400, "height": 1400})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        pg.goto(url + "/")
        pg.wait_for_function("window.explorer && window.explorer.ready === true")
        pg.select_option("#layer", layer)
        pg.select_option("#mitigation", "position_mean")
        pg.wait_for_function("(l) => window.explorer.norms && window.explorer.norms.layer === l && "
                             "window.explorer.norms.mitigation.name === 'position_mean'", arg=layer)
        assert "per-position mean of 8 fit images" in pg.text_content("#acts-on")
        store = ReprStore(root / "h" / "representations" / "full.zarr")
        mit = fit_store_mitigations(store, layer, image_split(store.n_images)[0], ["position_mean"])["position_mean"]
        a = data["base"][layer]
        _click_token(pg, '#panels .panel.sim[data-image="1"]', 16, 5, 9)
        _settled(pg, (5, 9))
        _check_drawn(pg, mit.apply(a), 1, 5, 9, "cosine")  # the painted maps are those of the mitigated features
        # the correspondence view: flip pair 0 (image 8 and its mirror), token (4, 3) of the first image
        pg.wait_for_function("window.explorer.pairs && document.querySelector('#corr .panel.corr.src')")
        assert pg.is_visible("#corr-box")
        pg.select_option("#pair", "0")
        _click_token(pg, "#corr .panel.corr.src", 16, 4, 3)
        pg.wait_for_function("window.explorer.corr && window.explorer.corr.token[0] === 4")
        res = pg.evaluate("window.explorer.corr")
        s, t = mit.apply(a[8][None])[0], mit.apply(data["harm"][layer][0][None])[0]
        want = int(nearest_tokens(tokens_of(s)[[4 * 16 + 3]], tokens_of(t))[0])
        assert res["match"] == [want // 16, want % 16] and res["truth"] == [4, 12]
        assert res["match"] == res["truth"]  # the position mean removed, the match follows the content
        # the markers: red circle around the match, green box on the ground truth, on the second image's canvas
        px = pg.evaluate("""() => { const c = document.querySelector('#corr .panel.corr.tgt canvas.marks');
            return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""")
        rgba = np.array(px).reshape(PANEL, PANEL, 4)
        cell = PANEL / 16
        red = (rgba[..., 0] > 200) & (rgba[..., 1] < 90) & (rgba[..., 3] > 200)
        green = (rgba[..., 1] > 200) & (rgba[..., 0] < 160) & (rgba[..., 2] < 60) & (rgba[..., 3] > 200)
        ys, xs = np.nonzero(red)
        assert red.any() and abs(ys.mean() / cell - (res["match"][0] + 0.5)) < 0.5
        assert abs(xs.mean() / cell - (res["match"][1] + 0.5)) < 0.5
        gy, gx = np.nonzero(green)
        assert green.any() and int(gy.min() // cell) == res["truth"][0] and int(gx.min() // cell) == res["truth"][1]
        assert "ground truth (4, 12)" in pg.text_content("#corr-info")
        # without the mitigation the match follows the position
        pg.select_option("#mitigation", "none")
        pg.wait_for_function("window.explorer.corr.mitigation.name === 'none'")
        assert pg.evaluate("window.explorer.corr.match") == [4, 3]
        assert pg.text_content("#acts-on") == "the features as stored"
        assert H_LAYERS[layer][1] == 16
    finally:
        pg.close()
        srv.shutdown()
        srv.server_close()
    assert errors == []
