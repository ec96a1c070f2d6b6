"""The explorer (``diffaudit explore``, docs/explorer.md) over a small synthetic results directory: its maps against
numpy, the labeller's file, and its safety (files only under the results directory, 4xx for malformed requests,
concurrent clients). Plain HTTP, no browser: tests/test_explorer_browser.py drives the page in Chromium."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffaudit.analyses.anomalies import REF_LAYER, detect_anomalies, load_label_file, relative_norms
from diffaudit.explorer.data import Explorer, decode, similarity
from diffaudit.explorer.server import serve_in_thread
from diffaudit.figures.qualitative import norm_map, token_similarity_map
from diffaudit.store import ReprStore, StoreWriter

REPO = Path(__file__).resolve().parents[1]
N_IMG = 6
# (channels, size) in U-Net order; the reference layer is 8x8 here, so labels live on an 8x8 grid
SIZES = {"down_blocks[0].resnets[0]": (8, 16), "mid_block.attentions[0]": (32, 4), REF_LAYER: (16, 8),
         "up_blocks[3].attentions[2]": (8, 16)}
PLANT = (1, 4, 2)  # image, x, y of a planted high-norm 2x2 patch on the reference layer


def _write_store(path: Path, sizes: dict, ids: list[str], seed: int, plant: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    data = {}
    for layer, (c, h) in sizes.items():
        x = rng.standard_normal((len(ids), c, h, h)) + 0.3
        if plant and layer == REF_LAYER:
            img, px, py = PLANT
            if img < len(ids):
                x[img, :, py:py + 2, px:px + 2] *= 8.0
        data[layer] = x.astype(np.float16)
    w = StoreWriter(path, layers=list(sizes), image_ids=ids, labels=None, config={"t": "explorer"},
                    attrs={"image_size": 128, "model": path.parts[-3], "variant": "full"}, shard_images=2)
    w.write_batch(0, data)
    w.finalize()
    return {k: v.astype(np.float32) for k, v in data.items()}


def make_results(root: Path) -> dict:
    """A results directory: model ``m1`` (baseline + experiment ``e1``), model ``m2`` (two shards), the dataset,
    a run summary, and a secret file beside it with a symlink pointing out."""
    ids = [f"{i:06d}" for i in range(N_IMG)]
    ds = root / "dataset"
    (ds / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, iid in enumerate(ids):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).resize((128, 128)).save(
            ds / "images" / f"{iid}.png")
        rows.append({"id": iid, "file": f"images/{iid}.png", "source": "synthetic", "label": i})
    pd.DataFrame(rows).to_csv(ds / "index.csv", index=False)
    arrays = {"m1": _write_store(root / "m1" / "representations" / "full.zarr", SIZES, ids, seed=1)}
    exp_sizes = {k: SIZES[k] for k in ("mid_block.attentions[0]", REF_LAYER)}
    arrays["m1/e1"] = _write_store(root / "m1" / "experiments" / "e1" / "representations" / "full.zarr", exp_sizes,
                                   ids, seed=2)
    m2 = {}
    for k, part in enumerate([ids[:4], ids[4:]]):
        a = _write_store(root / "m2" / "representations" / f"shard{k + 1}of2" / "full.zarr", SIZES, part,
                         seed=3 + k, plant=False)
        for layer, v in a.items():
            m2.setdefault(layer, []).append(v)
    arrays["m2"] = {layer: np.concatenate(v) for layer, v in m2.items()}
    summ = root / "experiment_summary" / "m1"
    summ.mkdir(parents=True)
    pd.DataFrame({"layer_index": range(len(SIZES)), "layer": list(SIZES), "spatial": [h for _, h in SIZES.values()],
                  "acc_8x8": [0.2, 0.5, 0.9, 0.3], "corner_ratio": [1.0, 2.0, 1.5, np.nan],
                  "rel_norm_mean": [1.1, 1.4, 3.0, 1.2]}).to_csv(summ / "baseline.csv", index=False)
    secret = root.parent / "secret.txt"
    secret.write_text("do not serve")
    (root / "dataset" / "link_out.txt").symlink_to(secret)
    (root / "dataset" / "dir_out").symlink_to(root.parent)
    return arrays


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer") / "results"
    arrays = make_results(root)
    return root, arrays


@pytest.fixture(scope="module")
def server(results):
    root, arrays = results
    ex = Explorer(root)
    srv, url = serve_in_thread(ex)
    yield ex, url, arrays
    srv.shutdown()
    srv.server_close()


def _get(url: str, path: str):
    """GET ``path`` sent verbatim (no client-side normalisation of ``..``): (status, parsed JSON or bytes)."""
    host, port = url.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=20)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    c.close()
    if r.getheader("Content-Type", "").startswith("application/json"):
        return r.status, json.loads(body)
    return r.status, body


def _post(url: str, path: str, body: bytes, ctype: str = "application/json", headers: dict | None = None):
    host, port = url.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=20)
    c.request("POST", path, body=body, headers={"Content-Type": ctype, **(headers or {})})
    r = c.getresponse()
    out = r.status, json.loads(r.read() or b"{}")
    c.close()
    return out


def _q(**kw) -> str:
    from urllib.parse import urlencode

    return urlencode(kw)


# ---------------------------------------------------------------------------------------------- metrics

def test_similarity_metrics_match_numpy():
    rng = np.random.default_rng(0)
    rep = rng.standard_normal((7, 5, 6)).astype(np.float32)
    own = rng.standard_normal((7, 5, 6)).astype(np.float32)
    ref = own[:, 2, 3]
    t = rep.reshape(7, -1).T  # (tokens, C)
    cos = similarity(rep, ref, "cosine").reshape(-1)
    assert np.allclose(cos, t @ ref / np.linalg.norm(t, axis=1) / np.linalg.norm(ref), atol=1e-5)
    assert np.allclose(similarity(rep, ref, "cosine"), token_similarity_map(rep, ref), atol=1e-6)
    mean = own.mean(axis=(1, 2))
    tc, rc = t - rep.mean(axis=(1, 2)), ref - mean
    cc = similarity(rep, ref, "centred_cosine", mean).reshape(-1)
    assert np.allclose(cc, tc @ rc / np.linalg.norm(tc, axis=1) / np.linalg.norm(rc), atol=1e-5)
    assert np.allclose(similarity(rep, ref, "dot").reshape(-1), t @ ref, atol=1e-4)
    assert np.allclose(similarity(rep, ref, "l2").reshape(-1), np.linalg.norm(t - ref, axis=1), atol=1e-5)
    assert np.allclose(similarity(rep, ref, "rel_norm").reshape(-1),
                       np.linalg.norm(t, axis=1) / np.linalg.norm(ref), atol=1e-5)
    assert similarity(own, ref, "cosine")[2, 3] == pytest.approx(1.0, abs=1e-6)
    assert similarity(own, ref, "l2")[2, 3] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- API

def test_meta_lists_models_runs_layers(server):
    ex, url, _ = server
    st, meta = _get(url, "/api/meta")
    assert st == 200
    assert set(meta["models"]) == {"m1", "m2"}
    assert set(meta["models"]["m1"]) == {"baseline", "e1"} and set(meta["models"]["m2"]) == {"baseline"}
    assert [lay["name"] for lay in meta["models"]["m1"]["baseline"]["layers"]] == list(SIZES)
    assert meta["models"]["m2"]["baseline"]["n_images"] == N_IMG  # the shards read as one store
    assert meta["image_files"]["000003"] == "dataset/images/000003.png"
    assert meta["metrics"] == ["cosine", "centred_cosine", "dot", "l2", "rel_norm"]


@pytest.mark.parametrize("metric", ["cosine", "centred_cosine", "dot", "l2", "rel_norm"])
@pytest.mark.parametrize("model,run,layer", [("m1", "baseline", "down_blocks[0].resnets[0]"),
                                             ("m1", "e1", "mid_block.attentions[0]"),
                                             ("m2", "baseline", REF_LAYER)])
def test_similarity_endpoint_equals_numpy(server, metric, model, run, layer):
    _, url, arrays = server
    a = arrays[model if run == "baseline" else f"{model}/{run}"][layer]
    h = a.shape[2]
    ref_img, y, x, shown = 4, h - 1, 1, [0, 4, 5]
    st, res = _get(url, "/api/similarity?" + _q(model=model, run=run, layer=layer, ref=ref_img, y=y, x=x,
                                                  images="0,4,5", metric=metric))
    assert st == 200, res
    r = a[ref_img, :, y, x]
    for m, i in zip(res["maps"], shown):
        got = decode(m["data"], (h, h))
        tok = a[i].reshape(a.shape[1], -1).T
        if metric == "cosine":
            want = tok @ r / np.linalg.norm(tok, axis=1) / np.linalg.norm(r)
        elif metric == "centred_cosine":
            rc = r - a[ref_img].mean(axis=(1, 2))
            tc = tok - tok.mean(axis=0)
            want = tc @ rc / np.linalg.norm(tc, axis=1) / np.linalg.norm(rc)
        elif metric == "dot":
            want = tok @ r
        elif metric == "l2":
            want = np.linalg.norm(tok - r, axis=1)
        else:
            want = np.linalg.norm(tok, axis=1) / np.linalg.norm(r)
        want = want.reshape(h, h)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4), (metric, i)
        flat = want.copy()
        if metric == "l2" and i == ref_img:
            flat[y, x] = np.inf
        best = np.unravel_index(np.argmin(flat) if metric == "l2" else np.argmax(flat), flat.shape)
        assert tuple(m["best"]) == tuple(int(b) for b in best)
    assert res["token"] == [y, x] and res["ref_image"] == ref_img


def test_similarity_reads_only_the_shown_images(results):
    root, _ = results
    ex = Explorer(root)
    ex.similarity_maps("m1", None, "down_blocks[0].resnets[0]", 2, 0, 0, [2, 3])
    assert ex.cache.reads == 2  # one chunk per shown image, never the layer
    ex.similarity_maps("m1", None, "down_blocks[0].resnets[0]", 3, 5, 5, [2, 3])
    assert ex.cache.reads == 2  # hovering reuses them


def test_strip_every_layer_in_unet_order(server):
    _, url, arrays = server
    st, res = _get(url, "/api/strip?" + _q(model="m1", layer=REF_LAYER, ref=1, y=5, x=2, image=3))
    assert st == 200, res
    assert [lay["layer"] for lay in res["layers"]] == list(SIZES)
    for lay in res["layers"]:
        a = arrays["m1"][lay["layer"]]
        h = a.shape[2]
        ly, lx = int((5 + 0.5) / 8 * h), int((2 + 0.5) / 8 * h)
        assert lay["token"] == [ly, lx]
        assert np.allclose(decode(lay["data"], (h, h)), token_similarity_map(a[3], a[1][:, ly, lx]), atol=1e-5)


def test_norms_with_detected_and_labelled_anomalies(server, results):
    ex, url, arrays = server
    root, _ = results
    st, res = _get(url, "/api/norms?" + _q(model="m1", layer=REF_LAYER, images="0,1,2"))
    assert st == 200, res
    assert res["is_ref_layer"] and res["ref_grid"] == 8
    for m in res["maps"]:
        got = decode(m["data"], (8, 8))
        assert np.allclose(got / got.max(), norm_map(arrays["m1"][REF_LAYER][m["image"]]), atol=1e-5)
    want = detect_anomalies(ReprStore(root / "m1" / "representations" / "full.zarr"), layer=REF_LAYER)
    for m in res["maps"]:
        assert sorted(map(tuple, m["detected_xy"])) == sorted((int(x), int(y)) for i, x, y in want if i == m["image"])
    img, px, py = PLANT
    assert [px, py] in res["maps"][1]["detected_xy"]
    # on a 16x16 layer the same patch is a 4x4 box at (2y, 2x)
    st, res16 = _get(url, "/api/norms?" + _q(model="m1", layer="down_blocks[0].resnets[0]", images="1"))
    assert [2 * py, 2 * px, 4] in res16["maps"][0]["detected"]


def test_curves_from_the_run_summary(server):
    _, url, _ = server
    st, res = _get(url, "/api/curves?" + _q(model="m1", run="baseline"))
    assert st == 200 and res["available"]
    assert res["layers"] == list(SIZES)
    assert res["curves"]["acc_8x8"] == [0.2, 0.5, 0.9, 0.3] and res["curves"]["corner_ratio"][3] is None
    st, res = _get(url, "/api/curves?" + _q(model="m2"))
    assert st == 200 and not res["available"] and "experiment_summary" in res["message"]


# ---------------------------------------------------------------------------------------------- labeller

def test_label_toggle_saves_authors_format_atomically(server, results):
    ex, url, _ = server
    root, _ = results
    path = root / "labels" / "m1.npy"
    assert not path.exists()
    st, res = _post(url, "/api/labels", json.dumps({"model": "m1", "image": 2, "x": 5, "y": 3}).encode())
    assert st == 200, res
    assert res["action"] == "added" and res["patch"] == [2, 4, 2]  # snapped to the even-aligned patch
    st, res = _post(url, "/api/labels", json.dumps({"model": "m1", "image": 0, "x": 6, "y": 0}).encode())
    arr = np.load(path, allow_pickle=False)
    assert arr.dtype == np.int64 and arr.tolist() == [[0, 6, 0], [2, 4, 2]]
    assert load_label_file(path, n_images=N_IMG, grid=8).tolist() == arr.tolist()
    # the anomalies rule's reader and relative norms take it
    store = ReprStore(root / "m1" / "representations" / "full.zarr")
    table = relative_norms(store, load_label_file(path, n_images=N_IMG, grid=8), label_source="user:m1.npy")
    assert (table["n_anomalies"] == 2).all()
    # a reload shows them; the norm map draws them
    assert _get(url, "/api/labels?model=m1")[1]["labels"] == [[0, 6, 0], [2, 4, 2]]
    st, res = _get(url, "/api/norms?" + _q(model="m1", layer=REF_LAYER, images="2"))
    assert res["maps"][0]["labelled"] == [[2, 4, 2]]
    assert list(path.parent.glob(".*tmp")) == []  # no temporary files left
    # toggling again removes it
    st, res = _post(url, "/api/labels", json.dumps({"model": "m1", "image": 2, "x": 4, "y": 2}).encode())
    assert res["action"] == "removed" and np.load(path).tolist() == [[0, 6, 0]]
    st, res = _post(url, "/api/labels", json.dumps({"model": "m1", "image": 0, "x": 6, "y": 0}).encode())
    assert np.load(path).shape == (0, 3)


def test_concurrent_label_writes_all_kept(server, results):
    root, _ = results
    _, url, _ = server
    patches = [(i % N_IMG, 2 * (i % 4), 2 * (i // 4 % 4)) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda p: _post(url, "/api/labels", json.dumps(
            {"model": "m2", "image": p[0], "x": p[1], "y": p[2]}).encode())[0], patches))
    assert codes == [200] * 16
    got = sorted(map(tuple, np.load(root / "labels" / "m2.npy").tolist()))
    assert got == sorted(set(patches))


def test_label_writes_go_only_to_the_labels_path(tmp_path, results):
    root, _ = results
    target = tmp_path / "mine" / "{model}_hand.npy"
    ex = Explorer(root, labels=str(target))
    before = {p for p in root.rglob("*") if p.is_file()}
    ex.toggle_label("m1", 1, 4, 2)
    assert (tmp_path / "mine" / "m1_hand.npy").is_file()
    assert {p for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(Exception, match="outside"):
        ex.toggle_label("m1", 1, 9, 2)
    with pytest.raises(Exception, match="out of range"):
        ex.toggle_label("m1", 99, 2, 2)


# ---------------------------------------------------------------------------------------------- safety

@pytest.mark.parametrize("path", [
    "/files/../secret.txt", "/files/dataset/../../secret.txt", "/files/%2e%2e/secret.txt",
    "/files/%2E%2E%2Fsecret.txt", "/files/dataset/%2e%2e/%2e%2e/secret.txt", "/files/..%2fsecret.txt",
    "/files//etc/passwd", "/files/%2Fetc%2Fpasswd", "/files/dataset/link_out.txt", "/files/dataset/dir_out/secret.txt",
    "/files/dataset/images", "/files/nope.png", "/files/%00", "/files/dataset\\..\\..\\secret.txt",
    "/static/../server.py", "/static/%2e%2e/server.py", "/../../etc/passwd", "/api/nothing",
])
def test_files_outside_the_results_dir_are_refused(server, path):
    _, url, _ = server
    st, body = _get(url, path)
    assert 400 <= st < 500, (path, st)
    assert isinstance(body, dict) and body["error"]
    assert b"do not serve" not in json.dumps(body).encode()


def test_files_under_the_results_dir_are_served(server):
    _, url, _ = server
    st, body = _get(url, "/files/dataset/images/000002.png")
    assert st == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    st, body = _get(url, "/")
    assert st == 200 and b"<canvas" in body
    assert _get(url, "/static/explorer.js")[0] == 200


@pytest.mark.parametrize("path", [
    "/api/similarity", "/api/similarity?model=m1", "/api/similarity?" + _q(model="zz", layer=REF_LAYER, ref=0, y=0,
                                                                             x=0, images="0"),
    "/api/similarity?" + _q(model="m1", layer="nope", ref=0, y=0, x=0, images="0"),
    "/api/similarity?" + _q(model="m1", layer=REF_LAYER, ref="a", y=0, x=0, images="0"),
    "/api/similarity?" + _q(model="m1", layer=REF_LAYER, ref=0, y=99, x=0, images="0"),
    "/api/similarity?" + _q(model="m1", layer=REF_LAYER, ref=0, y=-1, x=0, images="0"),
    "/api/similarity?" + _q(model="m1", layer=REF_LAYER, ref=0, y=0, x=0, images="0,x"),
    "/api/similarity?" + _q(model="m1", layer=REF_LAYER, ref=0, y=0, x=0, images="0,77"),
    "/api/similarity?" + _q(model="m1", layer=REF_LAYER, ref=0, y=0, x=0, images="0", metric="euclid"),
    "/api/similarity?" + _q(model="m1", run="zz", layer=REF_LAYER, ref=0, y=0, x=0, images="0"),
    "/api/strip?" + _q(model="m1", layer=REF_LAYER, ref=0, y=0, x=0),
    "/api/norms?" + _q(model="m1", layer=REF_LAYER, images=""),
    "/api/labels", "/api/labels?model=%ff%fe", "/api/curves?model=m1&run=nope",
])
def test_malformed_requests_get_4xx_with_a_message(server, path):
    _, url, _ = server
    st, body = _get(url, path)
    assert 400 <= st < 500, (path, st, body)
    assert isinstance(body, dict) and isinstance(body["error"], str) and "Traceback" not in body["error"]


@pytest.mark.parametrize("body,ctype,headers,code", [
    (b"{not json", "application/json", None, 400),
    (b"[1, 2]", "application/json", None, 400),
    (b'{"model": "m1"}', "application/json", None, 400),
    (b'{"model": "m1", "image": 0, "x": 1.5, "y": 0}', "application/json", None, 400),
    (b'{"model": "m1", "image": 0, "x": true, "y": 0}', "application/json", None, 400),
    (b'{"model": "m1", "image": 0, "x": 40, "y": 0}', "application/json", None, 400),
    (b'{"model": "../../x", "image": 0, "x": 0, "y": 0}', "application/json", None, 404),
    (b'{"model": "m1", "image": 0, "x": 0, "y": 0}', "text/plain", None, 415),
    (b"x" * 20000, "application/json", None, 413),
])
def test_malformed_label_posts_get_4xx(server, results, body, ctype, headers, code):
    _, url, _ = server
    root, _ = results
    before = sorted(p.name for p in root.rglob("*.npy"))
    st, res = _post(url, "/api/labels", body, ctype, headers)
    assert st == code, res
    assert res["error"]
    assert sorted(p.name for p in root.rglob("*.npy")) == before


def test_raw_garbage_and_the_server_survives(server):
    _, url, _ = server
    host, port = url.split("//")[1].split(":")
    for raw in [b"GARBAGE\r\n\r\n", b"GET /api/meta HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
                b"POST /api/labels HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n{}",
                b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"]:
        data = b""
        with socket.create_connection((host, int(port)), timeout=10) as s:
            try:
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
                while chunk := s.recv(65536):
                    data += chunk
            except ConnectionResetError:  # the server may close a too-long request line before reading it all
                pass
        if data:
            status = int(data.split(b" ", 2)[1])
            assert 400 <= status < 500, (raw[:40], data[:200])
            assert b"Traceback" not in data
    assert _get(url, "/api/meta")[0] == 200


def test_concurrent_tabs_get_their_own_answers(server):
    _, url, arrays = server
    a = arrays["m1"]["down_blocks[0].resnets[0]"]
    jobs = [(ref, y, x) for ref in range(N_IMG) for y, x in [(0, 0), (7, 9), (15, 15)]]

    def one(job):
        ref, y, x = job
        st, res = _get(url, "/api/similarity?" + _q(model="m1", layer="down_blocks[0].resnets[0]", ref=ref, y=y,
                                                      x=x, images="1,2"))
        assert st == 200, res
        return [decode(m["data"], (16, 16)) for m in res["maps"]]

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(one, jobs * 2))
    for (ref, y, x), maps in zip(jobs * 2, out):
        for i, got in zip([1, 2], maps):
            assert np.allclose(got, token_similarity_map(a[i], a[ref][:, y, x]), atol=1e-5)


def test_binds_to_localhost_by_default(results):
    from diffaudit.explorer.server import make_server

    srv = make_server(Explorer(results[0]), port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


def test_cli_explore_prints_its_address_and_serves(results, tmp_path):
    root, _ = results
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"results_dir: {root}\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffaudit.cli", "explore", "--configfile", str(cfg), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("diffaudit explorer: http://127.0.0.1:"), (line, proc.poll())
        base = line.split()[2].rstrip("/")
        st, meta = _get(base, "/api/meta")
        assert st == 200 and set(meta["models"]) == {"m1", "m2"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_explore_without_stores_is_one_line(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    (tmp_path / "empty").mkdir()
    cfg.write_text(f"results_dir: {tmp_path / 'empty'}\n")
    proc = subprocess.run([sys.executable, "-m", "diffaudit.cli", "explore", "--configfile", str(cfg), "--port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "no representation store" in proc.stderr and "Traceback" not in proc.stderr


def test_explorer_threads_do_not_leak(server):
    before = threading.active_count()
    _, url, _ = server
    for _ in range(5):
        _get(url, "/api/meta")
    assert threading.active_count() <= before + 2


def test_incomplete_store_and_broken_label_file(tmp_path):
    """A store still being written is left out of the page with a note (requests on it: 409); a hand-broken
    label file hides only the labels, not the norm maps, and refuses to be overwritten."""
    root = tmp_path / "results"
    ids = [f"{i:06d}" for i in range(4)]
    _write_store(root / "ok" / "representations" / "full.zarr", {REF_LAYER: (4, 8)}, ids, seed=0)
    w = StoreWriter(root / "busy" / "representations" / "full.zarr", layers=[REF_LAYER], image_ids=ids, labels=None,
                    config={"t": "busy"})
    w.write_batch(0, {REF_LAYER: np.ones((2, 4, 8, 8), np.float16)})  # 2 of 4 images, not finalized
    bad = tmp_path / "labels" / "{model}.npy"
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "labels" / "ok.npy", np.array([[0, 3, 0]]))  # odd x: invalid
    srv, url = serve_in_thread(Explorer(root, labels=str(bad)))
    try:
        st, meta = _get(url, "/api/meta")
        assert st == 200 and list(meta["models"]) == ["ok"]
        assert "busy/baseline" in meta["problems"][0] and "incomplete" in meta["problems"][0]
        st, res = _get(url, "/api/norms?" + _q(model="busy", layer=REF_LAYER, images="0"))
        assert st == 409 and "incomplete" in res["error"]
        st, res = _get(url, "/api/norms?" + _q(model="ok", layer=REF_LAYER, images="0"))
        assert st == 200 and "odd coordinates" in res["labels_error"] and len(res["maps"]) == 1
        st, res = _post(url, "/api/labels", json.dumps({"model": "ok", "image": 0, "x": 2, "y": 2}).encode())
        assert st == 409 and "odd coordinates" in res["error"]
        assert np.load(tmp_path / "labels" / "ok.npy").tolist() == [[0, 3, 0]]  # left as it was
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_anomalies_rule_takes_the_labels_file(results, tmp_path):
    """Labels made in the explorer, named in ``anomalies.labels``, become the rule's ``user:`` rows."""
    from diffaudit.config import load_config
    from diffaudit.pipeline import anomalies

    root, _ = results
    labels = tmp_path / "{model}.npy"
    ex = Explorer(root, labels=str(labels))
    ex.toggle_label("m1", PLANT[0], PLANT[1], PLANT[2])
    ex.toggle_label("m1", 3, 0, 6)
    cfg = load_config(REPO / "params.yaml")
    cfg["anomalies"]["labels"] = ["auto", str(tmp_path / "m1.npy")]
    out = anomalies.run(cfg, "m1", [root / "m1" / "representations"], tmp_path / "table.csv")
    table = pd.read_csv(out)
    user = table[table["label_source"] == "user:m1.npy"]
    assert len(user) == len(SIZES) and (user["n_anomalies"] == 2).all()
    ref = user[user["layer"] == REF_LAYER].iloc[0]
    assert ref["rel_norm_mean"] > 2  # the planted patch is one of the two


