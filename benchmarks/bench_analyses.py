"""Benchmark: wall time and peak RSS of every analysis as the number of images N grows.

    python benchmarks/bench_analyses.py [--images 20 40 80] [--probe-epochs 1] [--repeat 3]
                                        [--out benchmarks/out/analyses.json]

For each N, synthetic representation stores are written once with ``StoreWriter`` into a temporary directory:
a ``full`` store with six SD-1.5-like layers at 512 px (the real layer names and map sizes, fewer channels so it
runs quickly on a small CPU), float16, random data, and the ``crop<t>`` stores the similarity analysis needs
(one per token size t = 512 // n, holding the layers with an n x n map at (n-2) x (n-2)). Every other image gets
a planted high-norm 2x2 patch on the 32 x 32 grid of ``up_blocks[1].upsamplers[0]`` (scaled to the other grids,
as the relative-norm analysis reads it), whose positions are saved as a label file; a few channels carry a large
constant so the channel census has outliers to report. (Labelled images are not contiguous, so
``relative_norms`` reads them one image at a time: its memory is that of one image per layer.)

Each analysis then runs in a FRESH subprocess (``--child``) on those stores:

* ``probe``            ``run_probe(store, layers, mode="paper", epochs=--probe-epochs, device="cpu")``
* ``similarity``       ``token_group_similarity(full, crops, layers, mode="paper", image_size=512, ...)``
* ``detect_anomalies`` ``detect_anomalies(store, "up_blocks[1].upsamplers[0]", threshold=2.0)``
* ``relative_norms``   ``relative_norms(store, planted labels, layers, mode="paper")``
* ``channels``         ``channel_outliers(store, layers)``

Measured in the child (see ``bench_similarity.py`` for why VmHWM and not ``ru_maxrss``): wall seconds of the
analysis call only; peak RSS = ``VmHWM`` from ``/proc/self/status`` just before exit; baseline = ``VmRSS`` after
importing numpy/torch/zarr/all analysis modules and opening the stores; +MiB = peak - baseline, i.e. what the
analysis itself added. Streaming analyses read ``chunk_images`` (default 20) images at a time, so their +MiB
should stay flat in N. The probe holds one layer's tokens (N*H*W*C float16, plus a float32 copy of the test
tokens) by design, so its +MiB grows linearly with N; that is expected and reported as is. Timing runs use
glibc's default allocator; one more run per measurement gives the memory, with the same fixed glibc mmap
threshold as ``bench_similarity.py`` (``--glibc-default-malloc``: no memory run). Children use one torch thread
(``--threads``): on a small machine shared with other work, multi-threaded torch made the probe's many small steps
several times slower and erratic. Each time is the fastest of ``--repeat`` fresh processes.
"""
from __future__ import annotations

import argparse
import json
import os
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
REF_LAYER = "up_blocks[1].upsamplers[0]"
REF_GRID = 32
# (layer, channels, spatial): real SD-1.5 names and map sizes at 512 px; channels reduced (SD-1.5 has 320..1280).
LAYERS: tuple[tuple[str, int, int], ...] = (
    ("down_blocks[0].resnets[0]", 64, 64),
    ("down_blocks[1].resnets[0]", 128, 32),
    (REF_LAYER, 160, 32),
    ("down_blocks[2].resnets[0]", 256, 16),
    ("down_blocks[3].resnets[0]", 320, 8),
    ("up_blocks[3].resnets[0]", 64, 64),
)
ANALYSES = ("probe", "similarity", "detect_anomalies", "relative_norms", "channels")
SHARD_IMAGES = 20
PATCH_GAIN = 6.0  # planted patch tokens are scaled by this factor (norm ~6x the typical token)
MASSIVE_CHANNELS = (3, 17)  # channels with a large constant offset (channel census outliers)


# ---------------------------------------------------------------------------------------------
# synthetic stores (parent)
# ---------------------------------------------------------------------------------------------

