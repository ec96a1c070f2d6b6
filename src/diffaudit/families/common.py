"""What the families' embedded models share: quiet library loading, the project's CLIP tokenizer, atomic saving.

:func:`quiet_libraries` and :func:`diffusers_errors_only` silence diffusers/transformers noise (also used by the
loader in :mod:`diffaudit.models`); :func:`write_mini_tokenizer_files` / :func:`clip_tokenizer` give the small CLIP
BPE vocabulary every embedded model uses; :func:`save_pipeline` writes a built pipeline atomically in float16.
"""
from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

#: Seed of every embedded model's weights.
MINI_SEED = 0


class _DropTorchvisionFallback(logging.Filter):
    """transformers announces at every import that its image processors fall back to PIL without torchvision;
    the Stable Diffusion pipelines never use those processors, so the three lines are noise in every job."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


@contextmanager
def diffusers_errors_only():
    """diffusers logs errors only for the duration (loading and ``.to(float16)`` warn about modules kept in
    float32; there are none in these models)."""
    from diffusers.utils import logging as dlogging

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(verbosity)


def quiet_libraries() -> None:
    """No import-time warnings about torchvision and no loading/saving progress bars from diffusers and
    transformers (the extraction shows its own progress)."""
    import diffusers
    import transformers

    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode map of byte-level BPE (GPT-2/CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_mini_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """A small CLIP BPE vocabulary written by the project: all byte symbols (plain and
    word-final) plus a few merges for common lower-case letter pairs, and the two specials."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_tokens = symbols + [s + "</w>" for s in symbols]
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    merges = [f"{a} {b}" for a in letters[:8] for b in letters[:8]]
    merges += [f"{a} {b}</w>" for a in letters[:8] for b in letters[:8]]
    vocab_tokens += [m.replace(" ", "") for m in merges]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def clip_tokenizer():
    """The project's small CLIP tokenizer (:func:`write_mini_tokenizer_files`), 77 tokens, padded with
    ``<|endoftext|>``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_mini_tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")


def save_pipeline(pipe, out_dir: str | Path, info: dict, info_name: str = "MINI_MODEL.json") -> Path:
    """``save_pretrained`` in float16 safetensors plus ``info_name`` (what was built, as JSON), atomically: written to
    ``<out_dir>.tmp`` and renamed."""
    out_dir = Path(out_dir)
    with diffusers_errors_only():
        pipe.to(torch.float16)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / info_name).write_text(json.dumps(info, indent=1))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
