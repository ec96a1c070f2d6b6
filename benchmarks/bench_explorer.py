"""Explorer benchmark: server time and time to paint in the browser, on the demo and on a paper-size store.

Server time is the handler's own time (its ``Server-Timing`` header: reading the chunks, the metric, the JSON);
"paint" is measured in headless Chromium (Playwright, the Debian package) from the click on a token to the frame
after the maps are drawn (``window.explorer.timings``). "cold" requests show images whose chunks the explorer has
not read yet (with ``--drop-caches`` also out of the OS page cache: needs root); "warm" is hovering over further
tokens of the shown images.

    python benchmarks/bench_explorer.py                         # the demo (results/demo) + a paper-size store
    python benchmarks/bench_explorer.py --no-paper              # the demo only
    python benchmarks/bench_explorer.py --drop-caches           # cold = from disk (root)
    python benchmarks/bench_explorer.py --screenshots docs/img  # also the README's screenshots (demo)

The paper-size store (500 images; a 64x64x320 layer, ``up_blocks[3].attentions[2]``, and the 32x32x1280
reference layer, float16, ~2.6 GB) is written once into ``--workdir`` and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REF = "up_blocks[1].upsamplers[0]"
BIG = "up_blocks[3].attentions[2]"


def build_paper_store(root: Path, n_images: int = 500, batch: int = 20) -> Path:
    """A results directory with one model ``paper500`` of paper size (random float16 activations)."""
    from diffaudit.store import StoreWriter

    store = root / "paper500" / "representations" / "full.zarr"
    done = root / ".complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    ids = [f"{i:06d}" for i in range(n_images)]
    w = StoreWriter(store, layers=[BIG, REF], image_ids=ids, labels=None, config={"bench": "explorer"},
                    attrs={"image_size": 512, "model": "paper500", "variant": "full"}, shard_images=batch,
                    layer_indices=[37, 30])
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for s in range(0, n_images, batch):
        b = min(batch, n_images - s)
        w.write_batch(s, {BIG: rng.standard_normal((b, 320, 64, 64), dtype=np.float32).astype(np.float16),
                          REF: rng.standard_normal((b, 1280, 32, 32), dtype=np.float32).astype(np.float16)})
    w.finalize()
    done.write_text("ok")
    print(f"wrote the paper-size store in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return root


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def get(base: str, path: str, **q) -> tuple[float, float]:
    """(server ms, client wall ms) of one GET."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"{base}{path}?{urlencode(q)}", timeout=60) as r:
        r.read()
        st = r.headers.get("Server-Timing", "")
    wall = (time.perf_counter() - t0) * 1000
    return float(st.split("dur=")[1]) if "dur=" in st else float("nan"), wall


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return f"{statistics.median(xs):.1f} / {p95:.1f}"


