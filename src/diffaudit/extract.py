"""Extraction of U-Net representations: one U-Net pass per batch, forward hooks on all layers.

Two fidelity modes (see ``DESIGN.md``):

``paper``
    Exactly what ``sdhelper==1.0.0``'s ``img2repr(images, layers, step=50, seed=42)`` does: pixels /255
    into the VAE ([0, 1]), a VAE posterior *sample*, ``torch.manual_seed(seed)`` at every batch, one noise
    tensor shared by every image of a batch, DDIM ``add_noise`` at ``t``, the pipeline scheduler's
    ``scale_model_input``, the empty prompt, fp16 on CUDA / fp32 on CPU, batch size 20.
``corrected``
    [-1, 1] pixels, posterior mean, independent noise per image drawn from a CPU generator seeded by
    (seed, image index) so it does not depend on batch size or device, no ``scale_model_input`` (the
    latents are VP-noised; Euler's sigma scaling does not apply), and crop-consistent noise for the
    cropped variants (the crop of the full image's noise).

Variants: ``full`` (all layers on the full images) and one ``crop<t>`` per token size ``t`` present in
the chosen layers (images cropped by one token ring, keeping only the layers of that resolution), as the
corner/border control needs.
"""
from __future__ import annotations

import logging
import queue
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .layers import resolve_layers
from .store import StoreWriter, store_path

log = logging.getLogger(__name__)

MODES = ("paper", "corrected")


