"""``lmfusion export-ckpt``: write the export (:mod:`lmfusion.rundir.export`, its format and loader) of a training
iteration, loaded as inference loads it: the image set resharded to TP = PP = 1 (and the EMA average with
``train.ema``), the base copied, every file hashed, the record written last and the directory renamed into place.
``--hf`` (:func:`export_text_hf`) writes the run's text model as a Hugging Face directory instead: the base's text,
or, for a run with ``optimizer.text_lr_ratio`` > 0, the text set it trained."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lmfusion.inference.load import load_for_inference
from lmfusion.rundir import integrity
from lmfusion.rundir.export import EMA_SET, EXPORT_FORMAT, EXPORT_JSON, EXPORT_VERSION, IMAGE_SET, image_set_tensors
from lmfusion.rundir.layout import base_sha256, json_text, read_record, resolve_base
from lmfusion.utils import atomic_write_text

__all__ = ["export_checkpoint", "export_text_hf"]


def export_checkpoint(iter_dir: Path, output: Path) -> Path:
    """Write the export of ``iter_dir`` (a training iteration; its base is checked against the recorded hash)."""
    iter_dir, output = Path(iter_dir), Path(output)
    if output.exists():
        raise FileExistsError(f"{output}: exists; expected a new directory")
    record = read_record(iter_dir)
    bundle = load_for_inference(iter_dir, device="cpu", weights="raw")  # verifies files and the base hash
    base = resolve_base(record, iter_dir / "lmfusion_checkpoint.json")
    tmp = output.with_name(f".tmp_{output.name}")  # a crash leaves no half-written directory under the final name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(image_set_tensors(bundle.model), str(tmp / IMAGE_SET), metadata={"format": "lmfusion-image-set"})
    ema_key = record.get("ema_key_prefix")
    if ema_key:  # train.ema: the average, through the same model (megatron reshards it to TP = 1 as the raw set)
        from lmfusion.rundir.trust import load_image_set

        load_image_set(bundle.model, iter_dir, ema_key)
        save_file(image_set_tensors(bundle.model), str(tmp / EMA_SET), metadata={"format": "lmfusion-image-set"})
    shutil.copytree(base, tmp / "base")
    files = integrity.hash_files(tmp, distributed=False)
    in_base = {name.removeprefix("base/"): entry for name, entry in files.items()
               if name.startswith("base/") and name.count("/") == 1 and name != "base/conversion.json"}
    export = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "iteration": record.get("iteration"),
              "model": record["model"], "vae": record.get("vae"), "diffusion": record.get("diffusion"),
              "base": "base", "ema": EMA_SET if ema_key else None, "text_lr_ratio": record.get("text_lr_ratio", 0.0),
              "base_conversion_sha256": base_sha256(tmp / "base"), "base_files": in_base,
              "source": str(iter_dir.resolve()), "integrity": integrity.write_manifest(tmp, files)}
    atomic_write_text(tmp / EXPORT_JSON, json_text(export))
    os.replace(tmp, output)
    return output


def export_text_hf(ckpt: Path, output: Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """The text model of ``ckpt`` (training iteration or export) as a Hugging Face directory (``lmfusion.hf``'s
    ``export_hf``): its base's weights, or the run's own where its text trained."""
    from lmfusion.hf import export_hf
    from lmfusion.model.weights import is_image_param

    bundle = load_for_inference(ckpt, device="cpu", weights="raw")  # verifies files and the base hash
    state = None
    if bundle.meta.text_lr_ratio > 0:
        state = {n: p.detach() for n, p in bundle.model.named_parameters()
                 if not is_image_param(n) and not n.startswith("vision.")}  # a VLM's tower: the base's, frozen
    return export_hf(bundle.meta.base_dir, output, dtype, state=state, overwrite=overwrite)
