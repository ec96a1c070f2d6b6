"""Command line: ``diffaudit <command>``."""
from __future__ import annotations

import argparse
import sys

from .errors import UserError, run_task
from .fingerprint import add_arguments as fingerprint_arguments
from .layout import MODELS_LOCK


def _cmd_layers(args):
    from .config import load_config
    from .families.registry import family_of
    from .layers import hookable_layers
    from .models import load_pipeline, resolve_model

    cfg = load_config(*args.configfile)
    pipe = load_pipeline(resolve_model(args.model, cfg["model_sources"]), device="cpu")
    family = family_of(pipe)
    net = family.backbone(pipe)
    names = hookable_layers(net) if args.all else family.paper_layers(net)
    if not args.all:
        print(f"# {args.model} ({family.name}): `layers: paper` = these {len(names)} layers "
              "(--all: every hookable submodule)", file=sys.stderr)
    for name in names:
        print(name)


def _cmd_build_mini(args):
    from .models import save_embedded_model

    print(save_embedded_model(args.name, args.out, seed=args.seed))


def _cmd_dataset(args):
    from .config import load_config
    from .datasets import build_dataset

    print(build_dataset(load_config(*args.configfile)["dataset"], args.out))


def _cmd_extract(args):
    from .config import load_config
    from .model_extraction import extract_model

    print(extract_model(load_config(*args.configfile), args.model, args.dataset, args.out))


def _cmd_lock(args):
    from .config import load_config
    from .lock import lock_models

    cfg = load_config(*args.configfile)
    print(lock_models(cfg, args.models or None, args.out))


def _cmd_prefetch(args):
    """Everything the configured run downloads, fetched now (on a machine with internet)."""
    from .config import load_config
    from .layout import PAPER_CACHE
    from .models import download_model, embedded_model, resolve_model
    from .paper_files import fetch_all
    from .paper_run import verdict

    cfg = load_config(*args.configfile)
    for model in cfg["models"]:
        spec = resolve_model(model, cfg["model_sources"])
        if embedded_model(spec.source):
            print(f"{model}: an embedded model, built by the workflow (rule build_mini); nothing to download")
            continue
        where = download_model(spec)
        print(f"{model}: {'local directory ' + spec.source if where is None else where}")
        if verdict(cfg, model)["applies"]:
            for path in fetch_all(model, PAPER_CACHE):
                print(f"{model}: {path} (published numbers, sha256 verified)")
    if cfg["dataset"]["source"] == "imagenet_subset":
        print("the images: run `snakemake --cores 1 --until dataset` here as well (it streams them from the hub)")


def _cmd_footprint(args):
    from .footprint import footprint_table

    print(footprint_table(args.models, n_images=args.images, image_size=args.size, batch_size=args.batch_size,
                          crops=not args.no_crops))


def _cmd_dvc_yaml(args):
    from .dvcgen import render

    sys.stdout.write(render())


def _cmd_dvc_extract(args):
    """Snakemake's extract jobs of one model (or one of its experiments): the whole folder, or every shard of it
    (``extraction.shards``)."""
    import os
    import shutil

    from .config import load_config
    from .layout import BASELINE, representation_parts, run_dir, run_suffix

    cfg = load_config(*args.configfile)
    if args.experiment and args.experiment not in (cfg.get("experiments") or {}):
        raise UserError(f"experiment {args.experiment!r} is not in the configuration's experiments")
    model_dir = run_dir(cfg["results_dir"], args.model, run_suffix(args.experiment or BASELINE))
    targets = [f"{model_dir}/{p}" for p in representation_parts(cfg["extraction"]["shards"])]
    cmd = ["snakemake", "--cores", "all", "--nolock", "--allowed-rules", "build_mini", "extract",
           *(["--configfile", *args.configfile] if args.configfile != ["params.yaml"] else []), "--", *targets]
    exe = shutil.which("snakemake") or "snakemake"
    sys.stdout.flush()
    os.execv(exe, cmd)


def _cmd_explore(args):
    """The browser explorer and labeller over the results of a configuration (docs/explorer.md)."""
    from .config import load_config
    from .explorer.server import main as serve

    from pathlib import Path

    files = list(args.configfile)
    if "params.yaml" not in files and Path("params.yaml").is_file():  # as Snakemake: the defaults, then overrides
        files.insert(0, "params.yaml")
    cfg = load_config(*files)
    a = cfg.get("anomalies", {})
    from .harm.mitigations import MitigationSettings

    # the mitigations as rule harm fits them: on the probe's training images, with the configuration's knobs
    mit = MitigationSettings(subspace_k=int(cfg.get("harm", {}).get("subspace_k", 4)),
                             threshold=float(a.get("threshold", 2.0)),
                             channel_ratio=float(cfg.get("channels", {}).get("ratio_threshold", 10.0)))
    serve(args.results or cfg["results_dir"], host=args.host, port=args.port, labels=args.labels,
          ref_layer=a.get("ref_layer"), threshold=a.get("threshold"), verbose=args.verbose,
          probe=cfg.get("probe"), mitigation_settings=mit)