# ---------------------------------------------------------------------------------------------- mitigations and
# correspondence on the harm pairs: a model whose features are content + a strong positional map P, so that without
# a mitigation a token's nearest neighbour on a flipped image is at its own position, and with the position mean
# subtracted it is the ground truth.

H_IMG, H_SIZE = 10, 64
H_LAYERS = {"down_blocks[0].resnets[0]": (16, 16), "mid_block.attentions[0]": (16, 6)}  # 6x6: shift not whole


def make_harm_results(root: Path) -> dict:
    """Model ``h`` (baseline with harm pairs: flip + shift of images 8 and 9; experiment ``e1`` without), the
    dataset (built by build_demo) and harm_pairs (built by build_pairs)."""
    from diffaudit.datasets import build_demo, load_index
    from diffaudit.harm.pairs import build_pairs, load_pairs

    build_demo(root / "dataset", n_images=H_IMG, size=H_SIZE)
    ids = load_index(root / "dataset")["id"].astype(str).tolist()
    build_pairs(root / "dataset", root / "harm_pairs", tasks=("flip", "shift"), images=[8, 9], shift=0.25)
    pairs, _ = load_pairs(root / "harm_pairs")
    harm_ids = load_index(root / "harm_pairs")["id"].astype(str).tolist()
    rng = np.random.default_rng(7)
    base, harm = {}, {}
    for layer, (c, h) in H_LAYERS.items():
        pos = 3.0 * rng.standard_normal((c, h, h))
        content = rng.standard_normal((H_IMG, c, h, h))
        b = content + pos
        if h == 16:  # the other layer has nothing for anomaly_inpaint and channel_mean to act on
            b[1, :, 2:4, 2:4] *= 12.0  # a high-norm 2x2 block: anomaly_inpaint acts on image 1
            b[:, 5, 0, 0] = 400.0  # an outlier channel in every image: channel_mean acts
        hm = rng.standard_normal((len(harm_ids), c, h, h)) + pos
        for _, p in pairs.iterrows():
            src = content[int(p["source_index"])] if p["source_store"] == "base" else None
            if p["task"] == "flip":
                hm[int(p["target_index"])] = src[:, :, ::-1] + pos
            else:  # shift: B(y, x) shows A(y + k, x + k), k whole tokens on the 16x16 grid
                k = int(p["shift_px"]) * h // H_SIZE
                a = int(p["source_index"])
                t = hm[int(p["target_index"])] - pos
                t[:, : h - k, : h - k] = (hm[a] - pos)[:, k:, k:]
                hm[int(p["target_index"])] = t + pos
        base[layer], harm[layer] = b.astype(np.float16), hm.astype(np.float16)
    for path, data, iids in ((root / "h" / "representations" / "full.zarr", base, ids),
                             (root / "h" / "harm" / "representations" / "full.zarr", harm, harm_ids),
                             (root / "h" / "experiments" / "e1" / "representations" / "full.zarr", base, ids)):
        w = StoreWriter(path, layers=list(H_LAYERS), image_ids=iids, labels=None, config={"t": "harm"},
                        attrs={"image_size": H_SIZE, "variant": "full"})
        w.write_batch(0, data)
        w.finalize()
    return {"base": {k: v.astype(np.float32) for k, v in base.items()},
            "harm": {k: v.astype(np.float32) for k, v in harm.items()}, "pairs": pairs}


