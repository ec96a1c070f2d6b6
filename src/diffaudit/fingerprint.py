"""Content fingerprints of a results tree: are two runs' outputs the same, bit for bit?

``diffaudit fingerprint DIR...`` hashes what a run computed and nothing of how or when it ran:

- every array of every Zarr store (``*.zarr``): its decoded values (dtype, shape and bytes), so two stores that
  hold the same numbers compare equal whatever their chunk files' compression or modification times;
- every store's and group's attributes, with the provenance that names the machine or the library versions
  (``library_versions``, ``device``, ``created``...) left out and listed separately;
- every table (``*.csv``) and JSON record byte for byte (logs, figures and benchmark files are left out: their
  bytes carry timings and renderer versions);
- every file of a model directory (``*.safetensors`` weights, configs, tokenizer files) byte for byte.

The output is one JSON object, ``{relative path: sha256}``; ``--compare OLD.json`` lists what differs. The
restructure of the library was checked this way: every demo configuration run before and after, both trees
fingerprinted, no difference.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from . import layout

#: Attributes that record where and with what a run happened, not what it computed.
VOLATILE_ATTRS = frozenset({"library_versions", "versions", "created", "device", "hostname", "elapsed_s",
                            "timing", "footprint"})
#: Folders whose files are not outputs of the computation (logs, pictures, Snakemake/DVC bookkeeping).
SKIPPED_DIRS = layout.NON_RESULT_DIRS | {".snakemake", "benchmarks", "__pycache__", ".dvc"}


def _hash_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _attrs_hash(attrs: dict) -> str:
    kept = {k: v for k, v in attrs.items() if k not in VOLATILE_ATTRS}
    return _hash_bytes(json.dumps(kept, sort_keys=True, default=str).encode())


def store_fingerprint(path: Path) -> Iterator[tuple[str, str]]:
    """(key, hash) for each array and attribute set of one Zarr store, keys relative to the store."""
    import numpy as np
    import zarr

    root = zarr.open_group(str(path), mode="r")
    yield "@attrs", _attrs_hash(dict(root.attrs))
    for name, node in sorted(root.members(max_depth=None), key=lambda kv: kv[0]):
        if isinstance(node, zarr.Array):
            data = np.ascontiguousarray(node[...])
            yield name, _hash_bytes(str(data.dtype).encode(), repr(data.shape).encode(), data.tobytes())
        else:
            yield f"{name}/@attrs", _attrs_hash(dict(node.attrs))


def fingerprint_tree(root: str | Path) -> dict[str, str]:
    """{path relative to ``root``: sha256} of every store array, store attribute set, table and model file."""
    root = Path(root)
    out: dict[str, str] = {}

    def walk(d: Path) -> None:
        for p in sorted(d.iterdir()):
            rel = p.relative_to(root).as_posix()
            if p.is_dir():
                if p.name in SKIPPED_DIRS:
                    continue
                if p.suffix == layout.STORE_SUFFIX:
                    for key, h in store_fingerprint(p):
                        out[f"{rel}::{key}"] = h
                else:
                    walk(p)
            elif p.suffix in (".csv", ".json", ".safetensors", ".txt", ".model", ".npy") and p.name != "pid":
                out[rel] = _hash_bytes(p.read_bytes())

    walk(root)
    return out


def compare(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per key that is missing, added or different."""
    lines = [f"only in old: {k}" for k in sorted(old.keys() - new.keys())]
    lines += [f"only in new: {k}" for k in sorted(new.keys() - old.keys())]
    lines += [f"differs: {k}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]
    return lines


def add_arguments(ap) -> None:
    """The command's arguments (shared by ``python -m diffaudit.fingerprint`` and ``diffaudit fingerprint``)."""
    ap.add_argument("dirs", nargs="+", help="results or model directories (keys are prefixed by their name)")
    ap.add_argument("-o", "--output", help="write the fingerprint JSON here (default: stdout)")
    ap.add_argument("--compare", help="a fingerprint JSON to compare with; exit 1 when anything differs")


def run(args) -> int:
    """Fingerprint ``args.dirs``; write or print it, or compare it with ``args.compare`` (1 when anything differs)."""
    fp: dict[str, str] = {}
    for d in args.dirs:
        for k, v in fingerprint_tree(d).items():
            fp[f"{Path(d).name}/{k}"] = v
    text = json.dumps(fp, indent=1, sort_keys=True)
    if args.output:
        Path(args.output).write_text(text + "\n")
    elif not args.compare:
        print(text)
    if args.compare:
        diff = compare(json.loads(Path(args.compare).read_text()), fp)
        print("\n".join(diff) if diff else f"identical: {len(fp)} entries")
        return 1 if diff else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="diffaudit fingerprint", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