def planted_labels(n_images: int, seed: int = 0):
    """(K, 3) int64 rows (image, x, y): one even-aligned 2x2 patch on the 32x32 grid in every other image."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    imgs = np.arange(0, n_images, 2)
    xy = 2 * rng.integers(0, REF_GRID // 2, size=(len(imgs), 2))
    return np.column_stack([imgs, xy]).astype(np.int64)


def _plant(x, i0: int, labels, spatial: int) -> None:
    """Scale the labelled patch of each image of chunk ``x`` (b, C, n, n) at grid ``spatial`` in place."""
    scale = spatial / REF_GRID
    k = max(1, int(2 * scale))
    for img, px, py in labels:
        b = int(img) - i0
        if 0 <= b < x.shape[0]:
            r0, c0 = int(py * scale), int(px * scale)
            x[b, :, r0:r0 + k, c0:c0 + k] *= PATCH_GAIN


def write_stores(store_dir: Path, n_images: int, seed: int = 0) -> None:
    """``full.zarr``, ``crop<t>.zarr`` (t = 8, 16, 32, 64) and ``labels.npy`` under ``store_dir``."""
    import numpy as np

    from diffaudit.store import StoreWriter

    rng = np.random.default_rng(seed)
    ids = [f"img{i:05d}" for i in range(n_images)]
    labels = planted_labels(n_images, seed)
    np.save(store_dir / "labels.npy", labels)
    mus = {}
    for layer, c, _ in LAYERS:
        mu = rng.normal(scale=0.5, size=(c, 1, 1)).astype(np.float32)
        mu[list(MASSIVE_CHANNELS)] += 80.0  # "massive" channels: max |act| ~ 20x the median channel
        mus[layer] = mu
    stores = {"full": [(layer, c, n, n) for layer, c, n in LAYERS]}
    for layer, c, n in LAYERS:
        stores.setdefault(f"crop{IMAGE_SIZE // n}", []).append((layer, c, n, n - 2))
    for variant, spec in stores.items():
        w = StoreWriter(store_dir / f"{variant}.zarr", layers=[s[0] for s in spec], image_ids=ids, labels=None,
                        config={"bench": "analyses", "variant": variant, "image_size": IMAGE_SIZE},
                        attrs={"image_size": IMAGE_SIZE}, shard_images=SHARD_IMAGES)
        for s in range(0, n_images, SHARD_IMAGES):
            b = min(SHARD_IMAGES, n_images - s)
            batch = {}
            for layer, c, n, size in spec:
                x = mus[layer] + rng.normal(size=(b, c, size, size)).astype(np.float32)
                if variant == "full":
                    _plant(x, s, labels, n)
                else:  # planted corner similarity in the crop maps
                    x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]] += 2.0 * mus[layer][None, :, :, 0]
                batch[layer] = x
            w.write_batch(s, batch)
        w.finalize()


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


# ---------------------------------------------------------------------------------------------
# child (fresh process per measurement)
# ---------------------------------------------------------------------------------------------

def child(analysis: str, store_dir: Path, probe_epochs: int, chunk_images: int, threads: int | None) -> dict:
    import numpy as np
    import torch

    from diffaudit.analyses import anomalies, channels, probe, similarity
    from diffaudit.store import ReprStore

    if threads:
        torch.set_num_threads(threads)
    layers = [layer for layer, _, _ in LAYERS]
    full = ReprStore(store_dir / "full.zarr")
    crops = {}
    if analysis == "similarity":
        crops = {int(p.name[4:-5]): ReprStore(p) for p in sorted(store_dir.glob("crop*.zarr"))}
    labels = np.load(store_dir / "labels.npy") if analysis == "relative_norms" else None
    baseline = _bs._current_rss_mib()

    t0 = time.perf_counter()
    if analysis == "probe":
        df = probe.run_probe(full, layers, mode="paper", epochs=probe_epochs, device="cpu",
                             chunk_images=chunk_images)
    elif analysis == "similarity":
        df = similarity.token_group_similarity(full, crops, layers, mode="paper", image_size=IMAGE_SIZE,
                                               chunk_images=chunk_images, model_name="bench")
    elif analysis == "detect_anomalies":
        found = anomalies.detect_anomalies(full, REF_LAYER, threshold=2.0, chunk_images=chunk_images)
    elif analysis == "relative_norms":
        df = anomalies.relative_norms(full, labels, layers, mode="paper", chunk_images=chunk_images)
    elif analysis == "channels":
        df = channels.channel_outliers(full, layers, chunk_images=chunk_images)
    else:
        raise ValueError(analysis)
    wall = time.perf_counter() - t0
    peak = _bs._peak_rss_mib()

    # a small sanity summary of the result (computed after the measurement)
    if analysis == "probe":
        last = df[(df.epoch == df.epoch.max()) & (df.metric == "per_axis") & (df.granularity == 64)]
        check = {"per_axis_acc_g64": dict(zip(last.layer, last.accuracy.round(4)))}
    elif analysis == "similarity":
        check = {"corner_ratio": dict(zip(df.layer, df.corner_ratio.round(4)))}
    elif analysis == "detect_anomalies":
        pr = anomalies.precision_recall(found, np.load(store_dir / "labels.npy"))
        check = {k: pr[k] for k in ("n_detected", "n_reference", "precision", "recall")}
    elif analysis == "relative_norms":
        check = {"rel_norm_mean": dict(zip(df.layer, df.rel_norm_mean.round(3)))}
    else:
        check = {"n_outlier_channels": dict(df.groupby("layer", sort=False).size())}
        check["n_outlier_channels"] = {k: int(v) for k, v in check["n_outlier_channels"].items()}
    return {"analysis": analysis, "wall_s": wall, "peak_rss_mib": peak, "baseline_rss_mib": baseline,
            "peak_increment_mib": peak - baseline, "ru_maxrss_mib": _bs._ru_maxrss_mib(), "check": check}


def run_child(analysis: str, store_dir: Path, a) -> dict:
    """``a.repeat`` fresh timing processes (fastest wall time, default allocator) and one memory process (peak RSS,
    fixed glibc mmap threshold; skipped with ``--glibc-default-malloc``, then the largest RSS of the timing runs)."""
    def once(fixed: bool) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", analysis, "--store-dir", str(store_dir),
               "--probe-epochs", str(a.probe_epochs), "--chunk-images", str(a.chunk_images)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=_bs._worker_env(fixed))
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"child {analysis} failed with exit status {out.returncode}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["process_s"] = time.perf_counter() - t0
        return r

    runs = [once(False) for _ in range(a.repeat)]
    mem = [once(True)] if not a.glibc_default_malloc else runs
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["wall_s_all"] = [r["wall_s"] for r in runs]
    for k in ("peak_rss_mib", "peak_increment_mib"):
        best[k] = max(r[k] for r in mem)
    best["baseline_rss_mib"] = mem[0]["baseline_rss_mib"]
    return best


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[20, 40, 80], help="numbers of images N")
    p.add_argument("--analyses", nargs="+", choices=ANALYSES, default=list(ANALYSES))
    p.add_argument("--probe-epochs", type=int, default=1)
    p.add_argument("--chunk-images", type=int, default=20, help="images per streamed chunk (all analyses)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the children (default 1: stable timings on a small shared CPU; "
                        "0: torch's default)")
    p.add_argument("--repeat", type=int, default=3, help="fresh timing processes per measurement (fastest kept)")
    p.add_argument("--out", type=Path, default=HERE / "out" / "analyses.json", help="JSON results")
    p.add_argument("--glibc-default-malloc", action="store_true",
                   help="no separate memory run with a fixed glibc mmap threshold (RSS then includes allocator "
                        "retention)")
    p.add_argument("--child", choices=ANALYSES, help=argparse.SUPPRESS)
    p.add_argument("--store-dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.store_dir, a.probe_epochs, a.chunk_images, a.threads)))
        return 0

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    desc = ", ".join(f"{layer} {c}x{n}x{n}" for layer, c, n in LAYERS)
    print(f"layers: {desc}\nfloat16, chunk {a.chunk_images} images, probe epochs {a.probe_epochs} (CPU), "
          f"cores {os.cpu_count()}, torch threads {a.threads or 'default'}, {a.repeat} timing run(s) per "
          "measurement (fastest kept) + 1 memory run", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_analyses_") as tmp:
        for n_images in a.images:
            d = Path(tmp) / f"N{n_images}"
            d.mkdir()
            t0 = time.perf_counter()
            write_stores(d, n_images)
            size = {p.name: round(_dir_mib(p), 1) for p in sorted(d.glob("*.zarr"))}
            print(f"N={n_images}: stores written in {time.perf_counter() - t0:.1f} s "
                  f"(full {size['full.zarr']:.0f} MiB on disk)", flush=True)
            for analysis in a.analyses:
                r = run_child(analysis, d, a)
                r.update({"images": n_images, "store_mib": size})
                results.append(r)
                print(f"  {analysis:<17} {r['wall_s']:7.2f} s  peak {r['peak_rss_mib']:6.0f} MiB  "
                      f"+{r['peak_increment_mib']:5.0f} MiB  {r['check']}", flush=True)
            shutil.rmtree(d)

    hdr = f"{'analysis':<17} {'N':>5} {'seconds':>8} {'s/image':>8} {'peak MiB':>9} {'base MiB':>9} {'+MiB':>6}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for analysis in a.analyses:
        for r in (r for r in results if r["analysis"] == analysis):
            print(f"{analysis:<17} {r['images']:5d} {r['wall_s']:8.2f} {r['wall_s'] / r['images']:8.4f} "
                  f"{r['peak_rss_mib']:9.0f} {r['baseline_rss_mib']:9.0f} {r['peak_increment_mib']:6.0f}")
    if len(a.images) > 1:
        lo, hi = min(a.images), max(a.images)
        print(f"\nfrom N={lo} to N={hi} ({hi / lo:.0f}x images):")
        for analysis in a.analyses:
            r0 = next(r for r in results if r["analysis"] == analysis and r["images"] == lo)
            r1 = next(r for r in results if r["analysis"] == analysis and r["images"] == hi)
            print(f"  {analysis:<17} time x{r1['wall_s'] / r0['wall_s']:5.2f}   "
                  f"+MiB {r0['peak_increment_mib']:5.0f} -> {r1['peak_increment_mib']:5.0f}")
    print("seconds: the analysis call only (imports and store opening excluded); peak MiB: child's VmHWM; "
          "base MiB: RSS after imports and store opening; +MiB = peak - base. The probe holds one layer's tokens "
          "by design (grows with N); the other analyses stream chunks of images.")
    total = time.perf_counter() - t_start
    load = os.getloadavg()
    print(f"total {total:.0f} s; load average at start {load_start[0]:.2f}, at end {load[0]:.2f} (1 min; timings are "
          f"only comparable on an otherwise idle machine)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"layers": [{"layer": layer, "channels": c, "spatial": n} for layer, c, n in LAYERS],
            "image_size": IMAGE_SIZE, "dtype": "float16", "chunk_images": a.chunk_images,
            "probe_epochs": a.probe_epochs, "repeat": a.repeat, "torch_threads": a.threads or None,
            "cores": os.cpu_count(),
            "memory_run_fixed_mmap_threshold": not a.glibc_default_malloc, "total_s": total,
            "loadavg_start": list(load_start), "loadavg_end": list(load)}
    a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