@pytest.fixture(scope="module")
def harm_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer_harm") / "results"
    data = make_harm_results(root)
    ex = Explorer(root)
    srv, url = serve_in_thread(ex)
    yield root, ex, url, data
    srv.shutdown()
    srv.server_close()


def _fitted(root: Path, layer: str, name: str):
    from diffaudit.analyses.probe import image_split
    from diffaudit.harm.mitigations import fit_store_mitigations

    store = ReprStore(root / "h" / "representations" / "full.zarr")
    return fit_store_mitigations(store, layer, image_split(store.n_images)[0], [name])[name]


@pytest.mark.parametrize("name", ["none", "position_mean", "position_subspace", "anomaly_inpaint", "channel_mean",
                                  "all"])
def test_mitigated_maps_equal_mitigation_apply(harm_site, name):
    root, ex, url, data = harm_site
    layer = "down_blocks[0].resnets[0]"
    a = data["base"][layer]
    mit = _fitted(root, layer, name)
    for step in mit.steps:  # anomaly_inpaint counts what it replaced, fitting included: count these images only
        if hasattr(step, "replaced"):
            step.replaced = 0
    want = mit.apply(a[[0, 1]])
    st, res = _get(url, "/api/norms?" + _q(model="h", layer=layer, images="0,1", mitigation=name))
    assert st == 200, res
    for m, w in zip(res["maps"], want):
        assert np.allclose(decode(m["data"], (16, 16)), np.linalg.norm(w, axis=0), rtol=1e-4, atol=1e-3)
    if name != "none":  # the planted outlier channel / block / positions are there to act on: the maps change
        assert not np.allclose(decode(res["maps"][1]["data"], (16, 16)), np.linalg.norm(a[1], axis=0), atol=1e-2)
    info = res["mitigation"]
    assert info["name"] == name and info["active"]
    if name != "all":  # (in "all", channel_mean finds no outlier left once anomaly_inpaint replaced the block)
        assert "nothing to act on" not in info["acts_on"]
    if name in ("anomaly_inpaint", "all"):
        # blocks (0, 0) of both images (the outlier channel) and (2, 2) of image 1, counted per request
        assert mit.steps[0].replaced == 12 and "(12 over every map it was applied to" in info["acts_on"]
        assert info["acts_on"] == mit.acts_on
    st, res = _get(url, "/api/similarity?" + _q(model="h", layer=layer, ref=1, y=3, x=12, images="0,1",
                                                  metric="cosine", mitigation=name))
    assert st == 200, res
    for m, w in zip(res["maps"], want):
        assert np.allclose(decode(m["data"], (16, 16)), similarity(w, want[1][:, 3, 12], "cosine"), atol=1e-4)


