"""Cost of checkpoint integrity hashing (lmfusion.rundir.integrity): save and load with vs without it.

One rank (gloo), the real save protocol (begin_save, megatron dist_checkpointing.save with the files hashed while
written, finish_save) and load (integrity.start_verify, the run directory's dist-checkpoint reader while the sha256s
are computed, then the verification's result), on a state of the tiny run's size (``--mbytes``,
default 2.4: what ``examples/configs/tiny_cpu.yaml`` writes per checkpoint, model + optimizer + RNG) and on a larger
one for the bytes/s the 8B extrapolation uses. Then the trainer's own checkpointer
(:class:`lmfusion.training.checkpointing.Checkpointer`) on the tiny run itself: the model, DDP and distributed optimizer
of ``examples/configs/tiny_cpu.yaml`` over the tests' tiny base shape (random weights), ``save`` with and without the
manifest and ``load`` (state dicts, megatron read, applying the model/optimizer/scheduler/RNG) with and without the
verification, which overlaps the read and the applying. Median of interleaved repetitions.

    python benchmarks/checkpoint_hashing.py [--mbytes 2.4] [--big-mbytes 256] [--reps 5]

8B estimate: the image set of Llama-3-8B is ~7.0e9 parameters (every decoder linear and norm twinned; embeddings and
head stay text); a checkpoint holds bf16 weights + fp32 main params + two fp32 Adam moments = 14 bytes/param,
~98 GB, spread over the ranks, each hashing its share. The extra time per rank is bytes_per_rank / hash bytes/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import init_single_rank, time_interleaved  # noqa: E402

IMAGE_PARAMS_8B = 7.0e9
BYTES_PER_PARAM = 14
TINY_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny_cpu.yaml"
# the tests' tiny Llama base (tests/fixtures.py TINY_LLAMA, converted with 2 KV heads), which tiny_cpu.yaml trains on
TINY_BASE = {"vocab_size": 300, "hidden_size": 64, "ffn_hidden_size": 96, "num_layers": 2, "num_attention_heads": 4,
             "num_query_groups": 2, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2,
             "boi_token_id": 3, "eoi_token_id": 4}


def _state(mbytes: float, fill: bool = True) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    n = max(1, int(mbytes * 1e6 / 4 / 32))
    gen = torch.Generator().manual_seed(0)
    sd = {f"t{i}": ShardedTensor.from_rank_offsets(f"t{i}", torch.randn(n, generator=gen) if fill else
                                                   torch.zeros(n)) for i in range(32)}
    sd["rng"] = ShardedObject("rng", {"cpu": torch.get_rng_state()}, (1,), (0,))
    return sd


class _Loader:
    """The checkpointer's view of the data loader: JSON state in and out."""

    def state_dict(self) -> dict:
        return {"epoch": 0, "consumed": 0}

    def load_state_dict(self, state: dict) -> None:
        assert state == self.state_dict()