@dataclass(frozen=True)
class ExtractionSettings:
    mode: str = "paper"
    timestep: int = 50
    seed: int = 42
    batch_size: int = 20
    prompt: str = ""
    precision: str = "auto"  # auto = fp16 on CUDA, fp32 on CPU (the paper's rule)
    store_dtype: str = "float16"
    crops: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"extraction mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= int(self.timestep) <= 999:
            raise ValueError(f"timestep must be in [0, 999], got {self.timestep}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def crop_image(img, token_px: int):
    """Remove exactly one token ring: ``img.crop((t, t, S - t, S - t))``."""
    w, h = img.size
    return img.crop((token_px, token_px, w - token_px, h - token_px))


class Extractor:
    """Runs the U-Net on batches of PIL images and returns the hooked representations."""

    def __init__(self, pipe, layers: Sequence[str], settings: ExtractionSettings):
        from diffusers import DDIMScheduler

        self.pipe = pipe
        self.settings = settings
        self.layers = list(layers)
        self.modules = resolve_layers(pipe.unet, self.layers)
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        # sdhelper noises with a DDIM scheduler rebuilt from the model's scheduler config, for every model.
        self.ddim = DDIMScheduler.from_config(pipe.scheduler.config)
        self._prompt_cache: dict[int, torch.Tensor] = {}
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

    # -- pieces ----------------------------------------------------------------------------------
    def prompt_embeds(self, batch: int) -> torch.Tensor:
        if batch not in self._prompt_cache:
            emb, *_ = self.pipe.encode_prompt(prompt=[self.settings.prompt] * batch, device=self.device,
                                              num_images_per_prompt=1, do_classifier_free_guidance=False)
            self._prompt_cache[batch] = emb
        return self._prompt_cache[batch]

    def _pixels(self, images) -> torch.Tensor:
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise ValueError(f"all images of a batch must have the same size, got {sorted(sizes)}")
        x = torch.tensor(np.array([np.asarray(im.convert("RGB")) for im in images]), dtype=torch.float32,
                         device=self.device).permute(0, 3, 1, 2) / 255.0
        if self.settings.mode == "corrected":
            x = 2.0 * x - 1.0
        return x

    def corrected_noise(self, image_indices: Sequence[int], full_latent_hw: tuple[int, int],
                        crop_latent_px: int = 0) -> torch.Tensor:
        """Per-image noise from a CPU generator seeded by (seed, image index); cropped like the image."""
        h, w = full_latent_hw
        out = []
        for idx in image_indices:
            g = torch.Generator("cpu").manual_seed(int(self.settings.seed) * 1_000_003 + int(idx))
            eps = torch.randn((4, h, w), generator=g, dtype=torch.float32)
            if crop_latent_px:
                k = crop_latent_px
                eps = eps[:, k:h - k, k:w - k]
            out.append(eps)
        return torch.stack(out).to(self.device, self.dtype)

    @torch.no_grad()
    def latents(self, images, image_indices: Sequence[int], crop_px: int = 0, full_size: int | None = None):
        vae = self.pipe.vae
        x = self._pixels(images)
        t = torch.tensor(int(self.settings.timestep), dtype=torch.long, device=self.device)
        sf = vae.config.scaling_factor
        if self.settings.mode == "paper":
            torch.manual_seed(int(self.settings.seed))
            lat = vae.encode(x.to(dtype=vae.dtype)).latent_dist.sample().to(dtype=self.dtype) * sf
            noise = torch.randn_like(lat[None, 0]).expand(lat.shape)
            lat = self.ddim.add_noise(lat, noise, t)
            lat = self.pipe.scheduler.scale_model_input(lat, t)
        else:
            lat = vae.encode(x.to(dtype=vae.dtype)).latent_dist.mean.to(dtype=self.dtype) * sf
            factor = x.shape[-1] // lat.shape[-1]
            full = (full_size or x.shape[-1]) // factor
            if crop_px % factor:
                raise ValueError(f"crop of {crop_px}px is not a whole number of latent pixels ({factor}px)")
            noise = self.corrected_noise(image_indices, (full, full), crop_px // factor)
            lat = self.ddim.add_noise(lat, noise, t)
        return lat, t

    @torch.no_grad()
    def run_batch(self, images, image_indices: Sequence[int], layers: Sequence[str] | None = None,
                  crop_px: int = 0, full_size: int | None = None, out_dtype=None) -> dict[str, torch.Tensor]:
        """Representations ``{layer: (B, C, H, W)}`` on the CPU for one batch of images."""
        layers = self.layers if layers is None else list(layers)
        captured: dict[str, torch.Tensor] = {}

        def make_hook(name):
            def hook(_module, _inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                captured[name] = out.detach().to("cpu", dtype=out_dtype or out.dtype)
            return hook

        lat, t = self.latents(images, image_indices, crop_px=crop_px, full_size=full_size)
        emb = self.prompt_embeds(len(images))
        handles = [self.modules[name].register_forward_hook(make_hook(name)) for name in layers]
        try:
            self.pipe.unet(lat, t, encoder_hidden_states=emb)
        finally:
            for h in handles:
                h.remove()
        return {name: captured[name] for name in layers}


# ---------------------------------------------------------------------------------------------
# Driving a whole dataset into stores
# ---------------------------------------------------------------------------------------------

def token_sizes(shapes: dict[str, tuple[int, int, int]], image_size: int) -> dict[int, list[str]]:
    """Group layers by token size in pixels (``image_size // H``).

    Layers without whole-pixel square tokens, or too small for the corner/border/other groups after removing
    one ring (``H - 2 < 3``), get no cropped variant.
    """
    groups: dict[int, list[str]] = {}
    for layer, (_, h, w) in shapes.items():
        if h != w or image_size % h or h < 5:
            log.warning("layer %s (%dx%d): no cropped variant (tokens not whole pixels, or the map is too small "
                        "for corner/border/other groups)", layer, h, w)
            continue
        groups.setdefault(image_size // h, []).append(layer)
    return dict(sorted(groups.items()))


class _BackgroundWriter:
    """Writes batches on a thread so the U-Net can run meanwhile; at most one batch is queued."""

    def __init__(self, writer: StoreWriter):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.write_batch(*item)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    self.error = exc

    def put(self, start: int, batch: dict[str, np.ndarray]):
        if self.error:
            raise self.error
        self.q.put((start, batch))

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def extract_variant(extractor: Extractor, path: Path, *, images_fn: Callable[[int, int], list],
                    image_ids: Sequence[str], labels: Sequence[int] | None, layers: Sequence[str],
                    layer_indices: Sequence[int], config: dict, attrs: dict, crop_px: int = 0,
                    full_size: int | None = None, progress: bool = True, desc: str = "",
                    stop_after: int | None = None, index_offset: int = 0) -> StoreWriter:
    """Extract one variant into the store at ``path`` (resuming from its last complete batch).

    ``index_offset`` is the dataset index of the first image (for shards): corrected-mode noise is seeded by it.
    """
    from tqdm.auto import tqdm

    s = extractor.settings
    writer = StoreWriter(path, layers=layers, image_ids=image_ids, labels=labels, config=config, attrs=attrs,
                         shard_images=s.batch_size, dtype=s.store_dtype, layer_indices=layer_indices)
    n = len(image_ids)
    if writer.complete:
        return writer
    start0 = writer.n_complete
    bar = tqdm(total=n, initial=start0, unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    bg = _BackgroundWriter(writer)
    done_batches = 0
    try:
        for start in range(start0, n, s.batch_size):
            stop = min(start + s.batch_size, n)
            imgs = images_fn(start, stop)
            if crop_px:
                imgs = [crop_image(im, crop_px) for im in imgs]
            reps = extractor.run_batch(imgs, range(index_offset + start, index_offset + stop), layers=layers,
                                       crop_px=crop_px,
                                       full_size=full_size)
            bg.put(start, {k: v.numpy() for k, v in reps.items()})
            bar.update(stop - start)
            done_batches += 1
            if stop_after is not None and done_batches >= stop_after:
                break
    finally:
        bg.close()
        bar.close()
    if writer.n_complete == n:
        writer.finalize()
    return writer


def run_extraction(pipe, *, dataset_images: Callable[[int, int], list], image_ids: Sequence[str],
                   labels: Sequence[int] | None, layers: Sequence[str], settings: ExtractionSettings,
                   out_dir: str | Path, provenance: dict, image_size: int = 512, progress: bool = True,
                   stop_after: int | None = None, index_offset: int = 0) -> Path:
    """Extract the ``full`` variant and every ``crop<t>`` variant into ``out_dir``.

    Work happens in ``<out_dir>.partial``; it is renamed to ``out_dir`` only when every store is complete,
    so a directory at ``out_dir`` is always complete. Re-running after an interruption resumes.
    """
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    extractor = Extractor(pipe, layers, settings)
    base_config = {**provenance, **asdict(settings), "device": extractor.device.type,
                   "compute_dtype": str(extractor.dtype).replace("torch.", ""), "image_size": image_size}
    paper = settings.mode == "paper"
    attrs = {**base_config, "library_versions": library_versions(),
             "pixel_range": "[0, 1] (x/255)" if paper else "[-1, 1]",
             "latent": "VAE posterior sample" if paper else "VAE posterior mean",
             "noise": ("one tensor shared by a batch, torch.manual_seed(seed) per batch" if paper
                       else "independent per image, CPU generator seeded by seed*1000003+image_index"),
             "scale_model_input": paper}
    layer_indices = list(range(len(layers)))
    name = provenance.get("model", "")
    full = extract_variant(extractor, store_path(work, "full"), images_fn=dataset_images, image_ids=image_ids,
                           labels=labels, layers=layers, layer_indices=layer_indices,
                           config={**base_config, "variant": "full"}, attrs={**attrs, "variant": "full"},
                           progress=progress, desc=f"{name} full", stop_after=stop_after,
                           index_offset=index_offset)
    if not full.complete:
        return work
    if settings.crops:
        from .store import ReprStore

        store = ReprStore(full.path)
        shapes = {layer: store.shape(layer)[1:] for layer in layers}
        for tpx, group in token_sizes(shapes, image_size).items():
            variant = f"crop{tpx}"
            idx = [layers.index(layer) for layer in group]
            w = extract_variant(extractor, store_path(work, variant), images_fn=dataset_images,
                                image_ids=image_ids, labels=labels, layers=group, layer_indices=idx,
                                config={**base_config, "variant": variant, "crop_px": tpx},
                                attrs={**attrs, "variant": variant, "crop_px": tpx}, crop_px=tpx,
                                full_size=image_size, progress=progress, desc=f"{name} {variant}",
                                stop_after=stop_after, index_offset=index_offset)
            if not w.complete:
                return work
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)
    return out_dir


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "numpy", "zarr", "xarray", "diffaudit"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