def test_mitigation_fits_are_cached_and_bounded(tmp_path):
    root = tmp_path / "results"
    make_harm_results(root)
    ex = Explorer(root, fit_cache_bytes=20_000)  # about one 16x16x16 position-mean map
    layer = "down_blocks[0].resnets[0]"
    for _ in range(3):
        ex.norms("h", "baseline", layer, [0], "position_mean")
    assert ex.fits.fits == 1
    ex.norms("h", "baseline", layer, [0], "all")
    ex.norms("h", "baseline", layer, [0], "position_mean")  # pushed out by "all": fitted again
    assert ex.fits.fits == 3 and ex.fits._bytes <= 20_000 + 20_000


def test_nothing_to_act_on_is_said(harm_site):
    _, _, url, data = harm_site
    layer = "mid_block.attentions[0]"
    for name, text in (("anomaly_inpaint", "(0 over every map"), ("channel_mean", "nothing to act on")):
        st, res = _get(url, "/api/norms?" + _q(model="h", layer=layer, images="0,1", mitigation=name))
        assert st == 200 and res["mitigation"]["active"] is False and text in res["mitigation"]["acts_on"]
        assert np.allclose(decode(res["maps"][0]["data"], (6, 6)), np.linalg.norm(data["base"][layer][0], axis=0),
                           rtol=1e-4)