def trainer_round_trip(root: Path, reps: int) -> tuple[dict[str, float], int]:
    """Median seconds of the trainer's Checkpointer save/load of the tiny run, each with and without hashing."""
    import yaml

    from lmfusion import rundir
    from lmfusion.config_io import config_from_dict, dump_config
    from lmfusion.training import checkpointing as ckpt
    from lmfusion.training.model_setup import build_train_model

    data = yaml.safe_load(TINY_CONFIG.read_text())
    data["model"] = {**data["model"], **TINY_BASE}
    data["init"] = {"base_checkpoint": "none"}
    data["checkpoint"] = {"save": "none"}
    cfg = config_from_dict(data, resolve_base=False)
    tm = build_train_model(cfg, None)
    c = cfg.checkpoint
    record = {"base": "none", "model": cfg.model.to_dict()}
    savers = {h: ckpt.Checkpointer(root / f"trainer-{h}", tm.chunks, tm.optimizer, tm.scheduler, _Loader(), record,
                                   dump_config(cfg), c.optimizer_sharding, keep_last=1, async_save=False)
              for h in (True, False)}
    for h, saver in savers.items():
        saver.hash_files = h
    counter = iter(range(1, 1 << 30))

    def save(hashing: bool) -> None:
        savers[hashing].save(next(counter), {})

    def load(hashing: bool) -> None:  # the plain load reads the plain save's directory: no manifest to verify
        saver = savers[hashing]
        saver.load(rundir.find_checkpoint(saver.run_dir), True, check_model=lambda record, path: None)

    t = time_interleaved({"save_hash": lambda: save(True), "save_plain": lambda: save(False)}, reps)
    t.update(time_interleaved({"load_hash": lambda: load(True), "load_plain": lambda: load(False)}, reps))
    nbytes = sum(f.stat().st_size for f in rundir.find_checkpoint(root / "trainer-True").iterdir() if f.is_file())
    for saver in savers.values():
        saver.close()
    return t, nbytes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mbytes", type=float, default=2.4)
    p.add_argument("--big-mbytes", type=float, default=256)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    init_single_rank("cpu")  # megatron CPU mode
    from megatron.core import dist_checkpointing

    from lmfusion import rundir

    root = Path(tempfile.mkdtemp(prefix="ckpt-hash-"))
    results = {}
    try:
        for label, mb in (("tiny", args.mbytes), ("big", args.big_mbytes)):
            state = _state(mb)
            counter = iter(range(1, 1 << 30))

            def save(hashing: bool) -> None:  # as lmfusion.training.checkpointing.Checkpointer.save does
                run = root / f"{label}-{hashing}"
                tmp, final = rundir.begin_save(run, next(counter))
                written = rundir.integrity.hash_while_writing(tmp) if hashing else None
                dist_checkpointing.save(state, str(tmp))
                rundir.finish_save(tmp, final, {}, {"base": "b", "model": {}}, "", keep_last=1, hash_files=hashing,
                                   written=written)

            def load(hashing: bool) -> None:  # as Checkpointer.load does: sha256s while megatron reads
                it = rundir.find_checkpoint(root / f"{label}-True")
                check = rundir.integrity.start_verify(it, rundir.read_record(it)) if hashing else None
                rundir.load_dist_checkpoint(_state(mb, fill=False), it)
                if check is not None:
                    assert check.result()

            t = time_interleaved({"save_hash": lambda: save(True), "save_plain": lambda: save(False)}, args.reps)
            t.update(time_interleaved({"load_hash": lambda: load(True), "load_plain": lambda: load(False)},
                                      args.reps))
            nbytes = sum(f.stat().st_size for f in rundir.find_checkpoint(root / f"{label}-True").iterdir())
            results[label] = (t, nbytes)
            print(f"{label}: {nbytes / 1e6:.1f} MB  save {t['save_plain']:.3f} s -> {t['save_hash']:.3f} s "
                  f"(x{t['save_hash'] / t['save_plain']:.3f})  load {t['load_plain']:.3f} s -> {t['load_hash']:.3f} s "
                  f"(x{t['load_hash'] / t['load_plain']:.3f})")
        t, nbytes = results["big"]
        it = rundir.find_checkpoint(root / "big-True")
        files = [f for f in it.iterdir() if f.is_file()]
        raw = time_interleaved({"sha256": lambda: rundir.digest.sha256_files(files)}, args.reps)["sha256"]
        hash_bps = nbytes / raw
        save_bps = nbytes / t["save_plain"]
        extra_save, extra_load = t["save_hash"] - t["save_plain"], t["load_hash"] - t["load_plain"]
        ckpt_8b = IMAGE_PARAMS_8B * BYTES_PER_PARAM
        per_rank = ckpt_8b / 64
        print(f"sha256 alone {hash_bps / 1e9:.2f} GB/s per rank ({len(files)} files); saving {save_bps / 1e9:.2f} GB/s "
              f"here; time left visible after overlapping: save {extra_save * 1e3:.0f} ms, load {extra_load * 1e3:.0f} "
              f"ms per {nbytes / 1e6:.0f} MB. 8B image set + optimizer: {ckpt_8b / 1e9:.0f} GB; on 64 ranks "
              f"{per_rank / 1e9:.2f} GB per rank: {per_rank / hash_bps:.2f} s of sha256 per rank, of which visible "
              f"~{max(extra_save, 0) / nbytes * per_rank:.2f} s per save and "
              f"~{max(extra_load, 0) / nbytes * per_rank:.2f} s per load at these rates")
        t, nbytes = trainer_round_trip(root, args.reps)
        results["trainer"] = (t, nbytes)
        print(f"trainer (tiny_cpu.yaml's Checkpointer): {nbytes / 1e6:.1f} MB  save {t['save_plain']:.3f} s -> "
              f"{t['save_hash']:.3f} s (x{t['save_hash'] / t['save_plain']:.3f})  load {t['load_plain']:.3f} s -> "
              f"{t['load_hash']:.3f} s (x{t['load_hash'] / t['load_plain']:.3f})")
        for name in ("big", "tiny", "trainer"):
            t, _ = results[name]
            print(f"checkpoint_hashing_save_ratio_{name}: {t['save_hash'] / t['save_plain']:.3f}")
            print(f"checkpoint_hashing_load_ratio_{name}: {t['load_hash'] / t['load_plain']:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
