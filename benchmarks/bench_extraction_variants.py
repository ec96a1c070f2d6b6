"""Extraction benchmark of the parity-sized run: the ``mini`` model (SD-1.5 layout, small widths, seeded weights,
built in memory, fp32 on CPU), 20 images at 512 px, all 45 paper layers, ``ExtractionSettings()`` (paper mode,
crops, batch 20), i.e. ``full`` plus the four ``crop<t>`` variants (t = 8, 16, 32, 64 px), written into Zarr
stores in a temporary directory.

Each measurement runs ``run_extraction`` in a fresh subprocess (model build and image synthesis excluded) and
reports wall time, process CPU time (all threads; robust on a shared machine), images/s and peak RSS
(``ru_maxrss``). ``--profile`` instruments one run instead: a wall-time breakdown (image loading/cropping, pixels
to tensor, VAE encode, U-Net forward per variant, hooks, the writer thread's Zarr writes and fp16 conversion, the
main thread's waits for the writer, the footprint probe passes) and the top functions of a cProfile of the main
thread.

    python benchmarks/bench_extraction_variants.py                    # 3 timed runs of the current tree
    python benchmarks/bench_extraction_variants.py --profile          # one instrumented run + cProfile top 25
    python benchmarks/bench_extraction_variants.py --src /tmp/head/src --label before   # another source tree
    python benchmarks/bench_extraction_variants.py --keep /tmp/a      # keep the stores (to compare bitwise)
    python benchmarks/bench_extraction_variants.py --compare /tmp/a /tmp/b   # stores bitwise equal?

Results: 2-core AMD EPYC VM (AVX-512), torch 2.13 CPU (2 intra-op threads), diffusers 0.42, zarr 3.1, glibc 2.36.
The machine is shared; the numbers are from runs while the load from other work was below ~1 (runs under load took up
to 2.5x longer and are left out). ``before`` = the extraction of commit 4ae1732 (``--src`` on ``git archive`` of it);
``after`` = this code (6 of the 9 runs with real-device shape probes, which changes the total by < 1.5 s).

    ========================  ==========================  ==========================
    parity-sized run          before (8 runs)             after (9 runs)
    ========================  ==========================  ==========================
    wall, median (min)        75.9 s (73.2 s)             50.9 s (49.6 s)      1.49x
    images/s (median)         0.26                        0.39
    CPU (user+sys), median    145.6 s                     98.6 s               1.48x
    of which sys              16-17 s                     2.0-2.8 s
    minor page faults         7.7-8.5 M                   0.6-0.9 M
    peak RSS                  2.0-2.3 GB                  2.6-4.1 GB (heap kept for reuse)
    stores                    226 MB, 5 variants          bitwise identical (``--compare``)
    ========================  ==========================  ==========================

Without :func:`diffaudit.extract.cpu_heap_reuse` (``--no-heap-reuse``) the new code takes 59.4-59.8 s.

Profile (``--profile``: wall seconds of one instrumented run; cProfile adds ~3 %):

    ==========================================  ======  =====================================
    category                                    before  after
    ==========================================  ======  =====================================
    U-Net forward, full                         15.6    15.1
    U-Net forward, crop8                        13.1    13.6
    U-Net forward, crop16                       11.9    5.5
    U-Net forward, crop32                       9.4     3.7
    U-Net forward, crop64                       5.3     2.0
    VAE encode (5 variants)                     16.4    9.6
    footprint shape probes (5 batch-1 passes)   3.1     2.2 (meta device; 1.0 unprofiled)
    main thread waiting for the writer          2.9     0.1
    writer thread: write_batch (overlapped)     2.9     3.9 (zarr setitem 1.3 / 1.9)
    hooks (copies, fp16 conversion)             0.00    0.01
    pixels to tensor                            0.2     0.2
    image loading and cropping                  0.01    0.02
    total                                       78.3    52.7
    ==========================================  ======  =====================================

Top of the cProfile (tottime, main thread): ``scaled_dot_product_attention`` 52.9 s -> 38.0 s, ``conv2d``
9.9 -> 6.6 s, ``linear`` 2.5 -> 1.5 s, ``group_norm`` 1.4 -> 0.7 s, ``silu`` 1.4 -> 0.6 s, the rest < 0.5 s each.

Where the time went and what changed (no stored bit changed):

* the crop variants ran the whole U-Net although each needs the layers of one resolution: the pass now stops
  after the last layer it needs (crop16/32/64 skip the 64x64 up block, 26.6 s -> 11.2 s);
* page faults: glibc mmaps every activation above its threshold and unmaps it on free, so the kernel faulted and
  zeroed ~8 M pages (16 s of sys time); :func:`~diffaudit.extract.cpu_heap_reuse` keeps freed blocks for reuse on
  the CPU (VAE 16.4 s -> 9.6 s, sys 16 s -> 2 s; costs peak RSS);
* one batch per variant meant each variant waited for its own write: one writer thread now serves all variants;
  the maps are converted to float16 in the hook (torch, vectorised) instead of numpy's slower astype in the writer;
* the five shape probes run on a ``meta``-device copy of the architecture (no compute).

What is left is the attention: on the mini model a 64x64 self-attention is 8 heads of dimension 4 over 4096 tokens,
~2.35 s per call for 20 images (exp-bound; torch's CPU flash kernel), and ``full`` and ``crop8`` need all five of
them. The calls the stored layers depend on cost ~30 s of the ~51 s; with bitwise-identical kernels a 2x
(~38 s) is out of reach on this machine. On a GPU the same changes apply (early stop, one writer thread,
conversion before the copy); the heap reuse is CPU-only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_IMAGES, IMAGE_PX = 20, 512


def make_images(n: int, size: int, seed: int = 0):
    """Smooth random RGB images plus pixel noise (as the tests' ``random_images``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        noise = rng.integers(-20, 21, size=(size, size, 3))
        out.append(Image.fromarray(np.clip(np.asarray(img, dtype=int) + noise, 0, 255).astype(np.uint8)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Instrumentation (profile mode): wall time per category, thread-safe, tolerant of missing internals
# ---------------------------------------------------------------------------------------------------------------

class Timers:
    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.total: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)
        self.variant = "-"

    def add(self, key: str, dt: float):
        with self.lock:
            self.total[key] += dt
            self.count[key] += 1

    def wrap(self, key, fn):
        """``fn`` timed under ``key`` (a string, or a callable giving the key at call time)."""
        import functools

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.add(key() if callable(key) else key, time.perf_counter() - t0)
        return wrapper


def instrument(pipe, timers: Timers):
    """Patch the extraction's pieces with timers; returns an undo function."""
    import torch
    import zarr

    from diffaudit import extract, store

    undo = []

    def patch(obj, name, key):
        if not hasattr(obj, name):
            return
        old = getattr(obj, name)
        own = name in vars(obj) if isinstance(obj, type) else name in obj.__dict__
        setattr(obj, name, timers.wrap(key, old))
        undo.append(lambda: setattr(obj, name, old) if own else delattr(obj, name))

    def variant_of(crop_px):
        return f"crop{crop_px}" if crop_px else "full"

    old_run_batch = extract.Extractor.run_batch

    def run_batch(self, images, image_indices, layers=None, crop_px=0, *a, **kw):
        timers.variant = variant_of(crop_px)
        return old_run_batch(self, images, image_indices, layers, crop_px, *a, **kw)

    extract.Extractor.run_batch = timers.wrap(lambda: f"run_batch total [{timers.variant}]", run_batch)
    undo.append(lambda: setattr(extract.Extractor, "run_batch", old_run_batch))
    old_shapes = extract.Extractor.layer_shapes

    def layer_shapes(self, *a, **kw):
        timers.variant = "probe"
        return old_shapes(self, *a, **kw)

    extract.Extractor.layer_shapes = timers.wrap("footprint shape probes (batch-1 passes)", layer_shapes)
    undo.append(lambda: setattr(extract.Extractor, "layer_shapes", old_shapes))

    patch(extract, "crop_image", "images: crop")
    patch(extract.Extractor, "_pixels", "pixels -> tensor")
    patch(extract.Extractor, "latents", "latents total (pixels, VAE, noise)")
    patch(pipe.vae, "encode", "VAE encode")
    patch(pipe.unet, "forward", lambda: f"U-Net forward [{timers.variant}]")
    patch(store.StoreWriter, "write_batch", "writer thread: write_batch")
    patch(store.StoreWriter, "__init__", "store create/open")
    patch(store.StoreWriter, "finalize", "store finalize")
    patch(zarr.Array, "__setitem__", "writer thread: zarr setitem")
    if hasattr(extract, "_BackgroundWriter"):
        patch(extract._BackgroundWriter, "put", "main thread: waits for writer (put)")
        patch(extract._BackgroundWriter, "close", "main thread: waits for writer (close)")

    old_register = torch.nn.Module.register_forward_hook

    def register(self, hook, *a, **kw):
        return old_register(self, timers.wrap(lambda: f"hooks [{timers.variant}]", hook), *a, **kw)

    torch.nn.Module.register_forward_hook = register
    undo.append(lambda: setattr(torch.nn.Module, "register_forward_hook", old_register))
    return lambda: [u() for u in reversed(undo)]


# ---------------------------------------------------------------------------------------------------------------
# Child: one run
# ---------------------------------------------------------------------------------------------------------------

def child(args) -> dict:
    import torch

    from diffaudit import extract
    from diffaudit.extract import ExtractionSettings, run_extraction
    from diffaudit.families.common import quiet_libraries
    from diffaudit.families.sd import PAPER_LAYERS, build_mini_pipeline

    quiet_libraries()
    if args.no_heap_reuse and hasattr(extract, "_glibc"):
        extract.memory._glibc = lambda: None  # ablation: glibc's default heap behaviour
    if args.threads:
        torch.set_num_threads(args.threads)
    images = make_images(N_IMAGES, IMAGE_PX)
    pipe = build_mini_pipeline(arch=args.arch)
    pipe.set_progress_bar_config(disable=True)
    timers = Timers()
    images_fn = lambda a, b: images[a:b]  # noqa: E731
    undo = None
    prof = None
    if args.profile:
        import cProfile

        undo = instrument(pipe, timers)
        images_fn = timers.wrap("images: load", images_fn)
        prof = cProfile.Profile()
    out_root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(dir=args.tmp))
    out = out_root / "repr"
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, t0 = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    run_extraction(pipe, dataset_images=images_fn, image_ids=[str(i) for i in range(N_IMAGES)], labels=None,
                   layers=list(PAPER_LAYERS), settings=ExtractionSettings(), out_dir=out,
                   provenance={"model": "bench"}, image_size=IMAGE_PX, progress=False)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if undo:
        undo()
    nbytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    variants = sorted(p.name[:-5] for p in out.glob("*.zarr"))
    if not args.keep:
        import shutil

        shutil.rmtree(out_root)
    row = {"label": args.label, "heap_reuse": hasattr(extract, "cpu_heap_reuse") and not args.no_heap_reuse,
           "arch": args.arch, "n": N_IMAGES, "variants": variants,
           "torch_threads": torch.get_num_threads(), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
           "sys_s": round(ru1.ru_stime - ru0.ru_stime, 2), "page_faults": ru1.ru_minflt - ru0.ru_minflt,
           "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
           "img_per_s": round(N_IMAGES / wall, 3), "stored_mb": round(nbytes / 1e6, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "source": str(Path(extract.__file__).resolve())}
    if args.profile:
        import io
        import pstats

        row["breakdown"] = {k: [round(v, 2), timers.count[k]] for k, v in sorted(timers.total.items())}
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        row["cprofile_tottime"] = s.getvalue()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.top)
        row["cprofile_cumulative"] = s.getvalue()
    return row


def run_child(args, **over) -> dict:
    cmd = [sys.executable, __file__, "--child", "--arch", args.arch, "--label", args.label, "--top", str(args.top)]
    for flag in ("threads", "keep", "tmp"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.no_heap_reuse:
        cmd.append("--no-heap-reuse")
    if over.get("profile"):
        cmd.append("--profile")
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.src).resolve()), env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> bool:
    """Every array of every store under ``a`` equals (bitwise) the one under ``b``; attributes too (bar timings)."""
    import zarr

    a, b = Path(a), Path(b)
    stores = sorted(p.name for p in a.rglob("*.zarr"))
    assert stores == sorted(p.name for p in b.rglob("*.zarr")), "different variants"
    ok = True
    for name in stores:
        ga, gb = zarr.open_group(str(next(a.rglob(name))), mode="r"), zarr.open_group(str(next(b.rglob(name))), mode="r")
        if dict(ga.attrs) != dict(gb.attrs):
            print(f"{name}: attributes differ")
            ok = False
        for path, arr in ga.members(max_depth=None):
            if not isinstance(arr, zarr.Array):
                continue
            x, y = arr[...], gb[path][...]
            if x.dtype.kind in "biufc":
                same = x.dtype == y.dtype and x.shape == y.shape and bool((x.view(np.uint8) == y.view(np.uint8)).all())
            else:
                same = x.shape == y.shape and [str(e) for e in x.ravel()] == [str(e) for e in y.ravel()]
            if not same:
                print(f"{name}/{path}: DIFFERS")
                ok = False
    print(f"{len(stores)} stores: {'bitwise identical' if ok else 'DIFFERENT'}")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="timed runs (default 3)")
    p.add_argument("--profile", action="store_true", help="one instrumented run: breakdown + cProfile")
    p.add_argument("--src", default=None, help="source tree to benchmark (a src/ directory; default: installed)")
    p.add_argument("--label", default="current")
    p.add_argument("--arch", default="mini")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-heap-reuse", action="store_true", help="ablation: without extract.cpu_heap_reuse")
    p.add_argument("--keep", default=None, help="write the stores into this directory and keep them")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"), help="compare two kept store trees")
    p.add_argument("--tmp", default=None)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=str(HERE / "out" / "extraction_variants.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compare:
        sys.exit(0 if compare(*args.compare) else 1)
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    if args.profile:
        r = run_child(args, profile=True)
        rows.append(r)
        print(r["cprofile_tottime"])
        print(r["cprofile_cumulative"])
        print(f"{'category':55} {'wall s':>8} {'calls':>6}")
        for k, (v, c) in r["breakdown"].items():
            print(f"{k:55} {v:8.2f} {c:6d}")
        print(f"total wall {r['wall_s']} s, CPU {r['cpu_s']} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    else:
        for _ in range(args.repeat):
            rows.append(run_child(args))
            print(json.dumps(rows[-1]), flush=True)
        walls = [r["wall_s"] for r in rows]
        print(f"\n{args.label}: wall min {min(walls):.1f} s / median {float(np.median(walls)):.1f} s, "
              f"CPU median {float(np.median([r['cpu_s'] for r in rows])):.1f} s, "
              f"{N_IMAGES / min(walls):.3f} img/s, peak RSS {max(r['peak_rss_mb'] for r in rows):.0f} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
