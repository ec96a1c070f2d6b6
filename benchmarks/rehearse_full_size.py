"""Full-size rehearsal: the paper configuration on seeded full-size SD-1.5 and SDXL pipelines, loaded like hub models.

No download: each pipeline is built from its published architecture (:data:`diffaudit.families.sd.ARCHITECTURES`,
:data:`diffaudit.families.sdxl.SDXL_ARCHITECTURES`) with seeded weights, saved with ``save_pretrained`` (float16
safetensors), put into a Hugging Face cache in the hub's layout under its real hub id (:mod:`diffaudit.hubcache`),
locked (:mod:`diffaudit.lock`), and then extracted through the registry with ``HF_HUB_OFFLINE=1``, exactly as the
workflow extracts a hub model (:func:`diffaudit.model_extraction.extract_model`: snapshot resolution, lock check,
the paper configuration's layers, crops and batch). The three analyses then run on the stores. Per model it
prints every layer's stored shape against the published layer table, the footprint estimate
(:func:`diffaudit.footprint.model_footprint`, SD architectures) against the bytes written, the peak memory, and
the time per image. Each model is built in one subprocess and extracted in another, so that the peak resident
memory (``ru_maxrss``) reported is the extraction's alone.

    python benchmarks/rehearse_full_size.py                     # CPU: sd15 and sdxl, 4 images (slow: minutes)
    python benchmarks/rehearse_full_size.py --models sd15 --images 2
    python benchmarks/rehearse_full_size.py --gpu               # CUDA: float16 (bfloat16 where the family needs it)

Random weights: the numbers of the analyses mean nothing here; the rehearsal checks that the full-size path runs,
that the shapes and the footprint are right, and how fast it is. Exit status 1 when a shape or the footprint
(beyond 2 %) disagrees.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: model -> (hub id it is filed under, builder arch, the workflow's configuration file)
MODELS = {"sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", None),
          "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", None)}
FOOTPRINT_TOLERANCE = 0.02


def build(model: str, out: Path, cache: Path) -> dict:
    """Child 1: build the seeded full-size pipeline, save it, file it into the hub cache under its hub id."""
    from diffaudit.families.common import save_pipeline
    from diffaudit.hubcache import write_snapshot

    repo_id, arch, _ = MODELS[model]
    t0 = time.perf_counter()
    if model == "sdxl":
        from diffaudit.families.sdxl import build_mini_sdxl_pipeline

        pipe = build_mini_sdxl_pipeline(arch=arch)
    else:
        from diffaudit.families.sd import build_mini_pipeline

        pipe = build_mini_pipeline(arch=arch)
    built = time.perf_counter() - t0
    save_pipeline(pipe, out, {"rehearsal": model, "seed": 0, "arch": arch})
    commit = write_snapshot(out, cache, repo_id, link=True)
    return {"build_s": built, "save_s": time.perf_counter() - t0 - built, "commit": commit}


def _config(model: str, n_images: int, device: str) -> dict:
    from diffaudit.config import load_config

    cfg = load_config(REPO / "params.yaml")
    repo_id = MODELS[model][0]
    cfg["models"] = [model]
    cfg["model_sources"][model] = {"id": repo_id, "revision": "main"}
    cfg["dataset"].update(source="demo", n_images=n_images)
    cfg["extraction"].update(device=device, batch_size=n_images)
    return cfg


def _expected_shapes(model: str, layers: list[str], image_size: int) -> dict[str, tuple[int, int, int]]:
    """The published layer table (SD-1.5: :func:`diffaudit.families.sd.layer_shape`); SDXL: the architecture's own
    shapes on PyTorch's meta device (no published table in the package)."""
    if model == "sd15":
        from diffaudit.families.sd import layer_shape

        return {name: (c, s, s) for name in layers if (cs := layer_shape(name, image_size)) for c, s in [cs]}
    import torch
    from diffusers import UNet2DConditionModel

    from diffaudit.families.sdxl import SDXL_ARCHITECTURES
    from diffaudit.layers import resolve_layers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_ARCHITECTURES[MODELS[model][1]][0])
    modules = resolve_layers(unet, layers)
    out = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: out.__setitem__(n, tuple((o[0] if isinstance(o, tuple)
                                                                                     else o).shape[1:])))
             for n, m in modules.items()]
    lat = image_size // 8
    cond = {"text_embeds": torch.zeros(1, 1280, device="meta"), "time_ids": torch.zeros(1, 6, device="meta")}
    with torch.no_grad():
        unet(torch.zeros(1, 4, lat, lat, device="meta"), torch.tensor(50), torch.zeros(1, 77, 2048, device="meta"),
             added_cond_kwargs=cond)
    for h in hooks:
        h.remove()
    return out