def server_bench(base: str, model: str, layer: str, n_images: int, shown: int, reps: int, cold_drop: bool) -> dict:
    rng = np.random.default_rng(1)
    _, _, h, w = None, None, None, None
    meta = json.loads(urllib.request.urlopen(f"{base}/api/meta").read())
    lm = next(x for x in meta["models"][model]["baseline"]["layers"] if x["name"] == layer)
    h, w = lm["height"], lm["width"]
    out: dict[str, list] = {"similarity cold": [], "similarity warm": [], "norms cold": [], "strip": []}
    walls: dict[str, list] = {k: [] for k in out}
    unused = list(rng.permutation(n_images))
    for r in range(reps):
        imgs = [int(unused.pop()) for _ in range(shown)] if len(unused) >= 2 * shown else \
            [int(i) for i in rng.choice(n_images, shown, replace=False)]
        if cold_drop:
            drop_caches()
        s, wl = get(base, "/api/similarity", model=model, layer=layer, ref=imgs[0], y=int(rng.integers(h)),
                    x=int(rng.integers(w)), images=",".join(map(str, imgs)), metric="cosine")
        out["similarity cold"].append(s), walls["similarity cold"].append(wl)
        for _ in range(3):
            s, wl = get(base, "/api/similarity", model=model, layer=layer, ref=imgs[1], y=int(rng.integers(h)),
                        x=int(rng.integers(w)), images=",".join(map(str, imgs)), metric="cosine")
            out["similarity warm"].append(s), walls["similarity warm"].append(wl)
        nimgs = [int(unused.pop()) for _ in range(shown)] if len(unused) >= shown else imgs
        if cold_drop:
            drop_caches()
        s, wl = get(base, "/api/norms", model=model, layer=layer, images=",".join(map(str, nimgs)))
        out["norms cold"].append(s), walls["norms cold"].append(wl)
        if r < max(2, reps // 4):
            s, wl = get(base, "/api/strip", model=model, layer=layer, ref=imgs[0], y=0, x=0, image=imgs[1])
            out["strip"].append(s), walls["strip"].append(wl)
    return {k: {"server_ms": out[k], "wall_ms": walls[k]} for k in out}


def browser_bench(base: str, layer: str, n_images: int, shown: int, reps: int, screenshots: Path | None = None,
                  cold_drop: bool = False, reset=None) -> dict | None:
    """Click -> painted in Chromium; ``reset()`` empties the explorer's chunk cache before each cold click (the
    page's norm maps have just read the shown images' chunks)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright is not installed: browser timings skipped", file=sys.stderr)
        return None
    if chromium is None:
        print("chromium is not installed: browser timings skipped", file=sys.stderr)
        return None
    rng = np.random.default_rng(2)
    res = {"paint cold": [], "paint warm": []}
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        pg = b.new_page(viewport={"width": 1500, "height": 1150})
        pg.goto(base + "/")
        pg.wait_for_function("window.explorer && window.explorer.ready === true")
        pg.select_option("#layer", layer)
        h = pg.evaluate("(l) => window.explorer.meta.models[window.explorer.model].baseline.layers"
                        ".find((x) => x.name === l).height", layer)
        cell = 240 / h
        unused = list(rng.permutation(n_images))
        for r in range(reps):
            imgs = [int(unused.pop()) for _ in range(shown)] if len(unused) >= shown else \
                [int(i) for i in rng.choice(n_images, shown, replace=False)]
            pg.fill("#images", ",".join(map(str, imgs)))
            pg.dispatch_event("#images", "change")
            pg.select_option("#layer", layer)
            pg.wait_for_function("window.explorer.norms && !window.explorer.inflight")
            pg.wait_for_timeout(100)
            if reset is not None:
                reset()
            if cold_drop:
                drop_caches()
            for k, kind in enumerate(["paint cold", "paint warm", "paint warm"]):
                n0 = pg.evaluate("window.explorer.timings.length")
                y, x = int(rng.integers(h)), int(rng.integers(h))
                pg.click(f'#panels .panel.sim[data-image="{imgs[k % shown]}"]',
                         position={"x": (x + 0.5) * cell, "y": (y + 0.5) * cell})
                pg.wait_for_function("(n) => window.explorer.timings.length > n && !window.explorer.inflight "
                                     "&& !window.explorer.pending", arg=n0)
                t = pg.evaluate("window.explorer.timings[window.explorer.timings.length - 1]")
                res[kind].append(t["paint_ms"])
                pg.wait_for_timeout(50)
        if screenshots is not None:
            take_screenshots(pg, screenshots)
        b.close()
    return res


def take_screenshots(pg, out: Path) -> None:
    """The README's screenshots (demo): similarity maps with the strip and the curves; the labeller on the
    reference layer's norm maps (image 19 holds the demo's one detected anomaly; one patch is labelled by a click)."""
    out.mkdir(parents=True, exist_ok=True)
    pg.fill("#images", "19,0,1,2")
    pg.dispatch_event("#images", "change")
    pg.select_option("#layer", "up_blocks[0].upsamplers[0]")
    pg.wait_for_function("window.explorer.norms && !window.explorer.inflight")
    pg.click('#panels .panel.sim[data-image="0"]', position={"x": 7.5 * 15, "y": 4.5 * 15})
    pg.wait_for_function("window.explorer.pinned && window.explorer.strip && !window.explorer.inflight")
    pg.wait_for_timeout(400)
    pg.mouse.move(5, 5)
    pg.screenshot(path=str(out / "explorer_similarity.png"), full_page=False)
    pg.click("#to-ref")
    pg.wait_for_function("window.explorer.norms && window.explorer.norms.is_ref_layer")
    pg.evaluate("window.explorer.lastLabels = undefined")
    pg.click('#norms .panel.norm[data-image="1"]', position={"x": 12.5 * 7.5, "y": 9.5 * 7.5})
    pg.wait_for_function("window.explorer.lastLabels !== undefined")
    pg.wait_for_function("window.explorer.norms.maps.some((m) => m.labelled.length)")
    pg.wait_for_timeout(400)
    pg.mouse.move(5, 5)
    pg.locator("#left").screenshot(path=str(out / "explorer_labeller.png"))
    print(f"screenshots in {out}", file=sys.stderr)


def run(results: Path, model: str, layer: str, label: str, args, screenshots=None) -> list[str]:
    from diffaudit.explorer import Explorer, serve_in_thread

    ex = Explorer(results, labels=str(Path(args.workdir) / "bench_labels" / "{model}.npy"))
    n = ex.run(model).store.n_images
    srv, base = serve_in_thread(ex)
    try:
        sv = server_bench(base, model, layer, n, args.shown, args.reps, args.drop_caches)
        br = browser_bench(base, layer, n, args.shown, args.reps, screenshots, args.drop_caches,
                           reset=ex.cache.clear)
    finally:
        srv.shutdown()
        srv.server_close()
    rows = []
    for k, v in sv.items():
        rows.append(f"| {label} | {k} | {summary(v['server_ms'])} | {summary(v['wall_ms'])} |")
    if br:
        for k, v in br.items():
            rows.append(f"| {label} | {k} (click -> painted, browser) | | {summary(v)} |")
    RESULTS[label] = {"server": sv, "browser": br, "layer": layer, "images": n, "shown": args.shown}
    return rows


RESULTS: dict = {}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=str(REPO / "results" / "demo"))
    p.add_argument("--no-paper", action="store_true")
    p.add_argument("--workdir", default=os.environ.get("DIFFAUDIT_BENCH_DIR", "/tmp/diffaudit_bench_explorer"))
    p.add_argument("--shown", type=int, default=4, help="images shown at once")
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--drop-caches", action="store_true", help="cold = also out of the OS page cache (root)")
    p.add_argument("--screenshots", type=Path, help="write the README's screenshots (demo) here")
    args = p.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.drop_caches and not drop_caches():
        p.error("--drop-caches needs root (writes /proc/sys/vm/drop_caches)")
    rows = ["| store | request | server ms (median / p95) | client ms (median / p95) |", "|---|---|---|---|"]
    if Path(args.demo, "mini").is_dir():
        rows += run(Path(args.demo), "mini", REF, "demo (40 images, 32x32x128)", args, args.screenshots)
        rows += run(Path(args.demo), "mini", "up_blocks[3].attentions[2]", "demo (40 images, 64x64x32)", args)
    if not args.no_paper:
        root = build_paper_store(Path(args.workdir) / "paper_results")
        rows += run(root, "paper500", BIG, "paper size (500 images, 64x64x320)", args)
    print(f"# explorer benchmark ({os.cpu_count()} CPUs, {args.shown} images shown, "
          f"cold = {'from disk (page cache dropped)' if args.drop_caches else 'not yet read by the explorer'})")
    print("\n".join(rows))
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "explorer.json").write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
