"""How much of the image the U-Net input carries: the VAE posterior's spread against the spread of its mean over images.

    python benchmarks/vae_signal.py [--model mini] [--images demo] [--n-images 8] [--size 256] [--timestep 50]
                                    [--json out.json]

``--model``: an embedded model's name (built into a temporary directory exactly as the workflow's ``build_mini``
rule builds it) or a diffusers directory (``save_pretrained``). ``--images``: ``demo`` (the demo source's first
``--n-images`` pictures, built into a temporary directory) or a folder of images (the first ``--n-images``, centre
cropped and resized to ``--size`` as the ``folder`` source does). The model is loaded through the workflow's own
loader on the CPU (float32) and the images are encoded as the paper-mode extraction does it ([0, 1] pixels).

Measured on the latent grid (channels x h x w, every element of every image):

* ``posterior_std``: the VAE posterior's standard deviation, RMS over all elements and images (``exp(logvar / 2)``);
* ``mean_std``: the standard deviation over images of the posterior mean, RMS over the elements (what differs from
  image to image; a constant offset common to every image is not counted);
* ``mean_abs``: the RMS of the posterior mean itself (offset included);

each also after the VAE's ``scaling_factor`` (``*_scaled``, the latent space the U-Net sees). At ``--timestep`` t,
with the DDIM schedule the extraction noises with (rebuilt from the model's scheduler config):
``signal = sqrt(alpha_bar) * mean_std_scaled``, ``posterior_noise = sqrt(alpha_bar) * posterior_std_scaled`` and
``forward_noise = sqrt(1 - alpha_bar)`` (unit-variance noise). A trained VAE has ``posterior_std`` far below
``mean_std``; the embedded ``mini`` (random weights) has it the other way round: its U-Net mostly sees noise.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def _images(spec: str, n: int, size: int, tmp: Path):
    from diffaudit.datasets.demo import build_demo
    from diffaudit.datasets.folder import build_folder
    from diffaudit.datasets.format import load_index
    from diffaudit.datasets.images import load_images

    if spec == "demo":
        ds = build_demo(tmp / "images", n_images=n, size=size)
    else:
        ds = build_folder(spec, tmp / "images", n_images=n, size=size)
    return load_images(ds, load_index(ds))


def _model_dir(model: str, tmp: Path) -> Path:
    from diffaudit.models import EMBEDDED_MODELS, save_embedded_model

    if model in EMBEDDED_MODELS:
        return save_embedded_model(model, tmp / model)
    if not (Path(model) / "model_index.json").is_file():
        sys.exit(f"--model: {model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a diffusers "
                 "directory")
    return Path(model)


@torch.no_grad()
def measure(model_dir: Path, images, timestep: int) -> dict:
    from diffusers import DDIMScheduler

    from diffaudit.models import ModelSpec, load_pipeline

    pipe = load_pipeline(ModelSpec("model", str(model_dir)), device="cpu", dtype=torch.float32)
    vae = pipe.vae
    x = torch.tensor(np.stack([np.asarray(im.convert("RGB")) for im in images]), dtype=torch.float32)
    x = x.permute(0, 3, 1, 2) / 255.0  # paper mode: [0, 1] pixels
    dist = vae.encode(x).latent_dist
    mean, std = dist.mean.double(), dist.std.double()
    scale = float(vae.config.scaling_factor)
    shift = float(vae.config.get("shift_factor") or 0.0)  # the flow models shift before scaling: not a spread
    post = math.sqrt(float((std ** 2).mean()))
    spread = math.sqrt(float(mean.var(dim=0, unbiased=False).mean()))
    level = math.sqrt(float(((mean - shift) ** 2).mean()))
    ab = float(DDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[timestep])
    out = {"model": str(model_dir), "n_images": len(images), "size": images[0].size[0],
           "latent_shape": list(mean.shape[1:]), "scaling_factor": scale, "timestep": timestep,
           "alpha_bar": ab, "posterior_std": post, "mean_std": spread, "mean_abs": level,
           "posterior_std_scaled": post * scale, "mean_std_scaled": spread * scale, "mean_abs_scaled": level * scale,
           "signal": math.sqrt(ab) * spread * scale, "posterior_noise": math.sqrt(ab) * post * scale,
           "forward_noise": math.sqrt(1.0 - ab)}
    out["signal_share"] = out["signal"] / math.sqrt(out["signal"] ** 2 + out["posterior_noise"] ** 2
                                                    + out["forward_noise"] ** 2)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mini", help="an embedded model's name or a diffusers directory")
    p.add_argument("--images", default="demo", help="demo, or a folder of images")
    p.add_argument("--n-images", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="resolution in pixels")
    p.add_argument("--timestep", type=int, default=50)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = _images(a.images, a.n_images, a.size, tmp)
        res = measure(_model_dir(a.model, tmp), images, a.timestep)
    res["model"] = a.model
    print(f"{a.model}: {res['n_images']} images at {res['size']} px, latents {res['latent_shape']}, "
          f"scaling_factor {res['scaling_factor']:g}")
    print(f"  posterior std {res['posterior_std']:.4f}  (scaled {res['posterior_std_scaled']:.4f})")
    print(f"  std over images of the posterior mean {res['mean_std']:.3f}  (scaled {res['mean_std_scaled']:.3f});"
          f" RMS of the mean {res['mean_abs']:.3f}  (scaled {res['mean_abs_scaled']:.3f})")
    print(f"  at t={a.timestep} (alpha_bar {res['alpha_bar']:.4f}): image signal {res['signal']:.3f}, posterior "
          f"noise {res['posterior_noise']:.3f}, forward noise {res['forward_noise']:.3f}  (signal share of the input's"
          f" spread {res['signal_share']:.2f})")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
