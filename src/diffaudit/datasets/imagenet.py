"""The ``imagenet_subset`` source: the paper's ImageNet subset (classes 235, 242, 282, 717, 980, 100 images each
with ``min(w, h) >= 350``), streamed from the Hugging Face hub or read from a local ILSVRC-2012 train directory."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path

from PIL import Image

from .format import IMAGE_EXTENSIONS, DatasetError, _check_int, _DatasetWriter, _one_line, _versions
from .images import _image_size, _open_loaded, _preprocess

PAPER_CLASSES = (235, 242, 282, 717, 980)  # German shepherd, boxer, tiger cat, pickup, volcano
IMAGENET_WNIDS = {235: "n02106662", 242: "n02108089", 282: "n02123159", 717: "n03930630", 980: "n09472597"}
IMAGENET_NAMES = {235: "German shepherd", 242: "boxer", 282: "tiger cat", 717: "pickup", 980: "volcano"}
#: The paper's minimum shorter side in pixels (default of ``dataset.min_side``).
PAPER_MIN_SIDE = 350
_HF_HELP = ("log in with `hf auth login` (or pass hf_token), accept the imagenet-1k terms at "
            "https://huggingface.co/datasets/ILSVRC/imagenet-1k, or use "
            "`imagenet: {source: local}` with `dataset.path: /path/to/ILSVRC2012/train` instead")


def _check_classes(classes, key: str = "classes") -> tuple[int, ...]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise DatasetError(f"{key} must be a list of ImageNet class indices, got {classes!r}")
    out = tuple(_check_int(c, key, 0) for c in classes)
    if not out:
        raise DatasetError(f"{key} must not be empty")
    if any(c > 999 for c in out):
        raise DatasetError(f"{key} must be ImageNet class indices in 0..999, got {list(out)}")
    if len(set(out)) != len(out):
        raise DatasetError(f"{key} contains duplicates: {list(out)}")
    return out


def _class_name(c: int) -> str:
    return IMAGENET_NAMES.get(c, str(c))


def _shortfall(classes: Sequence[int], counts: Sequence[int], per_class: int, min_side: int,
               where: str) -> DatasetError:
    short = [f"class {c} ({_class_name(c)}) has only {n}"
             for c, n in zip(classes, counts) if n < per_class]
    return DatasetError(f"imagenet_subset: {'; '.join(short)} images with min(w,h) >= {min_side} "
                        f"(dataset.min_side) in {where}, per_class={per_class} requested")


def _hf_stream(hf_token) -> Iterator[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise DatasetError("imagenet_subset source=hf needs the `datasets` package (pip install datasets); "
                           "or use `imagenet: {source: local}` with `dataset.path: /path/to/ILSVRC2012/train`") from exc
    try:
        ds = datasets.load_dataset("imagenet-1k", split="train", streaming=True, token=hf_token)
        # Decode only the records of the selected classes (see _decode_record).
        ds = ds.cast_column("image", datasets.Image(decode=False))
        it = iter(ds)
    except Exception as exc:
        raise DatasetError(f"could not stream imagenet-1k from the Hugging Face hub ({_one_line(exc)}); "
                           f"{_HF_HELP}") from exc
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise DatasetError(f"could not stream imagenet-1k from the Hugging Face hub "
                               f"({_one_line(exc)}); {_HF_HELP}") from exc
        yield rec


def _decode_record(value, what: str) -> Image.Image:
    """A record's image: a PIL image as is, or an undecoded hub value decoded exactly as `datasets` does."""
    if isinstance(value, Image.Image):
        return value
    try:
        import datasets

        return datasets.Image().decode_example(value)
    except Exception as exc:
        raise DatasetError(f"cannot decode {what} ({_one_line(exc)})") from exc


def _select_stream(records: Iterable[Mapping], classes: Sequence[int], per_class: int, min_side: int,
                   prefix: str) -> Iterator[tuple[str, int, Image.Image]]:
    """First ``per_class`` images per class with ``min(w,h) >= min_side``, in stream order."""
    label_of = {c: i for i, c in enumerate(classes)}
    counts = [0] * len(classes)
    open_classes = len(classes)
    for pos, rec in enumerate(records):
        what = f"{prefix}[{pos}]"
        try:
            cls = int(rec["label"])
            value = rec["image"]
        except Exception as exc:
            raise DatasetError(f"{what}: record needs `image` and integer `label` ({_one_line(exc)})") from exc
        i = label_of.get(cls)
        if i is None or counts[i] >= per_class:
            continue
        img = _decode_record(value, what)
        if min(img.size) < min_side:
            continue
        counts[i] += 1
        yield f"{what}:class={cls}", i, img
        if counts[i] == per_class:
            open_classes -= 1
            if open_classes == 0:
                return
    raise _shortfall(classes, counts, per_class, min_side, prefix)


