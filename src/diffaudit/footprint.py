"""The footprint of an extraction per model before it runs: disk (exact), GPU and host memory, GPU time.

Computed on PyTorch's ``meta`` device from each model's architecture (no weights, no download, no GPU), with the
extraction's own shape and byte functions (:func:`diffaudit.extract.plan_variants`, :func:`~diffaudit.extract.
store_nbytes`). ``diffaudit footprint`` prints :func:`footprint_table`; docs/footprint.md explains every number.
Kept apart from :mod:`diffaudit.extract`, so that the extraction stage does not depend on this estimate's code.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from .extract import human_bytes, plan_variants, probe_shapes, store_nbytes
from .layers import resolve_layers
from .layout import FULL

#: Assumptions of the time estimate (see docs/footprint.md): sustained fp16 throughput of the U-Net/VAE
#: kernels in eager PyTorch on an H100/H200-class GPU, pageable device-to-host copies (the hooks' ``.to("cpu")``
#: is synchronous), sequential write speed of the results disk, and loading the pipeline from the local HF cache.
ASSUMED_TFLOPS = 200.0
ASSUMED_D2H_GBPS = 10.0
ASSUMED_DISK_GBPS = 1.0
ASSUMED_LOAD_S = 30.0
#: Resident memory of the extraction process before the model is loaded (python, torch, diffusers,
#: transformers, zarr: 0.53 GB measured with the CPU build) plus the CUDA runtime, cuBLAS and cuDNN (~1.5 GB).
ASSUMED_HOST_BASE_BYTES = int(2.0e9)
#: CUDA context and allocator slack on the GPU beyond weights and live tensors.
ASSUMED_GPU_OVERHEAD_BYTES = int(1.0e9)
#: Largest head dimension of the fused (flash / memory-efficient) attention kernels; wider heads (the VAE's
#: single 512-wide head) are counted as the math path that materialises the attention matrix.
FUSED_ATTENTION_MAX_HEAD_DIM = 256


class _LiveBytes:
    """Peak bytes of live tensor storages created inside the context (a dispatch mode; works on ``meta``)."""

    def __new__(cls):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live = self.peak = 0
                self.keys: set[int] = set()

            def _free(self, key, n):
                self.keys.discard(key)
                self.live -= n

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        key = st._cdata
                        if key not in self.keys:
                            n = int(st.nbytes())
                            self.keys.add(key)
                            self.live += n
                            self.peak = max(self.peak, self.live)
                            weakref.finalize(st, self._free, key, n)
                return out

        return Mode()


@contextmanager
def _fused_attention_model():
    """``scaled_dot_product_attention`` as a fused kernel allocates it: the output only (O(tokens) memory)."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention

    def fused(q, k, v, *args, **kwargs):
        if q.shape[-1] > FUSED_ATTENTION_MAX_HEAD_DIM:
            return sdpa(q, k, v, *args, **kwargs)
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def _meta_models(arch: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .families.common import diffusers_errors_only
    from .families.sd import ARCHITECTURES, CLIP_VOCAB_SIZE

    unet_cfg, vae_cfg, text_cfg = ARCHITECTURES[arch]
    with diffusers_errors_only(), torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg).to(dtype).eval()
        vae = AutoencoderKL(**vae_cfg).to(dtype).eval()
        text = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, **text_cfg)).to(dtype).eval()
    return unet, vae, text


