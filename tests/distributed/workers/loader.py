"""Loader cases on 4 gloo ranks (TP=2 x DP=2): the split by data-parallel rank, the state gathered over the DP group
and restored at another dp size, and a loader batch through the TP=2 model.

The shard set, tokenizer and data settings come from the pytest side (``LMFUSION_LOADER_SPEC``, a JSON file).
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lmfusion.data import DataConfig, MultimodalLoader
from lmfusion.data.loader import all_gather_json
from tests.distributed.harness import case, worker_main
from tests.fixtures import model_config

TP = 2


def _setup():
    spec = json.loads(open(os.environ["LMFUSION_LOADER_SPEC"]).read())
    ps.initialize_model_parallel(tensor_model_parallel_size=TP)
    return DataConfig(**spec["data"]), model_config(spec["tokenizer"])


def _summary(batch) -> dict:
    """What identifies a micro-batch across processes: its documents and exact sums of every tensor."""
    return {"ids": batch.sample_ids, "tokens": int(batch.tokens.sum()), "labels": int(batch.labels.sum()),
            "mask": float(batch.text_loss_mask.sum()), "latents": batch.image_latents.double().sum().item(),
            "starts": batch.image_start.tolist(), "first": batch.image_first.tolist()}


@case
def tp_ranks_share_batches_dp_ranks_split_and_state_moves_to_dp1():
    cfg, mc = _setup()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    assert dp == dist.get_world_size() // TP
    loader = MultimodalLoader.from_parallel_state(cfg, mc)
    per_step = loader.micro_batches_per_step
    head = [_summary(b) for b in itertools.islice(loader, 2 * per_step)]
    everyone = all_gather_json({"dp": dp_rank, "batches": head}, None)
    by_dp = {}
    for r in everyone:
        by_dp.setdefault(r["dp"], []).append(r["batches"])
    assert sorted(by_dp) == list(range(dp))
    for runs in by_dp.values():  # every TP rank of a replica got the same micro-batches
        assert all(run == runs[0] for run in runs)
    epoch0 = [{s for b in runs[0] for row in b["ids"] for s in row if s.endswith(":0")} for runs in by_dp.values()]
    assert all(epoch0) and not set.intersection(*epoch0)  # replicas read disjoint samples

    state = loader.state_dict()  # collective over the DP group: every stream of every replica
    assert sorted(int(k) for k in state["streams"]) == list(range(loader.num_streams))
    nxt = [_summary(b) for b in itertools.islice(loader, per_step)]
    gathered = all_gather_json({"tp": ps.get_tensor_model_parallel_rank(), "batches": nxt}, None)
    expected = [b for r in gathered if r["tp"] == 0 for b in r["batches"]]
    single = MultimodalLoader(cfg, mc)  # dp_size 1, in this process: the whole next global batch
    single.load_state_dict(json.loads(json.dumps(state)))
    got = [_summary(b) for b in itertools.islice(single, single.micro_batches_per_step)]
    key = lambda b: json.dumps(b, sort_keys=True)  # noqa: E731
    assert Counter(map(key, got)) == Counter(map(key, expected))


@case
def loader_batch_runs_through_tp2_model():
    from lmfusion.model.builder import build_model

    cfg, mc = _setup()
    batch = next(MultimodalLoader.from_parallel_state(cfg, mc))
    model = build_model(mc)
    t = torch.zeros(batch.num_images, dtype=torch.long)
    out = model(batch.to_model_inputs(batch.image_latents, t))
    b, s = batch.tokens.shape
    assert out.logits.shape == (s, b, mc.padded_vocab_size(TP) // TP)
    assert out.noise_pred.shape == batch.image_latents.shape
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.noise_pred).all()


if __name__ == "__main__":
    worker_main()
