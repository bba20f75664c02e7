"""Loader: exact resume (same and other dp_size), epoch coverage, data-parallel split, blending, bad shards,
manifest checks. Ranks are simulated by building loaders with explicit (dp_rank, dp_size) in one process; the
real multi-rank path is tests/distributed/test_loader.py.

Every expectation is derived from the manifests (shards, samples) and the DataConfig (batch sizes, streams).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from collections import Counter

import pytest
import torch

from lmfusion.data import DataError, MultimodalLoader, merge_states
from tests.fixtures import build_set, data_config, make_images, make_tokenizer, manifest, model_config

SPS = 4  # samples per shard


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    make_images(root / "img_a", 30, seed=2, prefix="a")
    make_images(root / "img_b", 14, seed=3, prefix="b")
    tok = make_tokenizer(root / "tok")
    return {"a": build_set(root / "a", root / "img_a", SPS), "b": build_set(root / "b", root / "img_b", SPS),
            "tok": tok, "mc": model_config(tok), "root": root}


def take(loader, n):
    return list(itertools.islice(loader, n))


def same(x, y):
    """Two micro-batches are identical: every tensor bit for bit and the same documents."""
    assert x.sample_ids == y.sample_ids
    for name, value in vars(x).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, getattr(y, name)), name
    return True


def keys_of(batches, epoch=None):
    ids = [s for b in batches for row in b.sample_ids for s in row]
    return [s for s in ids if epoch is None or s.endswith(f":{epoch}")]


def all_keys(path, d=0):
    out = []
    for entry in manifest(path)["shards"]:
        lo = int(entry["name"][len("shard-"):-len(".tar")]) * manifest(path)["samples_per_shard"]
        out += [f"{d}:{lo + i:010d}" for i in range(entry["samples"])]
    return out


def test_exact_resume_mid_epoch_any_workers(env):
    cfg = data_config([env["a"]], env["tok"], num_workers=2)
    steps = MultimodalLoader(cfg, env["mc"]).micro_batches_per_step
    cut = steps + 1  # mid optimizer step, mid epoch
    straight = take(MultimodalLoader(cfg, env["mc"]), cut + 2 * steps)
    first = MultimodalLoader(cfg, env["mc"])
    head = take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores: plain JSON
    first.close()
    for workers in (0, 2):  # the state does not depend on how many workers produced it
        resumed = MultimodalLoader(data_config([env["a"]], env["tok"], num_workers=workers), env["mc"])
        resumed.load_state_dict(state)
        tail = take(resumed, 2 * steps)
        assert all(same(x, y) for x, y in zip(head + tail, straight))
        resumed.close()


def test_epoch_covers_every_sample_once(env):
    cfg = data_config([env["a"]], env["tok"])
    loader = MultimodalLoader(cfg, env["mc"])
    n_shards = len(manifest(env["a"])["shards"])
    batches = []

    def past_epoch0():  # every stream's current shard visit lies in epoch >= 1
        return all(int(k) + s["source"]["readers"][0]["visit"] * loader.num_streams >= n_shards
                   for k, s in loader.local_state_dict()["streams"].items())

    while not past_epoch0():
        batches += take(loader, 1)
    seen = Counter(s.rsplit(":", 1)[0] for s in keys_of(batches, epoch=0))
    assert sorted(seen) == sorted(all_keys(env["a"])) and set(seen.values()) == {1}


def test_dp_split_tp_groups_equal_dp_ranks_disjoint(env):
    """2 DP ranks x TP 2: the two TP ranks of a replica build their own loader and get the same batches."""
    cfg = data_config([env["a"]], env["tok"])
    dp = 2
    per_rank = {(r, tp): take(MultimodalLoader(cfg, env["mc"], dp_rank=r, dp_size=dp), 12)
                for r in range(dp) for tp in range(2)}
    for r in range(dp):
        assert all(same(x, y) for x, y in zip(per_rank[(r, 0)], per_rank[(r, 1)]))
    a, b = (set(keys_of(per_rank[(r, 0)], epoch=0)) for r in range(dp))
    assert a and b and not a & b  # within an epoch no sample reaches two replicas


@pytest.mark.parametrize("new_dp", [1, 4])
def test_resume_at_other_dp_size_keeps_global_batches(env, new_dp):
    cfg = data_config([env["a"]], env["tok"])
    old_dp, done_steps = 2, 2
    ref = [MultimodalLoader(cfg, env["mc"], dp_rank=r, dp_size=old_dp) for r in range(old_dp)]
    per_step = ref[0].micro_batches_per_step
    ref_batches = [take(x, (done_steps + 1) * per_step) for x in ref]
    runs = [MultimodalLoader(cfg, env["mc"], dp_rank=r, dp_size=old_dp) for r in range(old_dp)]
    for x in runs:
        take(x, done_steps * per_step)
    state = merge_states([x.local_state_dict() for x in runs])
    step = []
    for r in range(new_dp):
        x = MultimodalLoader(cfg, env["mc"], dp_rank=r, dp_size=new_dp)
        x.load_state_dict(state)
        step += take(x, x.micro_batches_per_step)
    expected = [b for batches in ref_batches for b in batches[done_steps * per_step:]]
    key = lambda b: json.dumps(b.sample_ids)  # noqa: E731
    assert len(step) == len(expected)
    assert all(same(x, y) for x, y in zip(sorted(step, key=key), sorted(expected, key=key)))
    # a state saved mid-step cannot move to another dp size
    take(runs[0], 1)
    with pytest.raises(ValueError, match="optimizer-step boundary"):
        MultimodalLoader(cfg, env["mc"], dp_rank=0, dp_size=new_dp).load_state_dict(
            merge_states([x.local_state_dict() for x in runs]))


def test_resume_with_other_micro_batch_size_keeps_rows(env):
    cfg = data_config([env["a"]], env["tok"])
    run = MultimodalLoader(cfg, env["mc"])
    take(run, run.micro_batches_per_step)
    state = run.local_state_dict()
    expected = take(run, run.micro_batches_per_step)
    smaller = MultimodalLoader(data_config([env["a"]], env["tok"], micro_batch_size=1), env["mc"])
    smaller.load_state_dict(state)  # streams (global / micro batch size of the saved run) come from the state
    got = take(smaller, smaller.micro_batches_per_step)
    rows = lambda batches: sorted(json.dumps([r, b.tokens[i].tolist()])  # noqa: E731
                                  for b in batches for i, r in enumerate(b.sample_ids))
    assert rows(got) == rows(expected)


def test_state_checks(env):
    cfg = data_config([env["a"]], env["tok"])
    state = MultimodalLoader(cfg, env["mc"], dp_rank=0, dp_size=2).local_state_dict()
    with pytest.raises(ValueError, match="lacks streams"):
        MultimodalLoader(cfg, env["mc"], dp_rank=1, dp_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        MultimodalLoader(data_config([env["a"]], env["tok"], seed=cfg.seed + 1), env["mc"]).load_state_dict(state)
    with pytest.raises(ValueError, match="does not divide"):
        MultimodalLoader(cfg, env["mc"], dp_size=3)


def test_blending_follows_weights(env):
    weights = [3.0, 1.0]
    cfg = data_config([env["a"], env["b"]], env["tok"], weights=weights)
    ids = keys_of(take(MultimodalLoader(cfg, env["mc"]), 120))
    n, from_a = len(ids), sum(s.startswith("0:") for s in ids)
    p = weights[0] / sum(weights)
    assert abs(from_a - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (from_a, n)
    assert {s.split(":")[1] for s in ids if s.startswith("1:")} <= {k.split(":")[1] for k in all_keys(env["b"], 1)}


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_shard_skipped_logged_counted(env, tmp_path, caplog, verify):
    bad = tmp_path / "set"
    shutil.copytree(env["a"], bad)
    victim = manifest(bad)["shards"][1]
    path = bad / victim["name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    loader = MultimodalLoader(data_config([bad], env["tok"], verify_checksums=verify), env["mc"])
    with caplog.at_level(logging.WARNING, logger="lmfusion.data"):
        batches = take(loader, 3 * loader.micro_batches_per_step)
    assert any(victim["name"] in r.getMessage() for r in caplog.records)
    assert loader.stats()["skipped_shards"] >= 1
    lo = int(victim["name"][len("shard-"):-len(".tar")]) * manifest(bad)["samples_per_shard"]
    lost = {f"0:{lo + i:010d}" for i in range(victim["samples"])}
    assert not lost & {s.rsplit(":", 1)[0] for s in keys_of(batches)}


def test_consecutive_failures_stop_training(env, tmp_path):
    bad = tmp_path / "set"
    shutil.copytree(env["a"], bad)
    for entry in manifest(bad)["shards"]:
        (bad / entry["name"]).write_bytes(b"not a tar")
    for workers in (0, 1):
        loader = MultimodalLoader(data_config([bad], env["tok"], max_consecutive_failures=2, num_workers=workers),
                                  env["mc"])
        with pytest.raises(DataError, match=r"set: 2 unreadable shards in a row \(") as e:
            next(loader)
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value), (workers, str(e.value))  # worker: too
        loader.close()


def test_manifest_mismatch_errors(env, tmp_path):
    mc = env["mc"]
    wrong = model_config(env["tok"], latent_size=2 * mc.image.latent_size)
    with pytest.raises(ValueError, match=r"manifest.json: latent.shape .* does not match the model config"):
        MultimodalLoader(data_config([env["a"]], env["tok"]), wrong)
    with pytest.raises(ValueError, match="expected data.vae"):
        MultimodalLoader(data_config([env["a"]], env["tok"], vae="some-other-vae"), mc)
    other = tmp_path / "other"
    shutil.copytree(env["b"], other)
    m = manifest(other)
    m["vae"]["weights_hash"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="must share one VAE"):
        MultimodalLoader(data_config([env["a"], other], env["tok"]), mc)