def _select_local(root: Path, classes: Sequence[int], per_class: int, min_side: int
                  ) -> Iterator[tuple[str, int, Image.Image]]:
    """Per class (in ``classes`` order), the first qualifying files sorted by file name."""
    folders = []
    for c in classes:
        wnid = IMAGENET_WNIDS.get(c)
        if wnid is None:
            raise DatasetError(f"imagenet.classes: no WordNet id known for class {c} (source=local supports "
                               f"{sorted(IMAGENET_WNIDS)})")
        folder = root / wnid
        if not folder.is_dir():
            raise DatasetError(f"ILSVRC class folder {folder} (class {c}, {_class_name(c)}) not found")
        folders.append(folder)
    counts = [0] * len(classes)
    for i, (c, folder) in enumerate(zip(classes, folders)):
        files = sorted((f for f in folder.iterdir()
                        if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file()),
                       key=lambda f: f.name)
        for f in files:
            w, h = _image_size(f)
            if min(w, h) < min_side:
                continue
            img = _open_loaded(f)
            counts[i] += 1
            yield f.relative_to(root).as_posix(), i, img
            if counts[i] == per_class:
                break
    if any(n < per_class for n in counts):
        raise _shortfall(classes, counts, per_class, min_side, str(root))


def build_imagenet_subset(out_dir, source: str = "hf", path=None, classes=PAPER_CLASSES, per_class: int = 100,
                          min_side: int = PAPER_MIN_SIDE, size: int = 512, hf_token=None, records=None) -> Path:
    """Build the paper's ImageNet subset: ``per_class`` images of each of ``classes``.

    Stored labels are the positions in ``classes`` (0..4 for :data:`PAPER_CLASSES`). For each class the
    first ``per_class`` images *in source order* with ``min(w, h) >= min_side`` are taken; images are
    written in the order they are encountered, and the scan stops once every class is full.

    * ``source="hf"``: ``datasets.load_dataset("imagenet-1k", split="train", streaming=True)`` iterated in
      order, as the authors did. Only records of the selected classes are decoded (by ``datasets`` itself,
      which in current versions applies EXIF orientation). ``records`` replaces the hub stream by any
      iterable of ``{"image": PIL image, "label": int}`` dicts (used by the tests). ``source`` is
      ``hf:imagenet-1k/train[<stream position>]:class=<c>``.
    * ``source="local"``: an ILSVRC-2012 train directory ``<path>/<wnid>/*.JPEG``; classes are read one
      after another and, within a class, files sorted by file name. This order differs from the hub's
      stream order, so the subset is a *different* set of images than the paper's. Pixels are used as
      stored (no EXIF orientation). ``source`` is ``<wnid>/<file>``.

    Too few qualifying images for a class raises :class:`DatasetError` naming the class and the count.
    ``min_side`` is the config key ``dataset.min_side`` (shared with the ``folder`` source); ``0`` or ``1``
    takes every image.
    """
    classes = _check_classes(classes, "imagenet.classes")
    per_class = _check_int(per_class, "imagenet.per_class", 1)
    min_side = _check_int(min_side, "dataset.min_side", 0)
    size = _check_int(size, "size", 1)
    versions = _versions()
    if source == "hf":
        if records is not None:
            selected = _select_stream(records, classes, per_class, min_side, "records")
        else:
            try:
                versions["datasets"] = metadata.version("datasets")
            except metadata.PackageNotFoundError:
                pass
            selected = _select_stream(_hf_stream(hf_token), classes, per_class, min_side, "hf:imagenet-1k/train")
        root = None
    elif source == "local":
        if records is not None:
            raise DatasetError("imagenet.source=local cannot be combined with injected records")
        if path is None or (isinstance(path, str) and not path.strip()):
            raise DatasetError("imagenet.source=local needs imagenet.path (or dataset path): "
                               "an ILSVRC2012 train directory")
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DatasetError(f"imagenet.path {root} is not a directory")
        selected = _select_local(root, classes, per_class, min_side)
    else:
        raise DatasetError(f"imagenet.source must be 'hf' or 'local', got {source!r}")
    with _DatasetWriter(out_dir, size) as writer:
        for src, label, img in selected:
            writer.add(_preprocess(img, size, src), src, label)
        config = {"source": "imagenet_subset", "n_images": len(classes) * per_class, "size": size,
                  "min_side": min_side,
                  "imagenet": {"source": source, "path": None if root is None else str(root),
                               "per_class": per_class, "classes": list(classes)}}
        if records is not None:
            config["imagenet"]["records"] = "injected"
        return writer.finish(config, label_names=[_class_name(c) for c in classes], versions=versions)
