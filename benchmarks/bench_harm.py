"""Benchmark: time and peak memory of the harm analysis (token matching, and ``harm_tables`` per layer) against the
number of images and the layer size, and an estimate for the paper's size.

    python benchmarks/bench_harm.py [--images 10 20 40] [--layers 64 32 16 8] [--threads 2] [--gpu]
                                    [--profile] [--quick] [--out /tmp/bench_harm.json]
    python benchmarks/bench_harm.py --report /tmp/bench_harm.json     # print a saved run again

Synthetic stores, written once per number of images N with ``StoreWriter`` (float16, random data) into a temporary
directory, hold four SD-1.5 layers at 512 px with their real shapes (channels x map):

    down_blocks[0].resnets[0]  320 x 64 x 64      down_blocks[2].resnets[0]  1280 x 16 x 16
    down_blocks[1].resnets[0]  640 x 32 x 32      down_blocks[3].resnets[0]  1280 x  8 x  8

``full.zarr`` (N images, class labels ``i % 4``; an outlier channel pair and a high-norm 2x2 patch in every other
image, whose positions on the 32 x 32 grid are the anomaly labels, so that every mitigation has something to act on
and all six are matched and measured), the ``crop<t>`` stores of the corner similarity ((n-2) x (n-2) maps), and
the pair images' store: the harm pairs are synthetic rows with :data:`diffaudit.harm.pairs.PAIRS_COLUMNS`, one flip
and one shift pair (shift 0.25, 128 px, a whole number of tokens on every grid) per harm image, the harm images
being the probe's test images (paper split: the last 20 %), plus one stereo pair whose disparity is synthetic
(40 px everywhere, NaN in the first 40 columns), not the Middlebury one. Its content does not matter here: the work
per pair is the same.

Measured, each in a FRESH subprocess (``--child``), with ``torch.set_num_threads(--threads)`` (default 2: the
2-core machine the estimate is for):

(a) ``match``: :func:`diffaudit.harm.matching.nearest_tokens` of one pair at each layer size (1024 source tokens,
    ``harm.source_tokens``, or all tokens of a smaller map, against all target tokens), fastest of ``--match-repeat``
    calls after one warm-up;
(b) ``layer``: :func:`diffaudit.harm.evaluate.harm_tables` on one layer with the project's ``params.yaml`` (probe,
    bootstrap, harm sections): fitting the six mitigations, the harm of every pair under each, and the artifact
    measures on the mitigated features. Its parts are timed by wrapping the module's functions (no library change):
    ``cache`` (``store.LayerCache``: the layer read into memory), ``fit`` (``fit_store_mitigations``, base and crop),
    ``harm`` (``layer_harm``; of which ``match``: the ``nearest_tokens`` calls) and ``measures`` (``layer_measures``;
    of which ``probe_acc8``, ``corner_ratio``, ``rel_norm``, ``pooled`` and ``class_probe``: the analyses it runs).

Memory, per child: ``+MiB`` = ``VmHWM`` (the process's resident high-water mark, ``/proc/self/status``) minus the RSS
after imports and opening the stores; ``ru_maxrss`` (``resource.getrusage``) is recorded in the JSON as well (on
Linux it inherits the parent's RSS at fork, see ``bench_similarity.py``); ``tracemalloc`` gives the peak of Python
and numpy allocations (torch's and zarr's native buffers are not traced; tracemalloc slows Python, so it runs in a
separate memory run, with the fixed glibc mmap threshold of ``bench_similarity.py``, and times come from the
timing run; in it each leaf part's traced peak is recorded too, ``tracemalloc_part_peak_mib``). ``cache MiB`` is the size of the layer (and crop layer) that ``LayerCache`` holds: N x C x H x W x 2
bytes, which grows with N by design. Matching holds one block of at most ``matching.BLOCK_BYTES`` of similarities
per pair, flat in N; ``probe_acc8`` runs the position probe, which holds one layer's tokens (the probe analysis's
design, docs of ``analyses.probe``), so it grows with N too, and the per-part peaks show by how much.

Estimate for the paper's size (500 images: 400 fit / 100 test, ``harm.n_images`` = 50 flip and 50 shift pairs and
the stereo pair, 45 layers): per layer size, the time outside ``harm`` is fitted as a + b N over the measured N
(least squares; when the slope comes out negative, as load noise can make it, the largest N's seconds per image
are used instead, an upper bound) and evaluated at 500; ``harm`` scales with the pairs (measured seconds per pair x 101). Each of the
45 paper layers (``families.sd.PAPER_LAYERS``, ``layer_shape`` at 512 px: 13 at 64 x 64, 12 at 32 x 32, 12 at
16 x 16, 8 at 8 x 8) takes its map size's estimate scaled by its channels over the measured layer's (work is about
linear in channels). Memory at that size: ``+MiB`` fitted as a + b N per map size, evaluated at 500 and scaled by
channels; the largest over the 45 layers is the run's peak (one layer at a time).
With ``--gpu`` the same runs use device ``cuda`` (matching and the probes) and report the GPU's peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

import bench_similarity as _bs  # noqa: E402  (RSS helpers and the worker environment)

IMAGE_SIZE = 512
REF_GRID = 32
SHIFT = 0.25
DISPARITY_PX = 40.0
N_CLASSES = 4
SHARD_IMAGES = 20
# (map size n) -> (layer, channels): real SD-1.5 names and shapes at 512 px.
LAYERS: dict[int, tuple[str, int]] = {
    64: ("down_blocks[0].resnets[0]", 320),
    32: ("down_blocks[1].resnets[0]", 640),
    16: ("down_blocks[2].resnets[0]", 1280),
    8: ("down_blocks[3].resnets[0]", 1280),
}
MASSIVE_CHANNELS = (3, 17)
PATCH_GAIN = 6.0
PAPER_IMAGES = 500
PAPER_PAIRS_PER_TASK = 50


def _params() -> dict:
    from diffaudit.config import load_config

    return load_config(ROOT / "params.yaml")


# ---------------------------------------------------------------------------------------------
# synthetic stores and pairs (parent)
# ---------------------------------------------------------------------------------------------

def split(n_images: int, probe: dict):
    from diffaudit.harm.evaluate import harm_images

    return harm_images(n_images, probe, n_images)


def write_inputs(d: Path, n_images: int, sizes, probe: dict, seed: int = 0) -> dict:
    """``full.zarr``, ``crop<t>.zarr``, ``pairs.zarr``, ``pairs.csv``, ``disparity.npy`` and ``labels.npy``."""
    import numpy as np
    import pandas as pd

    from diffaudit.harm.pairs import PAIRS_COLUMNS, shift_pixels
    from diffaudit.store import StoreWriter

    rng = np.random.default_rng(seed)
    _, test = split(n_images, probe)
    s_px = shift_pixels(SHIFT, IMAGE_SIZE)
    rows, k = [], 0
    for i in test:  # flip: source in the base store, target (its "mirror") in the pairs store
        rows.append((len(rows), "flip", f"img{int(i):05d}", "base", int(i), k, 0))
        k += 1
    for i in test:  # shift: windows A and B both in the pairs store
        rows.append((len(rows), "shift", f"img{int(i):05d}", "pairs", k, k + 1, s_px))
        k += 2
    rows.append((len(rows), "stereo", "", "pairs", k, k + 1, 0))
    k += 2
    pairs = pd.DataFrame(rows, columns=list(PAIRS_COLUMNS))
    pairs.to_csv(d / "pairs.csv", index=False)
    disparity = np.full((IMAGE_SIZE, IMAGE_SIZE), DISPARITY_PX, np.float32)
    disparity[:, : int(DISPARITY_PX)] = np.nan
    np.save(d / "disparity.npy", disparity)
    imgs = np.arange(0, n_images, 2)
    labels = np.column_stack([imgs, 2 * rng.integers(0, REF_GRID // 2, size=(imgs.size, 2))]).astype(np.int64)
    np.save(d / "labels.npy", labels)

    spec = [(LAYERS[n][0], LAYERS[n][1], n) for n in sizes]
    mus = {}
    for layer, c, _ in spec:
        mu = rng.normal(scale=0.5, size=(c, 1, 1)).astype(np.float32)
        mu[list(MASSIVE_CHANNELS)] += 80.0
        mus[layer] = mu

    def write(path: Path, n_img: int, crop: bool, layers, class_labels, plant):
        ids = [f"img{i:05d}" for i in range(n_img)]
        w = StoreWriter(path, layers=[s[0] for s in layers], image_ids=ids, labels=class_labels,
                        config={"bench": "harm", "image_size": IMAGE_SIZE}, attrs={"image_size": IMAGE_SIZE},
                        shard_images=SHARD_IMAGES)
        for s in range(0, n_img, SHARD_IMAGES):
            b = min(SHARD_IMAGES, n_img - s)
            batch = {}
            for layer, c, n in layers:
                m = n - 2 if crop else n
                x = mus[layer] + rng.normal(size=(b, c, m, m)).astype(np.float32)
                if plant:
                    scale = n / REF_GRID
                    q = max(1, int(2 * scale))
                    for img, px, py in labels:
                        j = int(img) - s
                        if 0 <= j < b:
                            r0, c0 = int(py * scale), int(px * scale)
                            x[j, :, r0:r0 + q, c0:c0 + q] *= PATCH_GAIN
                batch[layer] = x
            w.write_batch(s, batch)
        w.finalize()

    cls = [i % N_CLASSES for i in range(n_images)]
    write(d / "full.zarr", n_images, False, spec, cls, True)
    for layer, c, n in spec:
        if n >= 3:
            write(d / f"crop{IMAGE_SIZE // n}.zarr", n_images, True, [(layer, c, n)], cls, False)
    write(d / "pairs.zarr", k, False, spec, [0] * k, False)
    return {"pairs": len(pairs), "pair_images": k, "harm_images": int(len(test)), "fit_images": n_images - len(test)}


# ---------------------------------------------------------------------------------------------
# children (fresh process per measurement)
# ---------------------------------------------------------------------------------------------

def _gpu_peak_mib(device: str):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return None


def child_match(n: int, device: str, repeat: int, mem: bool) -> dict:
    import numpy as np
    import torch

    from diffaudit.harm import matching

    layer, c = LAYERS[n]
    rng = np.random.default_rng(0)
    src_all = rng.normal(size=(n * n, c)).astype(np.float32)
    tgt = rng.normal(size=(n * n, c)).astype(np.float32)
    tokens = matching.sample_tokens(np.ones(n * n, bool), 1024, rng)
    src = src_all[tokens]
    matching.nearest_tokens(src, tgt, device)  # warm-up (allocator, CUDA context)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _bs._current_rss_mib()
    if mem:
        import tracemalloc

        tracemalloc.start()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        matching.nearest_tokens(src, tgt, device)
        times.append(time.perf_counter() - t0)
    out = {"kind": "match", "spatial": n, "layer": layer, "channels": c, "source_tokens": int(tokens.size),
           "target_tokens": n * n, "wall_s": min(times), "wall_s_all": times,
           "peak_rss_mib": _bs._peak_rss_mib(), "baseline_rss_mib": baseline,
           "ru_maxrss_mib": _bs._ru_maxrss_mib(), "gpu_peak_mib": _gpu_peak_mib(device)}
    if mem:
        out["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
    return out


class _Clock:
    """Seconds per part (summed over calls) and, when tracemalloc runs, each leaf part's traced peak (MiB; the
    peak is reset before a leaf, and the overall peak is the largest of all)."""

    def __init__(self, traced: bool):
        self.s: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peak: dict[str, float] = {}
        self.traced = traced
        self.overall = 0.0

    def wrap(self, name: str, fn, leaf: bool = False):
        import tracemalloc

        def timed(*args, **kwargs):
            trace = leaf and self.traced
            if trace:
                self.overall = max(self.overall, tracemalloc.get_traced_memory()[1])
                tracemalloc.reset_peak()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1
                if trace:
                    peak = tracemalloc.get_traced_memory()[1]
                    self.overall = max(self.overall, peak)
                    self.peak[name] = max(self.peak.get(name, 0.0), peak / 2**20)
                    tracemalloc.reset_peak()
        return timed

    def overall_mib(self) -> float:
        import tracemalloc

        return max(self.overall, tracemalloc.get_traced_memory()[1]) / 2**20


def child_layer(d: Path, n: int, device: str, mem: bool, profile: bool) -> dict:
    import dataclasses

    import numpy as np

    from diffaudit.analyses.bootstrap import Bootstrap
    from diffaudit.harm import evaluate, matching
    from diffaudit.harm.pairs import load_pairs  # noqa: F401  (same import cost as the rule)
    from diffaudit.pipeline.harm import settings as harm_settings
    from diffaudit.store import ReprStore

    import pandas as pd

    cfg = _params()
    st = dataclasses.replace(harm_settings(cfg), device=device)
    layer, c = LAYERS[n]
    full = ReprStore(d / "full.zarr")
    crops = {int(p.name[4:-5]): ReprStore(p) for p in sorted(d.glob("crop*.zarr"))}
    pairs_store = ReprStore(d / "pairs.zarr")
    pairs = pd.read_csv(d / "pairs.csv", dtype={"task": str, "source_image": str, "source_store": str},
                        keep_default_na=False, na_filter=False)
    disparity = np.load(d / "disparity.npy")
    labels = np.load(d / "labels.npy")
    fit, test = split(full.n_images, cfg["probe"])
    boot = Bootstrap.from_config(cfg["bootstrap"])

    clock = _Clock(mem)
    evaluate.fit_store_mitigations = clock.wrap("fit", evaluate.fit_store_mitigations, leaf=True)
    evaluate.layer_harm = clock.wrap("harm", evaluate.layer_harm)
    evaluate.layer_measures = clock.wrap("measures", evaluate.layer_measures)
    evaluate.LayerCache = clock.wrap("cache", evaluate.LayerCache, leaf=True)
    matching.nearest_tokens = clock.wrap("match", matching.nearest_tokens, leaf=True)
    # the artifact measures' parts (names as layer_measures calls them)
    for part, name in (("probe_acc8", "_probe_acc8"), ("corner_ratio", "token_group_similarity"),
                       ("rel_norm", "relative_norms"), ("pooled", "_pooled"), ("class_probe", "class_probe")):
        setattr(evaluate, name, clock.wrap(part, getattr(evaluate, name), leaf=True))
    baseline = _bs._current_rss_mib()
    if mem:
        import tracemalloc

        tracemalloc.start()
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    harm, measures = evaluate.harm_tables(full, crops, pairs_store, pairs, disparity, layers=[layer],
                                          fit_images=fit, test_images=test, labels=labels, ref_grid=REF_GRID,
                                          probe=cfg["probe"], image_size=IMAGE_SIZE, settings=st, bootstrap=boot,
                                          model_name="bench")
    wall = time.perf_counter() - t0
    out = {"kind": "layer", "spatial": n, "layer": layer, "channels": c, "images": full.n_images,
           "fit_images": int(len(fit)), "test_images": int(len(test)), "pairs": int(len(pairs)),
           "wall_s": wall, "parts_s": clock.s, "calls": clock.calls,
           "peak_rss_mib": _bs._peak_rss_mib(), "baseline_rss_mib": baseline, "ru_maxrss_mib": _bs._ru_maxrss_mib(),
           "gpu_peak_mib": _gpu_peak_mib(device),
           "cache_mib": (full.n_images * c * n * n + (full.n_images * c * (n - 2) ** 2 if n >= 3 else 0)) * 2 / 2**20,
           "harm_rows": int(len(harm)), "measure_rows": int(len(measures)),
           "measured_mitigations": int((measures["note"].str.contains("not measured") == False).sum())}  # noqa: E712
    if mem:
        out["tracemalloc_peak_mib"] = clock.overall_mib()
        out["tracemalloc_part_peak_mib"] = clock.peak
    if prof is not None:
        import io
        import pstats

        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
        buf.write("\n")
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        out["profile"] = buf.getvalue()
    return out


def run_child(args: list[str], a, mem: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--threads", str(a.threads),
           "--device", "cuda" if a.gpu else "cpu"]
    if mem:
        cmd.append("--mem")
    out = subprocess.run(cmd, capture_output=True, text=True, env=_bs._worker_env(mem))
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"child {args} failed with exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args: list[str], a) -> dict:
    """One timing run (glibc's default allocator, no tracemalloc) and, unless ``--no-mem-run``, one memory run
    (tracemalloc on, fixed mmap threshold) whose peaks replace the timing run's."""
    r = run_child(args, a, mem=False)
    if not a.no_mem_run:
        m = run_child(args, a, mem=True)
        for k in ("peak_rss_mib", "baseline_rss_mib", "tracemalloc_peak_mib", "tracemalloc_part_peak_mib",
                  "ru_maxrss_mib", "gpu_peak_mib"):
            r[k] = m.get(k)
    r["increment_mib"] = r["peak_rss_mib"] - r["baseline_rss_mib"]
    return r


# ---------------------------------------------------------------------------------------------
# estimate
# ---------------------------------------------------------------------------------------------

def paper_mix() -> list[tuple[str, int, int]]:
    from diffaudit.families.sd import PAPER_LAYERS, layer_shape

    return [(layer, *layer_shape(layer, IMAGE_SIZE)) for layer in PAPER_LAYERS]


def _line(x, y):
    """``(a, b)`` of y = a + b x by least squares (one point: through the origin)."""
    import numpy as np

    if len(x) > 1:
        b, a0 = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
        return float(a0), float(b)
    return 0.0, float(y[0] / x[0])


def estimate(layer_runs: list[dict]) -> dict:
    """The paper-size estimate (module docstring) from the ``layer`` measurements."""
    per_size = {}
    for n in sorted({r["spatial"] for r in layer_runs}, reverse=True):
        rs = sorted((r for r in layer_runs if r["spatial"] == n), key=lambda r: r["images"])
        x = [r["images"] for r in rs]
        rest = [r["wall_s"] - r["parts_s"].get("harm", 0.0) for r in rs]
        per_pair = sorted(r["parts_s"].get("harm", 0.0) / r["pairs"] for r in rs)[len(rs) // 2]
        a0, b = _line(x, rest)
        if b <= 0:  # a load-noise slope: the largest N's seconds per image (an upper bound)
            a0, b = 0.0, rest[-1] / x[-1]
        pairs = 2 * PAPER_PAIRS_PER_TASK + 1
        m0, mb = _line(x, [r["increment_mib"] for r in rs])
        per_size[n] = {"channels": rs[0]["channels"], "rest_a_s": a0, "rest_b_s_per_image": b,
                       "harm_s_per_pair": per_pair, "layer_s": a0 + b * PAPER_IMAGES + per_pair * pairs,
                       "increment_a_mib": m0, "increment_b_mib_per_image": mb,
                       "increment_mib": m0 + mb * PAPER_IMAGES,
                       "cache_mib_per_image": rs[-1]["cache_mib"] / rs[-1]["images"]}
    total, covered, missing, peak = 0.0, 0, [], (0.0, "")
    mix = {}
    for layer, c, n in paper_mix():
        mix[f"{n}x{n}"] = mix.get(f"{n}x{n}", 0) + 1
        if n not in per_size:
            missing.append(layer)
            continue
        v = per_size[n]
        total += v["layer_s"] * c / v["channels"]
        covered += 1
        mem = v["increment_mib"] * c / v["channels"]
        peak = max(peak, (mem, layer))
    return {"per_size": per_size, "paper_layers_by_map": mix, "paper_layers_covered": covered,
            "paper_layers_missing": missing, "total_s": total, "peak_increment_mib": peak[0],
            "peak_layer": peak[1]}


def report(data: dict) -> None:
    """Print the tables and the estimate of a run (``data`` as written to ``--out``)."""
    meta, matches, layers = data["meta"], data["match"], data["layers"]
    device, threads = meta["device"], meta["torch_threads"]
    print(f"\n(a) matching one pair (nearest_tokens, device {device}, {threads} threads)")
    hdr = f"{'map':>6} {'C':>5} {'src x tgt':>12} {'ms':>8} {'+MiB':>7} {'tracemalloc':>11}"
    print(hdr + "\n" + "-" * len(hdr))
    for r in matches:
        tm = r.get("tracemalloc_peak_mib")
        print(f"{r['spatial']:>3}x{r['spatial']:<2} {r['channels']:5d} {r['source_tokens']:>5}x{r['target_tokens']:<6} "
              f"{1e3 * r['wall_s']:8.1f} {r['increment_mib']:7.1f} {'-' if tm is None else f'{tm:.1f}':>11}")
    print(f"\n(b) harm_tables per layer (fit + harm + measures), device {device}")
    hdr = (f"{'map':>6} {'N':>4} {'pairs':>5} {'seconds':>8} {'fit':>6} {'harm':>6} {'match':>6} {'meas.':>6} "
           f"{'+MiB':>6} {'cache':>6} {'+-cache':>7} {'tracem.':>7}")
    print(hdr + "\n" + "-" * len(hdr))
    for n in sorted({r["spatial"] for r in layers}, reverse=True):
        for r in (r for r in layers if r["spatial"] == n):
            ps = r["parts_s"]
            tm = r.get("tracemalloc_peak_mib")
            print(f"{n:>3}x{n:<2} {r['images']:4d} {r['pairs']:5d} {r['wall_s']:8.1f} {ps.get('fit', 0):6.1f} "
                  f"{ps.get('harm', 0):6.1f} {ps.get('match', 0):6.1f} {ps.get('measures', 0):6.1f} "
                  f"{r['increment_mib']:6.0f} {r['cache_mib']:6.0f} {r['increment_mib'] - r['cache_mib']:7.0f} "
                  f"{'-' if tm is None else f'{tm:.0f}':>7}")
    parted = [r for r in layers if r.get("tracemalloc_part_peak_mib")]
    if parted:
        print("\ntraced peak (tracemalloc, MiB) and seconds per part of harm_tables")
        for r in parted:
            print(f"{r['spatial']:>3}x{r['spatial']:<2} N={r['images']:<4d}" + "  ".join(
                f"{k} {v:.0f} ({r['parts_s'].get(k, 0.0):.1f} s)" for k, v in r["tracemalloc_part_peak_mib"].items()))
    est = estimate(layers)
    print(f"\nestimate, paper size ({PAPER_IMAGES} images, {2 * PAPER_PAIRS_PER_TASK + 1} pairs, 45 layers: "
          + ", ".join(f"{v} at {k}" for k, v in est["paper_layers_by_map"].items()) + f"), device {device}, "
          f"{threads} threads:")
    for n, v in est["per_size"].items():
        print(f"  {n:2d}x{n:<2d} {v['channels']:5d} ch: {v['rest_a_s']:.1f} s + {v['rest_b_s_per_image']:.3f} s/image "
              f"+ {v['harm_s_per_pair']:.3f} s/pair -> {v['layer_s'] / 60:.1f} min per layer")
    if est["paper_layers_missing"]:
        print(f"  (no measured layer with the map size of {len(est['paper_layers_missing'])} paper layer(s): "
              "left out of the total)")
    print(f"  total {est['total_s'] / 3600:.1f} h for {est['paper_layers_covered']} layers (one after another)")
    for n, v in est["per_size"].items():
        print(f"  memory {n:2d}x{n:<2d}: +{v['increment_a_mib']:.0f} MiB + {v['increment_b_mib_per_image']:.1f} "
              f"MiB/image (of which the layer cache {v['cache_mib_per_image']:.1f}) -> "
              f"{v['increment_mib'] / 1024:.1f} GiB at {PAPER_IMAGES} images")
    print(f"  peak memory (the largest layer, channels scaled): {est['peak_layer']} "
          f"+{est['peak_increment_mib'] / 1024:.1f} GiB over the process's baseline")
    if device == "cpu":
        print("GPU estimate: run the same with --gpu on a CUDA machine.")
    print(f"total {meta['total_s']:.0f} s; load average at start {meta['loadavg_start'][0]:.2f}, at end "
          f"{meta['loadavg_end'][0]:.2f} (1 min; {meta['cores']} cores)")
    if data.get("profile"):
        n_max = max(r["images"] for r in layers)
        print(f"\nprofile of harm_tables on the 64x64 layer (N={n_max}):\n{data['profile']}")


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[10, 20, 40], help="numbers of images N (80/20 split)")
    p.add_argument("--layers", type=int, nargs="+", choices=sorted(LAYERS), default=sorted(LAYERS, reverse=True),
                   help="map sizes of the layers to run harm_tables on")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the estimate's 2 cores)")
    p.add_argument("--gpu", action="store_true", help="device cuda for matching and the probes")
    p.add_argument("--match-repeat", type=int, default=5)
    p.add_argument("--no-mem-run", action="store_true", help="no separate memory run (no tracemalloc)")
    p.add_argument("--profile", action="store_true", help="cProfile harm_tables on the 64x64 layer at the largest N")
    p.add_argument("--quick", action="store_true",
                   help="a short run (N 10 20, the 8x8 layer, no memory run): about a minute")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench_harm.json")
    p.add_argument("--report", type=Path, metavar="JSON", help="print the tables and estimate of a saved --out")
    p.add_argument("--child", choices=("match", "layer"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--mem", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--do-profile", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        if a.child == "match":
            r = child_match(a.n, a.device, a.match_repeat, a.mem)
        else:
            r = child_layer(a.store_dir, a.n, a.device, a.mem, a.do_profile)
        print(json.dumps(r))
        return 0

    if a.report:
        report(json.loads(a.report.read_text()))
        return 0
    if a.quick:
        a.images, a.layers, a.no_mem_run, a.match_repeat = [10, 20], [8], True, 2
    if a.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: CUDA is not available on this machine")
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    device = "cuda" if a.gpu else "cpu"
    probe = _params()["probe"]
    print("layers: " + ", ".join(f"{LAYERS[n][0]} {LAYERS[n][1]}x{n}x{n}" for n in a.layers)
          + f"\nfloat16 stores, device {device}, torch threads {a.threads}, cores {os.cpu_count()}, "
          f"load average {load_start[0]:.2f}", flush=True)

    matches = []
    for n in sorted(LAYERS, reverse=True):
        r = measure(["--child", "match", "--n", str(n), "--match-repeat", str(a.match_repeat)], a)
        matches.append(r)
        print(f"  match {n:2d}x{n:<2d} {r['channels']:5d} ch  {r['source_tokens']:5d} x {r['target_tokens']:5d} "
              f"tokens  {1e3 * r['wall_s']:8.1f} ms  +{r['increment_mib']:6.1f} MiB", flush=True)

    layers, profile = [], None
    with tempfile.TemporaryDirectory(prefix="bench_harm_") as tmp:
        for n_images in a.images:
            d = Path(tmp) / f"N{n_images}"
            d.mkdir()
            t0 = time.perf_counter()
            info = write_inputs(d, n_images, a.layers, probe)
            print(f"N={n_images} ({info['fit_images']} fit, {info['harm_images']} harm images, {info['pairs']} "
                  f"pairs): stores written in {time.perf_counter() - t0:.1f} s", flush=True)
            for n in a.layers:
                args = ["--child", "layer", "--n", str(n), "--store-dir", str(d)]
                r = measure(args, a)
                r.update(info)
                layers.append(r)
                parts = " ".join(f"{k} {v:.1f}" for k, v in r["parts_s"].items())
                print(f"  {n:2d}x{n:<2d} {r['wall_s']:7.1f} s ({parts})  +{r['increment_mib']:6.0f} MiB "
                      f"(cache {r['cache_mib']:.0f})", flush=True)
            if a.profile and n_images == max(a.images) and 64 in a.layers:
                profile = run_child(["--child", "layer", "--n", "64", "--store-dir", str(d), "--do-profile"], a,
                                    mem=False)["profile"]
            shutil.rmtree(d)

    total = time.perf_counter() - t_start
    load = os.getloadavg()
    meta = {"image_size": IMAGE_SIZE, "dtype": "float16", "device": device, "torch_threads": a.threads,
            "cores": os.cpu_count(), "layers": {str(n): list(LAYERS[n]) for n in a.layers},
            "memory_run": not a.no_mem_run, "total_s": total, "loadavg_start": list(load_start),
            "loadavg_end": list(load), "ru_maxrss_parent_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    data = {"meta": meta, "match": matches, "layers": layers, "estimate": estimate(layers), "profile": profile}
    report(data)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(data, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