def model_footprint(model: str = "sd15", *, n_images: int = 500, image_size: int = 512,
                    layers: Sequence[str] | None = None, batch_size: int = 20, store_dtype: str = "float16",
                    crops: bool = True, timestep: int = 50) -> dict:
    """Disk, GPU memory, host memory and estimated GPU time of extracting ``model`` (a key of
    :data:`diffaudit.families.sd.MODEL_ARCHITECTURES`) as the workflow does, from the architecture on the ``meta``
    device.

    Exact: layer shapes, store bytes, parameter counts, FLOPs. Modelled: live activation bytes (fused attention
    kernels allocate only their output), host memory and time (the ``ASSUMED_*`` constants above).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .families.sd import MODEL_ARCHITECTURES, PAPER_LAYERS

    layers = list(PAPER_LAYERS if layers is None else layers)
    dtype = torch.float16
    unet, vae, text = _meta_models(MODEL_ARCHITECTURES[model], dtype)
    modules = resolve_layers(unet, layers)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    t = torch.tensor(int(timestep), dtype=torch.long)
    ctx = unet.config.cross_attention_dim

    def emb(b):
        return torch.zeros((b, 77, ctx), device="meta", dtype=dtype)

    def latent(b, px):
        return torch.zeros((b, unet.config.in_channels, px // factor, px // factor), device="meta", dtype=dtype)

    def shape_fn(px, names):
        return probe_shapes(unet, {n: modules[n] for n in names}, latent(1, px), t, emb(1))

    plan = plan_variants(shape_fn, layers, image_size, crops)
    disk = {v.name: store_nbytes(v.shapes, n_images, store_dtype, batch_size) for v in plan}
    data = {v.name: n_images * np.dtype(store_dtype).itemsize * sum(int(np.prod(s)) for s in v.shapes.values())
            for v in plan}

    def nparams(m):
        return sum(p.numel() for p in m.parameters())

    params = {"unet": nparams(unet), "vae": nparams(vae), "text_encoder": nparams(text)}
    weights = sum(params.values()) * torch.finfo(dtype).bits // 8

    # live activations of one full-size batch: VAE encode (+ posterior sample), then the hooked U-Net pass
    b = min(int(batch_size), int(n_images))
    with torch.no_grad(), _fused_attention_model():
        x = torch.zeros((b, 3, image_size, image_size), device="meta", dtype=dtype)
        with _LiveBytes() as vae_mem:
            vae.encode(x).latent_dist.sample()
        with _LiveBytes() as unet_mem:
            probe_shapes(unet, modules, latent(b, image_size), t, emb(b))
    act = max(vae_mem.peak, unet_mem.peak) + x.numel() * 2 + latent(b, image_size).numel() * 2

    # FLOPs of every image pass: VAE encode and U-Net, per variant (crops run on the smaller cropped images)
    flops = 0
    with torch.no_grad():
        for v in plan:
            px = image_size - 2 * v.crop_px
            with FlopCounterMode(display=False) as fc:
                vae.encode(torch.zeros((1, 3, px, px), device="meta", dtype=dtype)).latent_dist.sample()
                unet(latent(1, px), t, encoder_hidden_states=emb(1))
            flops += n_images * fc.get_total_flops()
    batch_host = b * data[FULL] // n_images
    compute_s = flops / (ASSUMED_TFLOPS * 1e12)
    d2h_s = sum(data.values()) / (ASSUMED_D2H_GBPS * 1e9)
    disk_s = sum(disk.values()) / (ASSUMED_DISK_GBPS * 1e9)
    return {
        "model": model, "architecture": MODEL_ARCHITECTURES[model], "n_images": n_images, "n_layers": len(layers),
        "image_size": image_size, "store_dtype": store_dtype, "batch_size": b,
        "disk_bytes": disk, "disk_total_bytes": sum(disk.values()),
        "params": params, "gpu_weights_bytes": weights, "gpu_activation_bytes": act,
        "gpu_activation_vae_bytes": vae_mem.peak, "gpu_activation_unet_bytes": unet_mem.peak,
        "gpu_total_bytes": weights + act + ASSUMED_GPU_OVERHEAD_BYTES,
        # loading: the fp16 weights on the host before .to(cuda); then up to 3 batches of representations
        # (captured by the hooks, queued, being written) plus zarr's encode buffer of one shard
        "host_batch_bytes": batch_host,
        "host_peak_bytes": ASSUMED_HOST_BASE_BYTES + max(weights, 4 * batch_host),
        "flops": flops, "gpu_compute_s": compute_s, "d2h_s": d2h_s, "disk_write_s": disk_s,
        # the U-Net waits for the hooks' copies; the writer thread overlaps the disk with the next batches
        "wall_s": ASSUMED_LOAD_S + max(compute_s + d2h_s, disk_s),
    }


def footprint_table(models: Sequence[str] = ("sd15", "sd21", "sdturbo"), **kwargs) -> str:
    """The paper run's footprint per model as a Markdown table (``diffaudit footprint``)."""
    rows = [model_footprint(m, **kwargs) for m in models]
    r0 = rows[0]
    variants = list(r0["disk_bytes"])
    head = (["model", *[f"disk {v}" for v in variants], "disk total", "GPU weights fp16", "GPU activations",
             "GPU total", "host RAM peak", "TFLOP", "GPU compute", "est. wall"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], *[human_bytes(r["disk_bytes"][v]) for v in variants], human_bytes(r["disk_total_bytes"]),
                 human_bytes(r["gpu_weights_bytes"]), human_bytes(r["gpu_activation_bytes"]), human_bytes(r["gpu_total_bytes"]),
                 human_bytes(r["host_peak_bytes"]), f"{r['flops'] / 1e12:,.0f}", f"{r['gpu_compute_s']:.0f} s",
                 f"{r['wall_s'] / 60:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    params = "; ".join(f"{r['model']}: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in r["params"].items())
                       for r in rows)
    notes = [
        "",
        f"{r0['n_images']} images at {r0['image_size']} px, {r0['n_layers']} layers, {r0['store_dtype']} stores, "
        f"batch {r0['batch_size']}; disk in GB = 1e9 bytes.",
        f"Parameters: {params}.",
        f"Assumptions: {ASSUMED_TFLOPS:.0f} TFLOP/s sustained fp16, {ASSUMED_D2H_GBPS:.0f} GB/s device-to-host, "
        f"{ASSUMED_DISK_GBPS:.0f} GB/s disk, {ASSUMED_LOAD_S:.0f} s model load, "
        f"{ASSUMED_HOST_BASE_BYTES / 1e9:.1f} GB host base, {ASSUMED_GPU_OVERHEAD_BYTES / 1e9:.1f} GB CUDA overhead.",
    ]
    return "\n".join(lines + notes)

