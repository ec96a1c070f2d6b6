"""Forward hooks on the backbone: one hooked pass that stops after the last layer it needs (:func:`hooked_pass`),
shape probes, and what a pass runs under (:func:`deterministic_cudnn`, :func:`no_tf32`, :func:`conv_padding`,
:func:`random_unet`)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .. import experiments


@contextmanager
def deterministic_cudnn():
    """cuDNN deterministic and without benchmark autotuning for the duration; the previous flags are restored
    afterwards (as the probe does). The flags only act on CUDA; elsewhere this is a no-op in effect."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@contextmanager
def no_tf32(enabled: bool = True):
    """TF32 off for CUDA matmuls and cuDNN convolutions for the duration (``enabled``: a float32 extraction, which
    must compute in float32, not in TF32's 10-bit mantissa); the previous flags are restored afterwards. The flags
    only act on CUDA (Ampere and later)."""
    if not enabled:
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def vae_encoder(vae) -> torch.nn.Module:
    """The part of a VAE the extraction runs: its encoder (the whole VAE where it has none by that name)."""
    return getattr(vae, "encoder", None) or vae


def _zero_padded_downsamplers(net: torch.nn.Module) -> list[torch.nn.Module]:
    """diffusers' ``Downsample2D`` modules of ``net`` built with ``padding=0``: they pad ``(0, 1, 0, 1)`` with zeros
    (``F.pad``) in front of their stride-2 convolution, which itself pads nothing (the SD VAE encoder's three)."""
    return [m for m in net.modules() if type(m).__name__ == "Downsample2D" and getattr(m, "use_conv", False)
            and getattr(m, "padding", None) == 0 and isinstance(getattr(m, "conv", None), torch.nn.Conv2d)]


def padded_convs(net: torch.nn.Module) -> int:
    """How many ``Conv2d`` of ``net`` pad their input, their own padding or a ``Downsample2D``'s zero pad in front:
    what ``padding_mode`` acts on (a DiT's patch convolution, kernel = stride = patch, pads nothing; FLUX has no
    convolution at all)."""
    def pads(m: torch.nn.Conv2d) -> bool:
        return m.padding != "valid" if isinstance(m.padding, str) else any(m.padding)

    own = sum(1 for m in net.modules() if isinstance(m, torch.nn.Conv2d) and pads(m))
    return own + len(_zero_padded_downsamplers(net))


def _repad(mode: str):
    """A forward pre-hook for a ``Downsample2D``'s convolution: its input arrives padded ``(0, 1, 0, 1)`` with zeros;
    the hook removes that row and column and pads them again with ``mode``."""
    def hook(_module, args):
        x = args[0][:, :, :-1, :-1]
        return (F.pad(x, (0, 1, 0, 1), mode=mode), *args[1:])
    return hook


@contextmanager
def conv_padding(unet, mode: str):
    """Every ``Conv2d`` of ``unet`` pads with ``mode`` (zeros | reflect | replicate | circular) for the duration;
    the padding widths, and so every shape, stay as they are. diffusers' ``Downsample2D`` with ``padding=0`` (the
    SD VAE encoder's downsamplers) pads ``(0, 1, 0, 1)`` with zeros before its convolution: that pad takes ``mode``
    too. ``zeros`` changes nothing."""
    if mode == "zeros":
        yield
        return
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    saved = [m.padding_mode for m in convs]
    handles = []
    try:
        for m in convs:
            if isinstance(m.padding, str):
                raise ValueError(f"padding_mode {mode!r}: a Conv2d with padding={m.padding!r} cannot change mode")
            m.padding_mode = mode
        for m in _zero_padded_downsamplers(unet):
            handles.append(m.conv.register_forward_pre_hook(_repad(mode)))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, s in zip(convs, saved):
            m.padding_mode = s



def random_unet(unet):
    """The same architecture (the model's own config) with weights re-initialised from
    :data:`diffaudit.experiments.RANDOM_WEIGHTS_SEED`, on the model's device and dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(experiments.RANDOM_WEIGHTS_SEED)
        fresh = type(unet).from_config(unet.config)
    return fresh.to(device=unet.device, dtype=unet.dtype).eval()


class _StopForward(BaseException):
    """Raised by the forward hook of the last layer a pass needs, caught by :func:`hooked_pass` (a BaseException, so
    that no ``except Exception`` on the way can swallow it)."""


def hooked_pass(unet, modules: dict, wanted: Sequence[str], on_output: Callable[[str, torch.Tensor], None],
                runs: dict[str, int] | None, *args, select: Callable | None = None, **kwargs) -> dict[str, int] | None:
    """``unet(*args, **kwargs)`` with a forward hook on each of ``modules`` (``{name: module}``) that calls
    ``on_output(name, output)`` for the names in ``wanted`` (the first element of a tuple output, or what
    ``select(name, output)`` makes of the raw output: a transformer block's image tokens as a map).

    With ``runs`` (``{name: times the module runs in a complete pass}``, e.g. what an earlier call returned) saying that
    each wanted module runs exactly once, the pass stops right after the last of them has run: nothing the U-Net
    computes afterwards can change what was captured, so the outputs are exactly those of a complete pass.
    Returns ``{name: times run}`` for ``modules`` after a complete pass, ``None`` after a stopped one. The hooks are
    removed whatever happens.
    """
    wanted_set = set(wanted)
    left = set(wanted_set)
    stop = runs is not None and bool(left) and all(runs.get(name) == 1 for name in left)
    counts = dict.fromkeys(modules, 0)

    def make_hook(name):
        def hook(_module, _inputs, output):
            counts[name] += 1
            if name not in wanted_set:
                return
            if select is not None:
                on_output(name, select(name, output))
            else:
                on_output(name, output[0] if isinstance(output, tuple) else output)
            left.discard(name)
            if stop and not left:
                raise _StopForward
        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        try:
            unet(*args, **kwargs)
        except _StopForward:
            return None
    finally:
        for h in handles:
            h.remove()
    return counts


def probe_shapes(unet, modules: dict, latent: torch.Tensor, timestep, encoder_hidden_states):
    """``{name: (C, H, W)}`` of the outputs of ``modules`` in one U-Net pass on ``latent`` (any device, also
    ``meta``); nothing is copied."""
    shapes: dict[str, tuple[int, int, int]] = {}

    def record(name, out):
        shapes[name] = tuple(int(d) for d in out.shape[1:])

    with torch.no_grad():
        hooked_pass(unet, modules, list(modules), record, None, latent, timestep,
                    encoder_hidden_states=encoder_hidden_states)
    return {name: shapes[name] for name in modules}