def extract(model: str, n_images: int, device: str, work: Path) -> dict:
    """Child 2: lock, load and extract through the registry (offline), run the three analyses, report."""
    import torch

    from diffaudit.analyses.anomalies import detect_anomalies, relative_norms, strongest_outlier_layer
    from diffaudit.analyses.probe import run_probe
    from diffaudit.analyses.similarity import token_group_similarity
    from diffaudit.datasets import build_dataset
    from diffaudit.lock import lock_models
    from diffaudit.model_extraction import extract_model
    from diffaudit.models import compute_dtype, load_pipeline, resolve_model
    from diffaudit.store import open_model_stores

    cfg = _config(model, n_images, device)
    data = build_dataset(cfg["dataset"], work / "dataset")
    lock = lock_models(cfg, path=work / "models.lock")
    t0 = time.perf_counter()  # the load alone (then from the page cache), to separate it from the images' time
    pipe = load_pipeline(resolve_model(model, cfg["model_sources"]), device=device,
                         dtype=compute_dtype(device, cfg["extraction"]["precision"]))
    load_s = time.perf_counter() - t0
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = extract_model(cfg, model, data, work / model / "representations", progress=False, lock_file=lock)
    extract_s = time.perf_counter() - t0
    peak_gpu = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    full, crops = open_model_stores(out)
    size = int(cfg["dataset"]["size"])
    expected = _expected_shapes(model, full.layers, size)
    written = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    t1 = time.perf_counter()
    probe = run_probe(full, mode="paper", epochs=1, granularities=(8,), device=device)
    sim = token_group_similarity(full, crops, image_size=size)
    ref = "up_blocks[1].upsamplers[0]" if "up_blocks[1].upsamplers[0]" in full.layers else strongest_outlier_layer(full)
    labels = detect_anomalies(full, layer=ref)
    norms = relative_norms(full, labels, ref_layer=ref, label_source="auto")
    analyses_s = time.perf_counter() - t1
    return {"model": model, "device": device, "n_images": n_images, "image_size": size,
            "crops": sorted(int(k) for k in crops), "load_s": load_s, "extract_s": extract_s,
            "analyses_s": analyses_s, "bytes_written": written,
            "layers": {name: {"shape": list(full.shape(name)[1:]), "expected": list(expected.get(name, ()))}
                       for name in full.layers},
            "model_source": full.attrs.get("model_source"), "model_revision": full.attrs.get("model_revision"),
            "n_files_locked": len(full.attrs.get("model_files") or {}),
            "probe_rows": len(probe), "similarity_rows": len(sim), "anomaly_labels": int(len(labels)),
            "rel_norm_rows": len(norms), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_gpu": peak_gpu}


def footprint(model: str, n_images: int, image_size: int) -> dict | None:
    """The footprint estimate of the paper configuration (SD architectures only)."""
    from diffaudit.footprint import model_footprint

    if model != "sd15":
        return None
    return model_footprint(model, n_images=n_images, image_size=image_size, batch_size=n_images, crops=True)


def _child(args) -> None:
    work = Path(args.work)
    if args.child == "build":
        out = build(args.model, work / "pipelines" / args.model, work / "hub")
    else:
        out = extract(args.model, args.images, args.device, work)
    Path(args.result).write_text(json.dumps(out, default=str))


def _run_child(stage: str, model: str, args, work: Path, env: dict) -> dict:
    result = work / f"{stage}-{model}.json"
    cmd = [sys.executable, __file__, "--child", stage, "--model", model, "--images", str(args.images),
           "--device", "cuda" if args.gpu else "cpu", "--work", str(work), "--result", str(result)]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(result.read_text())


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def report(model: str, built: dict, r: dict, fp: dict | None) -> bool:
    ok = True
    print(f"\n== {model}: {r['model_source']} @ {r['model_revision']} ({r['n_files_locked']} files checked against "
          f"the lock), {r['device']}, {r['n_images']} images at {r['image_size']} px, crops {r['crops']}")
    print(f"built in {built['build_s']:.0f} s, saved in {built['save_s']:.0f} s")
    print(f"{'layer':<34} {'stored (c, h, w)':>18} {'expected':>18}")
    for name, d in r["layers"].items():
        same = tuple(d["shape"]) == tuple(d["expected"])
        ok &= same
        print(f"{name:<34} {str(tuple(d['shape'])):>18} {str(tuple(d['expected'])):>18}{'' if same else '  MISMATCH'}")
    print(f"{len(r['layers'])} layers, {'all' if ok else 'NOT all'} as expected")
    if fp is not None:
        est = fp["disk_total_bytes"]
        rel = r["bytes_written"] / est - 1
        ok &= abs(rel) <= FOOTPRINT_TOLERANCE
        print(f"store bytes: estimate {est:,} vs written {r['bytes_written']:,} ({rel:+.2%}, tolerance "
              f"{FOOTPRINT_TOLERANCE:.0%}); host peak estimate (a GPU run: float16 weights) "
              f"{_gb(fp['host_peak_bytes'])} vs measured "
              f"{_gb(r['peak_rss'])}; GPU estimate {_gb(fp['gpu_total_bytes'])} vs peak allocated {_gb(r['peak_gpu'])}")
    else:
        print(f"store bytes written {r['bytes_written']:,} (no footprint estimate for this architecture); "
              f"host peak {_gb(r['peak_rss'])}, GPU peak allocated {_gb(r['peak_gpu'])}")
    per_image = max(r["extract_s"] - r["load_s"], 0.0) / r["n_images"]
    print(f"load {r['load_s']:.1f} s; extraction {r['extract_s']:.1f} s in all, about {per_image:.2f} s per image "
          f"({1 / per_image if per_image else float('inf'):.3g} images/s, load excluded); analyses "
          f"{r['analyses_s']:.1f} s (probe {r['probe_rows']} rows, similarity {r['similarity_rows']}, "
          f"{r['anomaly_labels']} anomalies)")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--gpu", action="store_true", help="extract on CUDA (float16; bfloat16 where the family needs it)")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--child", choices=["build", "extract"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="rehearsal-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(work / "hub"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    ok = True
    try:
        for model in args.models:
            built = _run_child("build", model, args, work, env)
            r = _run_child("extract", model, args, work, env)
            ok &= report(model, built, r, footprint(model, args.images, r["image_size"]))
            import shutil

            shutil.rmtree(work / "pipelines" / model, ignore_errors=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("\nrehearsal:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
