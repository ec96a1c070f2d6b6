"""Tests of diffaudit.datasets: paper preprocessing, the three sources, the on-disk contract."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffaudit.datasets import (IMAGENET_WNIDS, PAPER_CLASSES, DatasetError, build_dataset, build_demo,
                                build_folder, build_imagenet_subset, center_crop_resize, load_images,
                                load_index)


def rand_rgb(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def tree_digest(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def pixels(img):
    return np.asarray(img.convert("RGB"))


# ----------------------------------------------------------------------------------------- preprocessing

def test_center_crop_resize_matches_box_arithmetic_on_odd_image():
    img = rand_rgb(601, 451)
    out = center_crop_resize(img, 64)
    # w//2 - s//2 = 300 - 225 = 75, h//2 - s//2 = 0: a 450x450 square, not 451x451
    expected = img.crop((75, 0, 525, 450)).resize((64, 64)).convert("RGB")
    assert out.mode == "RGB" and out.size == (64, 64)
    assert np.array_equal(pixels(out), pixels(expected))
    assert not np.array_equal(pixels(out), pixels(img.crop((75, 0, 526, 451)).resize((64, 64))))
    # portrait, odd both ways
    tall = rand_rgb(451, 601, seed=1)
    assert np.array_equal(pixels(center_crop_resize(tall, 64)),
                          pixels(tall.crop((0, 75, 450, 525)).resize((64, 64))))


def test_palette_is_resized_in_its_own_mode_then_converted():
    img = rand_rgb(97, 83).convert("P")
    out = center_crop_resize(img, 64)
    expected = img.crop((7, 0, 89, 82)).resize((64, 64)).convert("RGB")  # P resizes nearest-neighbour
    assert np.array_equal(pixels(out), pixels(expected))
    assert not np.array_equal(pixels(out), pixels(img.convert("RGB").crop((7, 0, 89, 82)).resize((64, 64))))


@pytest.mark.parametrize("mode", ["P", "RGBA", "L", "LA", "CMYK", "1", "I;16", "I", "F"])
def test_modes_give_rgb_512(mode):
    base = rand_rgb(61, 45, seed=2)
    gray = np.asarray(base.convert("L")).copy()
    gray[0, :2] = (0, 255)  # full range, so the float min-max stretch is the identity
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode == "I":
        img = Image.fromarray(gray.astype(np.int32) * 257)
    elif mode == "F":
        img = Image.fromarray(gray.astype(np.float32) / 255.0)
    else:
        img = base.convert(mode)
    assert img.mode == mode
    out = center_crop_resize(img)
    assert out.mode == "RGB" and out.size == (512, 512)
    if mode in ("I;16", "I", "F"):  # scaled to 8 bit, not clipped to white/black
        ref = center_crop_resize(Image.fromarray(gray))
        assert np.abs(pixels(out).astype(int) - pixels(ref).astype(int)).max() <= 1


def test_16bit_scaling_is_fixed_range():
    arr = np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)
    img = Image.fromarray(np.kron(arr, np.ones((4, 4), dtype=np.uint16)))
    assert img.mode == "I;16"
    out = pixels(center_crop_resize(img, 8))[..., 0]
    assert out[0, 0] == 0 and out[0, 7] == 100 and out[7, 0] == 255 and out[7, 7] == 7


def test_too_small_image_is_an_error():
    with pytest.raises(DatasetError, match="too small"):
        center_crop_resize(Image.new("RGB", (1, 10)), 64)


# ----------------------------------------------------------------------------------------- demo

def test_demo_default_size_and_layout(tmp_path):
    out = build_demo(tmp_path / "demo", n_images=3)
    assert out == tmp_path / "demo" and not (tmp_path / "demo.tmp").exists()
    df = load_index(out)
    assert list(df.columns) == ["id", "file", "source", "label"]
    assert list(df["id"]) == ["000000", "000001", "000002"]
    assert list(df["file"]) == [f"images/00000{i}.png" for i in range(3)]
    for f in df["file"]:
        with Image.open(out / f) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (512, 512)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["n_images"] == 3 and meta["size"] == 512 and meta["config"]["source"] == "demo"
    assert meta["index_sha256"] == hashlib.sha256((out / "index.csv").read_bytes()).hexdigest()
    assert meta["versions"]["pillow"] and meta["versions"]["scikit-image"]


def test_demo_is_deterministic_and_distinct(tmp_path):
    a = build_demo(tmp_path / "a", n_images=45, size=64)
    b = build_demo(tmp_path / "b", n_images=45, size=64)
    da, db = tree_digest(a), tree_digest(b)
    assert len([k for k in da if k.startswith("images/")]) == 45
    assert da == db
    image_hashes = [h for k, h in da.items() if k.startswith("images/")]
    assert len(set(image_hashes)) == 45
    df = load_index(a)
    assert df["source"][0] == "skimage:astronaut.png#r0"
    assert df["source"][20] == "skimage:astronaut.png#r1" and df["source"][41] == "skimage:coffee.png#r2"
    assert list(df["label"][:3]) == [0, 1, 2] and df["label"][20] == 0 and df["label"][44] == 4
    imgs = load_images(a, df, 0, 45)
    assert len(imgs) == 45 and all(im.mode == "RGB" and im.size == (64, 64) for im in imgs)
    assert len({im.tobytes() for im in imgs}) == 45
    # image 20 = astronaut.png (512x512), round 1: the documented crop, mirrored, then center_crop_resize
    import skimage.data

    with Image.open(Path(skimage.data.__file__).parent / "astronaut.png") as astro:
        side = int(512 * (0.5 + 0.45 * 0.5698402909980532))
        left, top = int((512 - side) * 0.6180339887498949), int((512 - side) * 0.7548776662466927)
        crop = astro.crop((left, top, left + side, top + side)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert np.array_equal(pixels(imgs[20]), pixels(center_crop_resize(crop, 64)))
        assert np.array_equal(pixels(imgs[0]), pixels(center_crop_resize(astro, 64)))


def test_demo_rejects_zero_images(tmp_path):
    with pytest.raises(DatasetError, match="n_images"):
        build_demo(tmp_path / "d", n_images=0)
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.tmp").exists()


# ----------------------------------------------------------------------------------------- folder

def make_folder(root: Path) -> Path:
    root.mkdir()
    rand_rgb(120, 80, 1).save(root / "b.png")
    rand_rgb(70, 90, 2).convert("L").save(root / "a.JPG", quality=95)
    rand_rgb(65, 65, 3).convert("RGBA").save(root / "c.png")
    rand_rgb(50, 64, 4).convert("P").save(root / "d.gif")
    Image.fromarray((np.arange(64 * 80).reshape(64, 80) * 12).astype(np.uint16)).save(root / "e.tif")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"junk")
    return root


def test_folder_mixed_modes_order_and_limit(tmp_path):
    src = make_folder(tmp_path / "src")
    out = build_folder(src, tmp_path / "ds", size=64)
    df = load_index(out)
    assert list(df["source"]) == ["a.JPG", "b.png", "c.png", "d.gif", "e.tif"]
    assert list(df["label"]) == [-1] * 5
    imgs = load_images(out, df, 0, None)
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in imgs)
    with Image.open(src / "b.png") as im:
        assert np.array_equal(pixels(imgs[1]), pixels(center_crop_resize(im, 64)))
    limited = build_folder(src, tmp_path / "ds3", n_images=3, size=64)
    assert list(load_index(limited)["source"]) == ["a.JPG", "b.png", "c.png"]
    assert json.loads((limited / "dataset.json").read_text())["config"]["n_images"] == 3


def test_folder_subfolders_give_labels(tmp_path):
    src = tmp_path / "src"
    for i, (cls, name) in enumerate([("zebra", "1.png"), ("ant", "2.png"), ("ant", "1.png"), ("moth", "x.png")]):
        (src / cls).mkdir(parents=True, exist_ok=True)
        rand_rgb(40, 40, i).save(src / cls / name)
    df = load_index(build_folder(src, tmp_path / "ds", n_images=3, size=64))
    assert list(df["source"]) == ["ant/1.png", "ant/2.png", "moth/x.png"]
    assert list(df["label"]) == [0, 0, 1]  # labels over all class folders: ant=0, moth=1, zebra=2
    rand_rgb(40, 40, 9).save(src / "top.png")  # an image at the top level: no labels
    assert set(load_index(build_folder(src, tmp_path / "ds2", size=64))["label"]) == {-1}


def test_folder_too_few(tmp_path):
    src = make_folder(tmp_path / "src")
    with pytest.raises(DatasetError, match=r"has only 5 images, n_images=6 requested"):
        build_folder(src, tmp_path / "ds", n_images=6, size=64)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_folder_corrupt_file_is_named(tmp_path, kind):
    src = make_folder(tmp_path / "src")
    if kind == "garbage":
        (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    else:
        data = (src / "b.png").read_bytes()
        (src / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"b\.png") as info:
        build_folder(src, tmp_path / "ds", size=64)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.tmp").exists()


def test_folder_bad_paths(tmp_path):
    with pytest.raises(DatasetError, match="nope"):
        build_folder(tmp_path / "nope", tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        build_folder(tmp_path / "empty", tmp_path / "ds")


def test_folder_min_side_names_the_small_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rand_rgb(400, 350, 0).save(src / "big.png")         # shorter side == min_side: accepted
    rand_rgb(12, 10, 1).save(src / "tiny.png")
    rand_rgb(349, 900, 2).save(src / "narrow.jpg")
    with pytest.raises(DatasetError) as info:
        build_folder(src, tmp_path / "ds", size=64, min_side=350)
    msg = str(info.value)
    assert "\n" not in msg and "2 of 3 images" in msg
    assert "tiny.png (12x10)" in msg and "narrow.jpg (349x900)" in msg and "big.png" not in msg
    assert "dataset.min_side=350" in msg and "lower dataset.min_side" in msg and "remove these files" in msg
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.tmp").exists()
    # only the images used count: the first one alone (sorted order: big, narrow, tiny) passes
    assert len(load_index(build_folder(src, tmp_path / "one", n_images=1, size=64, min_side=350))) == 1
    out = build_folder(src, tmp_path / "all", size=64, min_side=10)  # every image's shorter side is >= 10
    assert len(load_index(out)) == 3 and json.loads((out / "dataset.json").read_text())["config"]["min_side"] == 10
    for off in (0, 1):  # 0 or 1 accepts every image
        assert len(load_index(build_folder(src, tmp_path / f"off{off}", size=64, min_side=off))) == 3


def test_folder_min_side_lists_the_first_five(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        rand_rgb(20, 30, i).save(src / f"s{i}.png")
    with pytest.raises(DatasetError, match=r"8 of 8 images .*s0\.png \(20x30\), .*s4\.png \(20x30\), "
                                           r"\.\.\. and 3 more") as info:
        build_folder(src, tmp_path / "ds", size=64, min_side=21)
    assert "s5.png" not in str(info.value)


def test_rebuild_is_atomic(tmp_path):
    src = make_folder(tmp_path / "src")
    stale = tmp_path / "ds.tmp"
    stale.mkdir()
    (stale / "leftover").write_text("x")
    out = build_folder(src, tmp_path / "ds", n_images=2, size=64)
    assert not stale.exists() and sorted(p.name for p in out.iterdir()) == ["dataset.json", "images", "index.csv"]
    before = tree_digest(out)
    with pytest.raises(DatasetError):  # a failing rebuild keeps the previous dataset
        build_folder(src, out, n_images=99, size=64)
    assert tree_digest(out) == before
    build_folder(src, out, n_images=4, size=64)  # a successful one replaces it
    assert len(load_index(out)) == 4 and len(list((out / "images").iterdir())) == 4


# ----------------------------------------------------------------------------------------- imagenet

def record(label, w, h, seed):
    return {"image": rand_rgb(w, h, seed), "label": label}


def test_imagenet_records_selection(tmp_path):
    recs = [
        record(235, 50, 50, 0),   # 0 ok -> class 0
        record(1, 80, 80, 1),     # 1 other class
        record(980, 40, 60, 2),   # 2 ok -> class 4
        record(242, 29, 90, 3),   # 3 too small (min side 29)
        record(242, 30, 90, 4),   # 4 ok (min side == min_side)
        record(235, 70, 35, 5),   # 5 ok, class 0 now full
        record(235, 90, 90, 6),   # 6 class 0 already full
        record(717, 31, 31, 7),   # 7 ok
        record(282, 60, 60, 8),   # 8 ok
        record(980, 64, 64, 9),   # 9 ok
        record(282, 60, 60, 10),  # 10 ok
        record(242, 60, 60, 11),  # 11 ok
        record(717, 60, 60, 12),  # 12 ok: all classes full -> stop
    ]

    def stream():
        yield from recs
        raise AssertionError("read past the point where every class was full")

    out = build_imagenet_subset(tmp_path / "in", per_class=2, min_side=30, size=64, records=stream())
    df = load_index(out)
    positions = [int(s.split("[")[1].split("]")[0]) for s in df["source"]]
    assert positions == [0, 2, 4, 5, 7, 8, 9, 10, 11, 12]  # stream order, not grouped by class
    assert list(df["label"]) == [0, 4, 1, 0, 3, 2, 4, 2, 1, 3]
    assert df["source"][1].endswith("class=980")
    imgs = load_images(out, df, 0, 10)
    assert np.array_equal(pixels(imgs[3]), pixels(center_crop_resize(recs[5]["image"], 64)))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["config"]["imagenet"]["classes"] == list(PAPER_CLASSES) and meta["n_images"] == 10
    assert meta["label_names"][0] == "German shepherd"


def test_imagenet_records_custom_class_order(tmp_path):
    recs = [record(980, 40, 40, 0), record(235, 40, 40, 1)]
    df = load_index(build_imagenet_subset(tmp_path / "in", classes=(980, 235), per_class=1, min_side=1,
                                          size=64, records=recs))
    assert list(df["label"]) == [0, 1]


def test_imagenet_too_few(tmp_path):
    recs = [record(c, 50, 50, i) for i, c in enumerate(PAPER_CLASSES)] + [record(282, 20, 50, 9)]
    recs += [record(c, 50, 50, 10 + i) for i, c in enumerate((235, 242, 717, 980))]
    with pytest.raises(DatasetError, match=r"class 282 \(tiger cat\) has only 1 images") as info:
        build_imagenet_subset(tmp_path / "in", per_class=2, min_side=30, size=64, records=recs)
    assert "235" not in str(info.value)
    assert not (tmp_path / "in").exists() and not (tmp_path / "in.tmp").exists()


def fake_ilsvrc(root: Path) -> Path:
    sizes = {235: [("n02106662_9.JPEG", 60, 40), ("n02106662_10.JPEG", 30, 80), ("n02106662_2.JPEG", 45, 45),
                   ("n02106662_1.JPEG", 20, 50)],
             980: [("b.JPEG", 50, 50), ("a.JPEG", 41, 70)]}
    for c, files in sizes.items():
        d = root / IMAGENET_WNIDS[c]
        d.mkdir(parents=True)
        for i, (name, w, h) in enumerate(files):
            rand_rgb(w, h, i).save(d / name, format="JPEG", quality=95)
    return root


def test_imagenet_local(tmp_path):
    root = fake_ilsvrc(tmp_path / "train")
    out = build_imagenet_subset(tmp_path / "in", source="local", path=root, classes=(235, 980), per_class=2,
                                min_side=40, size=64)
    df = load_index(out)
    # sorted by file name: _1 (too small), _10 (too small), _2, _9; then class 980: a, b
    assert list(df["source"]) == ["n02106662/n02106662_2.JPEG", "n02106662/n02106662_9.JPEG",
                                  "n09472597/a.JPEG", "n09472597/b.JPEG"]
    assert list(df["label"]) == [0, 0, 1, 1]
    assert all(im.size == (64, 64) for im in load_images(out, df, 0, 4))
    with pytest.raises(DatasetError, match="class 235 .* has only 2 images"):
        build_imagenet_subset(tmp_path / "x", source="local", path=root, classes=(235,), per_class=3,
                              min_side=40, size=64)


def test_imagenet_local_missing_class_folder(tmp_path):
    root = fake_ilsvrc(tmp_path / "train")
    with pytest.raises(DatasetError, match=IMAGENET_WNIDS[242]):
        build_imagenet_subset(tmp_path / "in", source="local", path=root, per_class=1, min_side=1, size=64)
    with pytest.raises(DatasetError, match="imagenet.path"):
        build_imagenet_subset(tmp_path / "in", source="local", size=64)


def test_imagenet_hf_stream_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    imgs = [rand_rgb(50, 50, 0), rand_rgb(40, 40, 1), rand_rgb(20, 60, 2), rand_rgb(60, 45, 3)]
    local = datasets.Dataset.from_dict(
        {"image": imgs, "label": [235, 3, 235, 980]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    calls = []

    def fake_load(name, **kwargs):
        calls.append((name, kwargs))
        return local.to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = build_imagenet_subset(tmp_path / "in", classes=(235, 980), per_class=1, min_side=30, size=64,
                                hf_token="tok")
    assert calls == [("imagenet-1k", {"split": "train", "streaming": True, "token": "tok"})]
    df = load_index(out)
    assert list(df["source"]) == ["hf:imagenet-1k/train[0]:class=235", "hf:imagenet-1k/train[3]:class=980"]
    assert "tok" not in (out / "dataset.json").read_text()

    def offline(name, **kwargs):
        raise ConnectionError("Couldn't reach 'imagenet-1k' on the Hub\n(offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError, match="hf auth login") as info:
        build_imagenet_subset(tmp_path / "in2", size=64)
    msg = str(info.value)
    assert "\n" not in msg and "source: local" in msg and "ConnectionError" in msg


# ----------------------------------------------------------------------------------------- dispatch & reading

def test_build_dataset_dispatch(tmp_path):
    # the merged workflow config carries keys that do not apply to the chosen source; the demo ignores min_side
    # (some of its bundled pictures, e.g. text.png, are below 350 px)
    cfg = {"source": "demo", "path": None, "n_images": 2, "size": 64, "min_side": 10**6,
           "imagenet": {"source": "hf", "classes": list(PAPER_CLASSES), "per_class": 100}}
    assert len(load_index(build_dataset(cfg, tmp_path / "demo"))) == 2
    src = make_folder(tmp_path / "src")
    out = build_dataset({"source": "folder", "path": str(src), "n_images": 2, "size": 64, "min_side": 0},
                        tmp_path / "f")
    assert list(load_index(out)["source"]) == ["a.JPG", "b.png"]
    root = fake_ilsvrc(tmp_path / "train")
    cfg = {"source": "imagenet_subset", "path": str(root), "n_images": 1, "size": 64, "min_side": 40,
           "imagenet": {"source": "local", "classes": [980], "per_class": 2}}
    out = build_dataset(cfg, tmp_path / "in")
    assert list(load_index(out)["label"]) == [0, 0]
    assert json.loads((out / "dataset.json").read_text())["config"]["min_side"] == 40


def test_build_dataset_min_side_is_one_key_for_folder_and_imagenet(tmp_path):
    src = make_folder(tmp_path / "src")  # images of 50..120 px
    # without the key: the paper's 350 px, which these images are below
    with pytest.raises(DatasetError, match=r"5 of 5 images have a shorter side below dataset.min_side=350"):
        build_dataset({"source": "folder", "path": str(src), "size": 64}, tmp_path / "f")
    with pytest.raises(DatasetError, match=r"b\.png \(120x80\)"):
        build_dataset({"source": "folder", "path": str(src), "size": 64, "min_side": 81}, tmp_path / "f")
    assert len(load_index(build_dataset({"source": "folder", "path": str(src), "size": 64, "min_side": 50},
                                        tmp_path / "f"))) == 5
    # the same key on the ImageNet local path: class 980 has a 50x50 and a 41x70 image
    root = fake_ilsvrc(tmp_path / "train")
    cfg = {"source": "imagenet_subset", "path": str(root), "size": 64, "min_side": 42,
           "imagenet": {"source": "local", "classes": [980], "per_class": 2}}
    with pytest.raises(DatasetError, match=r"class 980 \(volcano\) has only 1 images with min\(w,h\) >= 42 "
                                           r"\(dataset.min_side\)"):
        build_dataset(cfg, tmp_path / "in")


@pytest.mark.parametrize("cfg, match", [
    ({"source": "pictures"}, "unknown source 'pictures'"),
    ({"n_images": 3}, "missing key 'source'"),
    ({"source": "folder", "n_images": 3}, "needs key 'path'"),
    ({"source": "demo", "n_image": 3}, "unknown key.*n_image"),
    ({"source": "demo", "n_images": "many"}, "n_images"),
    ({"source": "imagenet_subset", "imagenet": {"source": "s3"}}, "imagenet.source"),
    ({"source": "imagenet_subset", "imagenet": {"per_klass": 3}}, "imagenet.per_klass"),
    ({"source": "imagenet_subset", "n_images": 501}, "n_images=501 exceeds"),
    ({"source": "imagenet_subset", "imagenet": {"min_side": 350}}, "imagenet.min_side has moved to dataset.min_side"),
    ({"source": "folder", "path": "x", "min_side": -1}, "dataset.min_side must be an integer >= 0"),
    ({"source": "imagenet_subset", "min_side": "big"}, "dataset.min_side"),
])
def test_build_dataset_errors_name_the_key(tmp_path, cfg, match):
    with pytest.raises(DatasetError, match=match):
        build_dataset(cfg, tmp_path / "ds")


def test_load_index_validation(tmp_path):
    with pytest.raises(DatasetError, match="index.csv"):
        load_index(tmp_path)
    (tmp_path / "index.csv").write_text("id,file,label\n000000,images/000000.png,0\n")
    with pytest.raises(DatasetError, match="index.csv has columns id,file,label"):
        load_index(tmp_path)
    (tmp_path / "index.csv").write_bytes(b"")
    with pytest.raises(DatasetError, match="index.csv"):
        load_index(tmp_path)
    (tmp_path / "index.csv").write_text("id,file,source,label\n000000,images/000000.png,x,zero\n")
    with pytest.raises(DatasetError, match="label"):
        load_index(tmp_path)
    (tmp_path / "index.csv").write_text("id,file,source,label\n000001,images/000001.png,NA,-1\n")
    with pytest.raises(DatasetError, match="row 0 has id '000001'"):
        load_index(tmp_path)
    (tmp_path / "index.csv").write_text("id,file,source,label\n000000,images/000000.png,NA,-1\n")
    df = load_index(tmp_path)
    assert df["source"][0] == "NA" and df["label"].dtype == np.int64


def test_load_images_verifies_size_and_mode(tmp_path):
    out = build_demo(tmp_path / "demo", n_images=3, size=64)
    df = load_index(out)
    assert [im.size for im in load_images(out, df, 1, 3)] == [(64, 64), (64, 64)]
    rand_rgb(32, 32).save(out / "images" / "000001.png")
    with pytest.raises(DatasetError, match=r"000001\.png is 32x32, expected 64x64"):
        load_images(out, df, 0, 3)
    rand_rgb(64, 64).convert("L").save(out / "images" / "000001.png")
    with pytest.raises(DatasetError, match=r"000001\.png has mode L"):
        load_images(out, df, 0, 3)
    (out / "images" / "000002.png").unlink()
    with pytest.raises(DatasetError, match=r"000002\.png"):
        load_images(out, df, 2, 3)
    assert isinstance(df, pd.DataFrame)