def _cmd_fingerprint(args):
    """Fingerprint (or compare) results trees: :mod:`diffaudit.fingerprint`."""
    from . import fingerprint

    code = fingerprint.run(args)
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="diffaudit", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    cfg_kw = dict(nargs="+", default=["params.yaml"], help="config files, merged in order (default params.yaml)")

    s = sub.add_parser("layers", help="list the layers `layers: paper` means for a model (--all: every hookable "
                                      "layer name)")
    s.add_argument("model")
    s.add_argument("--all", action="store_true", help="every hookable submodule, not only the paper's choice")
    s.add_argument("--configfile", **cfg_kw)
    s.set_defaults(fn=_cmd_layers)

    s = sub.add_parser("build-mini", help="write an embedded model (diffusers directory)")
    s.add_argument("out")
    s.add_argument("--name", default="mini", help="mini (SD-1.5 layout, default), mini-sdxl, mini-sd3 or mini-flux")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_build_mini)

    s = sub.add_parser("dataset", help="build the configured dataset into a directory")
    s.add_argument("out")
    s.add_argument("--configfile", **cfg_kw)
    s.set_defaults(fn=_cmd_dataset)

    s = sub.add_parser("extract", help="extract representations of one model (resumable)")
    s.add_argument("model")
    s.add_argument("dataset")
    s.add_argument("out")
    s.add_argument("--configfile", **cfg_kw)
    s.set_defaults(fn=_cmd_extract)

    s = sub.add_parser("prefetch", help="download the configured models (HF cache) and the authors' published "
                                        "files (resources/paper) now, for runs on machines without internet")
    s.add_argument("--configfile", **cfg_kw)
    s.set_defaults(fn=_cmd_prefetch)
    s = sub.add_parser("lock", help="write models.lock: per configured model the hub id used, the resolved commit and "
                                    "the sha256 and size of every file it loads (run where the hub is reachable; "
                                    "commit the file)")
    s.add_argument("--configfile", **cfg_kw)
    s.add_argument("--models", nargs="+", help="only these models (the other entries of the lock stay)")
    s.add_argument("-o", "--out", default=MODELS_LOCK, help=f"the lock file (default: {MODELS_LOCK})")
    s.set_defaults(fn=_cmd_lock)

    s = sub.add_parser("footprint", help="disk, memory and GPU time of an extraction per model, before running it "
                                         "(docs/footprint.md)")
    s.add_argument("--models", nargs="+", default=["sd15", "sd21", "sdturbo"],
                   choices=["sd14", "sd15", "sd21", "sdturbo", "mini"])
    s.add_argument("--images", type=int, default=500)
    s.add_argument("--size", type=int, default=512)
    s.add_argument("--batch-size", type=int, default=20)
    s.add_argument("--no-crops", action="store_true")
    s.set_defaults(fn=_cmd_footprint)

    s = sub.add_parser("dvc-yaml", help="print dvc.yaml (templated stages, one per Snakemake rule)")
    s.set_defaults(fn=_cmd_dvc_yaml)

    s = sub.add_parser("dvc-extract", help="the extraction stage of dvc.yaml: run Snakemake's extract jobs (every "
                                           "shard) of one model")
    s.add_argument("model")
    s.add_argument("--experiment", help="the extraction of this experiment (a key of `experiments`)")
    s.add_argument("--configfile", **cfg_kw)
    s.set_defaults(fn=_cmd_dvc_extract)

    s = sub.add_parser("fingerprint", help="content hashes of results/model folders, or their comparison with an "
                                            "earlier fingerprint (are two runs' outputs bitwise the same?)")
    fingerprint_arguments(s)
    s.set_defaults(fn=_cmd_fingerprint)

    s = sub.add_parser("explore", help="serve the browser explorer and anomaly labeller over the configuration's "
                                        "results (docs/explorer.md)")
    s.add_argument("--configfile", **cfg_kw)
    s.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    s.add_argument("--results", help="results directory (default: the configuration's results_dir)")
    s.add_argument("--labels", help="label file per model, a template with {results_dir} and {model} "
                                    "(default {results_dir}/labels/{model}.npy)")
    s.add_argument("--verbose", action="store_true", help="log every request")
    s.set_defaults(fn=_cmd_explore)

    args = p.parse_args(argv)
    run_task(args.fn, args)


if __name__ == "__main__":
    main()
