"""Extraction benchmark: diffaudit (streaming into Zarr) vs sdhelper 1.0.0's ``img2repr`` (all in memory).

Each measurement runs in a fresh subprocess; the table reports wall time, images/s (model load excluded)
and the child's peak RSS (``ru_maxrss``).

    python benchmarks/bench_extraction.py                      # CPU, mini model, 20 and 60 images
    python benchmarks/bench_extraction.py --images 20 40 80
    python benchmarks/bench_extraction.py --gpu                # + fp16 SD-1.5 architecture, batch 16 (CUDA)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_images(n: int, size: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((size, size), Image.BILINEAR))
    return out


def child(args) -> dict:
    import torch

    from diffaudit.extract import ExtractionSettings, run_extraction
    from diffaudit.families.sd import PAPER_LAYERS, build_mini_pipeline
    from diffaudit.models import ModelSpec, compute_dtype, load_pipeline

    torch.set_num_threads(args.threads) if args.threads else None
    images = make_images(args.n, 512)
    layers = list(PAPER_LAYERS)
    device = "cuda" if args.gpu else "cpu"
    t_load = time.perf_counter()
    if args.tool == "sdhelper":
        from sdhelper import SD

        sd = SD(args.model_dir, device=device, disable_progress_bar=True)
        t0 = time.perf_counter()
        reps = sd.img2repr(images, layers, 50, seed=42, batch_size=args.batch_size)
        assert len(reps) == args.n
    else:
        if args.model_dir:
            pipe = load_pipeline(ModelSpec("bench", args.model_dir), device=device)
        else:  # full SD-1.5 architecture with seeded weights, built in memory
            pipe = build_mini_pipeline(arch=args.arch).to(device, compute_dtype(device))
            pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            run_extraction(pipe, dataset_images=lambda a, b: images[a:b], image_ids=[str(i) for i in range(args.n)],
                           labels=None, layers=layers,
                           settings=ExtractionSettings(batch_size=args.batch_size, crops=False),
                           out_dir=Path(tmp) / "repr", provenance={"model": "bench"}, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"tool": args.tool, "n": args.n, "device": device, "arch": args.arch, "batch_size": args.batch_size,
            "load_s": round(t0 - t_load, 2), "wall_s": round(wall, 2), "img_per_s": round(args.n / wall, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_child(**kw) -> dict:
    cmd = [sys.executable, __file__, "--child"]
    for k, v in kw.items():
        if v is None or v is False:
            continue
        cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[20, 60])
    p.add_argument("--gpu", action="store_true", help="also benchmark fp16 SD-1.5 architecture on CUDA")
    p.add_argument("--gpu-images", type=int, default=64)
    p.add_argument("--out", default=str(HERE / "out" / "extraction.json"))
    # child-process arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tool", default="diffaudit", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--arch", default="mini", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.gpu = args.gpu
        print(json.dumps(child(args)))
        return

    from diffaudit.families.sd import save_mini_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_mini_model(Path(tmp) / "mini"))
        for n in args.images:
            for tool in ("diffaudit", "sdhelper"):
                rows.append(run_child(tool=tool, n=n, model_dir=model_dir, tmp=tmp))
                print(json.dumps(rows[-1]), flush=True)
        if args.gpu:
            rows.append(run_child(tool="diffaudit", n=args.gpu_images, arch="sd15", batch_size=16, gpu=True, tmp=tmp))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{'tool':10} {'device':6} {'arch':5} {'images':>6} {'batch':>5} {'wall s':>8} {'img/s':>7} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['tool']:10} {r['device']:6} {r['arch']:5} {r['n']:6d} {r['batch_size']:5d} {r['wall_s']:8.1f} "
              f"{r['img_per_s']:7.2f} {r['peak_rss_mb']:11.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
