import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory) -> Path:
    """The embedded mini model, built exactly as the workflow's build_mini rule does."""
    from diffaudit.families.sd import save_mini_model

    return save_mini_model(tmp_path_factory.mktemp("models") / "mini")


@pytest.fixture(scope="session")
def mini_pipe(mini_dir):
    from diffaudit.models import ModelSpec, load_pipeline

    return load_pipeline(ModelSpec("mini", str(mini_dir)), device="cpu")


def random_images(n: int, size: int, seed: int = 0):
    """Smooth random RGB images (so the VAE sees structure, not only pixel noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        noise = rng.integers(-20, 21, size=(size, size, 3))
        out.append(Image.fromarray(np.clip(np.asarray(img, dtype=int) + noise, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture
def image_folder(tmp_path):
    def make(n: int, size: int = 512, seed: int = 0) -> Path:
        d = tmp_path / f"images_{n}_{size}_{seed}"
        d.mkdir()
        for i, im in enumerate(random_images(n, size, seed)):
            im.save(d / f"img_{i:03d}.png")
        return d
    return make


def extract_batched(extractor, images, batch_size: int) -> dict:
    """``extractor.run_batch`` over ``images`` in batches of ``batch_size``: layer -> (image, C, h, w) tensor."""
    import torch

    out = {}
    for s in range(0, len(images), batch_size):
        reps = extractor.run_batch(images[s:s + batch_size], range(s, min(s + batch_size, len(images))))
        for k, v in reps.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def assert_equals_sdhelper(ours: dict, ref: list, layers, what: str = "") -> None:
    """Our extraction (layer -> (image, C, h, w)) equals sdhelper's img2repr output (one dict per image) within
    1e-5 x max|value| per layer."""
    import torch

    for layer in layers:
        r = torch.stack([x[layer].squeeze(0) for x in ref]).float()
        o = ours[layer].float()
        assert o.shape == r.shape, (what, layer)
        tol = 1e-5 * float(r.abs().max())
        assert float((o - r).abs().max()) <= tol, (what, layer)


def shared_reference() -> Path:
    """The read-only published reference files beside the checkout (``../shared/reference``), if present."""
    return Path(os.environ.get("DIFFAUDIT_SHARED_REFERENCE", REPO.parent / "shared" / "reference"))


def copy_repo(dst: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and not ignored), without outputs, at ``dst``."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.splitlines()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


def kill_mid_extraction(cmd: list[str], cwd: Path, env: dict, partial_store: Path, after_images: int,
                        timeout: float = 600) -> int:
    """Start ``cmd`` in its own process group and ``kill -9`` the whole group as soon as the partial store
    ``partial_store`` (``.../representations.partial/full.zarr``) records ``after_images`` complete images.
    Returns the number of complete images the store recorded at the kill."""
    import signal
    import subprocess
    import time

    import zarr

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline, n = time.time() + timeout, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            n = zarr.open_group(str(partial_store), mode="r").attrs.get("n_complete", 0)
        except Exception:  # noqa: BLE001 - not created yet
            n = 0
        if n >= after_images:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return n