def test_pairs_endpoint_lists_both_images(harm_site):
    root, _, url, data = harm_site
    st, res = _get(url, "/api/pairs?" + _q(model="h"))
    assert st == 200, res
    assert [p["task"] for p in res["pairs"]] == ["flip", "flip", "shift", "shift"]
    flip = res["pairs"][0]
    assert flip["source_file"] == "dataset/images/000008.png" and flip["target_file"].startswith("harm_pairs/images/")
    for p in res["pairs"]:
        for f in (p["source_file"], p["target_file"]):
            assert _get(url, "/files/" + f)[0] == 200
    st, meta = _get(url, "/api/meta")
    assert meta["models"]["h"]["baseline"]["harm_pairs"] is True and meta["models"]["h"]["e1"]["harm_pairs"] is False
    assert meta["mitigations"] == ["none", "position_mean", "position_subspace", "anomaly_inpaint", "channel_mean",
                                   "all"]


@pytest.mark.parametrize("name", ["none", "position_mean", "all"])
@pytest.mark.parametrize("pair,layer", [(0, "down_blocks[0].resnets[0]"), (2, "down_blocks[0].resnets[0]"),
                                        (0, "mid_block.attentions[0]"), (3, "mid_block.attentions[0]")])
def test_correspondence_equals_nearest_tokens_and_ground_truth(harm_site, name, pair, layer):
    from diffaudit.harm.matching import nearest_tokens, tokens_of
    from diffaudit.harm.pairs import ground_truth

    root, _, url, data = harm_site
    row = data["pairs"].iloc[pair]
    c, h = H_LAYERS[layer]
    y, x = h - 2, h - 3  # valid for the shift pair on the 16x16 grid (y, x >= k)
    src = (data["base"] if row["source_store"] == "base" else data["harm"])[layer][int(row["source_index"])]
    tgt = data["harm"][layer][int(row["target_index"])]
    mit = _fitted(root, layer, name)
    s, t = mit.apply(src[None])[0], mit.apply(tgt[None])[0]
    want = int(nearest_tokens(tokens_of(s)[[y * h + x]], tokens_of(t))[0])
    target, valid, note = ground_truth(row, h, H_SIZE)
    st, res = _get(url, "/api/correspondence?" + _q(model="h", layer=layer, pair=pair, y=y, x=x, mitigation=name))
    assert st == 200, res
    assert res["match"] == [want // h, want % h] and res["token"] == [y, x] and res["height"] == h
    if valid[y * h + x]:
        assert res["truth"] == target[y * h + x].tolist() and res["truth_note"] == ""
    else:
        assert res["truth"] is None and res["truth_note"].startswith("no ground truth")
        assert note in res["truth_note"]
    assert np.allclose(decode(res["data"], (h, h)), similarity(t, s[:, y, x], "cosine"), atol=1e-4)


def test_correspondence_planted_position_is_removed_by_position_mean(harm_site):
    """Content + a strong positional map: unmitigated, the match follows the position; with the position mean
    subtracted, it follows the content to the ground truth (flip: column mirrored; shift: k tokens up-left)."""
    _, _, url, _ = harm_site
    layer = "down_blocks[0].resnets[0]"
    for pair, (y, x) in ((0, (5, 2)), (1, (9, 4)), (2, (10, 12)), (3, (9, 10))):  # truth away from the planted block
        _, none = _get(url, "/api/correspondence?" + _q(model="h", layer=layer, pair=pair, y=y, x=x))
        _, pm = _get(url, "/api/correspondence?" + _q(model="h", layer=layer, pair=pair, y=y, x=x,
                                                        mitigation="position_mean"))
        assert none["match"] == [y, x] and none["truth"] != [y, x]
        assert pm["match"] == pm["truth"] and pm["mitigation"]["name"] == "position_mean"


@pytest.mark.parametrize("query,code,text", [
    ({"layer": "down_blocks[0].resnets[0]", "pair": 0, "y": 1, "x": 1, "mitigation": "blur"}, 400, "unknown mitigation"),
    ({"layer": "down_blocks[0].resnets[0]", "pair": 4, "y": 1, "x": 1}, 400, "pair 4 out of range"),
    ({"layer": "down_blocks[0].resnets[0]", "pair": -1, "y": 1, "x": 1}, 400, "out of range"),
    ({"layer": "down_blocks[0].resnets[0]", "pair": "a", "y": 1, "x": 1}, 400, "integer"),
    ({"layer": "down_blocks[0].resnets[0]", "pair": 0, "y": 16, "x": 1}, 400, "outside the 16x16 map"),
    ({"layer": "mid_block.attentions[0]", "pair": 0, "y": 0, "x": 6}, 400, "outside the 6x6 map"),
    ({"layer": "down_blocks[0].resnets[0]", "pair": 0, "y": 1}, 400, "missing parameter 'x'"),
    ({"layer": "nope", "pair": 0, "y": 1, "x": 1}, 404, "layer"),
    ({"run": "e1", "layer": "down_blocks[0].resnets[0]", "pair": 0, "y": 1, "x": 1}, 404, "has no harm pairs"),
])
def test_correspondence_bad_input_is_one_line_4xx(harm_site, query, code, text):
    _, _, url, _ = harm_site
    st, res = _get(url, "/api/correspondence?" + _q(model="h", **query))
    assert st == code and text in res["error"] and "\n" not in res["error"] and list(res) == ["error"]


def test_mitigation_bad_input_and_runs_without_pairs(harm_site, server):
    _, _, url, _ = harm_site
    for path in ("/api/norms?" + _q(model="h", layer="down_blocks[0].resnets[0]", images="0", mitigation="x"),
                 "/api/similarity?" + _q(model="h", layer="down_blocks[0].resnets[0]", ref=0, y=0, x=0, images="0",
                                         mitigation="NONE")):
        st, res = _get(url, path)
        assert st == 400 and "unknown mitigation" in res["error"]
    st, res = _get(url, "/api/pairs?" + _q(model="h", run="e1"))
    assert st == 404 and "has no harm pairs" in res["error"]
    _, url2, _ = server  # a results directory without harm_pairs at all
    st, res = _get(url2, "/api/pairs?" + _q(model="m1"))
    assert st == 404 and "harm_pairs/pairs.csv not found" in res["error"]
