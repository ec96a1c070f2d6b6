"""Command line: ``diffaudit <command>``, and the error handling shared with the workflow scripts."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError

# Errors caused by the user's input: reported as one line, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from .analyses.anomalies import LabelFetchError
    from .datasets import DatasetError
    from .layers import UnknownLayerError
    from .models import ModelLoadError
    from .store import IncompleteStoreError, StoreMismatchError

    return (ConfigError, DatasetError, UnknownLayerError, ModelLoadError, StoreMismatchError,
            IncompleteStoreError, LabelFetchError, FileNotFoundError, ValueError)


def run_task(fn, *args, **kwargs):
    """Run a workflow task; a user error exits with one line naming the file or key."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn(*args, **kwargs)
    except _user_errors() as exc:
        msg = str(exc).strip().replace("\n", " ")
        print(f"diffaudit error: {msg}", file=sys.stderr)
        sys.exit(1)


def _cmd_layers(args):
    from .config import load_config
    from .layers import hookable_layers
    from .models import load_pipeline, resolve_model

    cfg = load_config(*args.configfile)
    pipe = load_pipeline(resolve_model(args.model, cfg["model_sources"]), device="cpu")
    for name in hookable_layers(pipe.unet):
        print(name)


def _cmd_build_mini(args):
    from .models import save_mini_model

    print(save_mini_model(args.out, seed=args.seed))


def _cmd_dataset(args):
    from .config import load_config
    from .pipeline import build_dataset

    print(build_dataset(load_config(*args.configfile), args.out))


def _cmd_extract(args):
    from .config import load_config
    from .pipeline import extract

    print(extract(load_config(*args.configfile), args.model, args.dataset, args.out))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="diffaudit", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    cfg_kw = dict(nargs="+", default=["params.yaml"], help="config files, merged in order (default params.yaml)")

    s = sub.add_parser("layers", help="list every hookable layer name of a model")
    s.add_argument("model")
    s.add_argument("--configfile", **cfg_kw)
    s.set_defaults(fn=_cmd_layers)

    s = sub.add_parser("build-mini", help="write the embedded mini model (diffusers directory)")
    s.add_argument("out")
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

    args = p.parse_args(argv)
    run_task(args.fn, args)


if __name__ == "__main__":
    main()
