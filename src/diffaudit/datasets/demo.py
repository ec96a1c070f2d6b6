"""The ``demo`` source: images derived deterministically from the pictures bundled in scikit-image's wheel
(no download); byte-identical across runs for fixed pillow / scikit-image versions."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from .format import DatasetError, _check_int, _DatasetWriter
from .images import _open_loaded, _preprocess

#: Pictures bundled in scikit-image's wheel used by the ``demo`` source, in label order.
DEMO_SOURCES = (
    "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
    "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "horse.png", "color.png",
    "camera.png", "coins.png", "moon.png", "page.png", "text.png",
    "brick.png", "grass.png", "gravel.png", "clock_motion.png", "cell.png",
)
DEMO_TRANSFORM = (
    "round r = i // n_sources, source = i % n_sources; r == 0: the whole picture; r >= 1: square crop of "
    "side int(min(w,h) * (0.5 + 0.45 * frac(r * 0.5698402909980532))) at offset "
    "(int((w - side) * frac(r * 0.6180339887498949)), int((h - side) * frac(r * 0.7548776662466927))), "
    "mirrored left-right on odd r; then center_crop_resize(size)"
)


def _demo_dir() -> Path:
    import skimage.data  # only locates the bundled files; nothing is downloaded

    return Path(os.path.dirname(skimage.data.__file__))


def _demo_variant(img: Image.Image, r: int) -> Image.Image:
    if r == 0:
        return img
    w, h = img.size
    s = min(w, h)
    side = max(2, int(s * (0.5 + 0.45 * ((r * 0.5698402909980532) % 1.0))))
    left = int((w - side) * ((r * 0.6180339887498949) % 1.0))
    top = int((h - side) * ((r * 0.7548776662466927) % 1.0))
    img = img.crop((left, top, left + side, top + side))
    if r % 2:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def build_demo(out_dir, n_images: int = 40, size: int = 512) -> Path:
    """Build ``n_images`` images derived from the pictures bundled with scikit-image.

    Image ``i`` uses picture ``DEMO_SOURCES[i % 20]`` (label = that index) in round ``r = i // 20``:
    round 0 is the whole picture, later rounds take a square crop whose scale and offset vary with ``r``
    (low-discrepancy sequences, so rounds do not repeat) and mirror it on odd rounds; every image then goes
    through :func:`center_crop_resize`. ``source`` is e.g. ``skimage:astronaut.png#r1``. The files are read
    from the installed wheel (never downloaded), and the result is byte-identical across runs.
    """
    n_images = _check_int(n_images, "n_images", 1)
    size = _check_int(size, "size", 1)
    data_dir = _demo_dir()
    pictures: dict[int, Image.Image] = {}
    with _DatasetWriter(out_dir, size) as writer:
        for i in range(n_images):
            k, r = i % len(DEMO_SOURCES), i // len(DEMO_SOURCES)
            name = DEMO_SOURCES[k]
            if k not in pictures:
                path = data_dir / name
                if not path.is_file():
                    raise DatasetError(f"demo picture {path} is missing from the scikit-image installation")
                pictures[k] = _open_loaded(path)
            img = _preprocess(_demo_variant(pictures[k], r), size, f"demo picture {name}")
            writer.add(img, f"skimage:{name}#r{r}", k)
        config = {"source": "demo", "n_images": n_images, "size": size,
                  "demo_sources": list(DEMO_SOURCES), "demo_transform": DEMO_TRANSFORM}
        return writer.finish(config, label_names=list(DEMO_SOURCES))
