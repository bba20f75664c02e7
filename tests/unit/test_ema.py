"""``train.ema``: the decay schedule against diffusers' ``EMAModel``, the config keys and their checks, the DeepSpeed
refusal, and ``--weights`` resolution. (The sharded average itself, its checkpoint and generation with it:
tests/distributed/test_ema.py.)"""

from __future__ import annotations

import pytest
import torch

from lmfusion.config_io import load_config
from lmfusion.ema import EmaConfig, ema_decay
from lmfusion.inference.load import choose_weights
from tests.fixtures import TINY_CONFIG as TINY



@pytest.fixture
def base(tmp_path):
    """A directory holding only a base's lmfusion_config.json (all the config reads)."""
    from lmfusion.config import ModelConfig

    ModelConfig(vocab_size=45, hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                num_query_groups=2, bos_token_id=1, eos_token_id=2, boi_token_id=3,
                eoi_token_id=4).save(tmp_path / "base" / "lmfusion_config.json")
    return tmp_path / "base"


SETTINGS = [dict(), dict(ramp="hyperbolic"), dict(ramp="power", power=3 / 4, inv_gamma=2.0),
            dict(ramp="hyperbolic", update_after_step=5, min_decay=0.3, decay=0.95),
            dict(ramp="power", decay=0.5, update_after_step=2)]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_decay_schedule_equals_diffusers_ema_model(kwargs):
    """Step by step, the decay of the n-th update equals EMAModel's (it counts optimization steps from 1, as the
    trainer counts successful optimizer steps); and EMAModel's own update with it matches torch.lerp with 1 - decay
    (fp32: 1e-6, two roundings of one formula)."""
    from diffusers.training_utils import EMAModel

    cfg = EmaConfig(enabled=True, **kwargs)
    p = torch.nn.Parameter(torch.zeros(8))
    theirs = EMAModel([p], decay=cfg.decay, min_decay=cfg.min_decay, update_after_step=cfg.update_after_step,
                      use_ema_warmup=cfg.ramp == "power", inv_gamma=cfg.inv_gamma, power=cfg.power)
    g = torch.Generator().manual_seed(0)
    ours = torch.zeros(8)
    decays = []
    for n in range(1, 301):
        with torch.no_grad():
            p.copy_(torch.randn(8, generator=g))
        theirs.step([p])
        decays.append(ema_decay(cfg, n))
        assert decays[-1] == theirs.cur_decay_value, f"step {n}: {decays[-1]} vs diffusers {theirs.cur_decay_value}"
        ours.lerp_(p.detach(), 1.0 - decays[-1])
    torch.testing.assert_close(ours, theirs.shadow_params[0], rtol=1e-6, atol=1e-6)
    first = cfg.update_after_step + 1
    assert decays[:first] == [0.0] * first  # the first updates copy the weights
    assert max(decays) <= cfg.decay and decays[-1] > decays[first]  # warms up toward the cap


def test_ema_keys_read_from_overrides_and_are_off_by_default(base):
    assert load_config(TINY, [f"init.base_checkpoint={base}"]).train.ema == EmaConfig()
    assert EmaConfig().enabled is False
    cfg = load_config(TINY, [f"init.base_checkpoint={base}", "train.ema.enabled=true", "train.ema.decay=0.999",
                             "train.ema.ramp=hyperbolic", "train.ema.power=0.75"])
    assert cfg.train.ema == EmaConfig(enabled=True, decay=0.999, ramp="hyperbolic", power=0.75)


@pytest.mark.parametrize("override, field", [("train.ema.decay=1.0", "decay"), ("train.ema.decay=-0.1", "decay"),
                                             ("train.ema.ramp=linear", "ramp"),
                                             ("train.ema.min_decay=0.99999", "min_decay"),
                                             ("train.ema.inv_gamma=0", "inv_gamma"), ("train.ema.power=0", "power"),
                                             ("train.ema.update_after_step=-1", "update_after_step")])
def test_bad_ema_values_name_the_key(base, override, field):
    with pytest.raises(ValueError) as err:
        load_config(TINY, [f"init.base_checkpoint={base}", override])
    assert f"train.ema.{field}" in str(err.value) and "\n" not in str(err.value)


def test_deepspeed_engine_refuses_ema_in_one_line(base):
    load_config(TINY, [f"init.base_checkpoint={base}", "engine=deepspeed"])  # without EMA it is accepted
    with pytest.raises(ValueError) as err:
        load_config(TINY, [f"init.base_checkpoint={base}", "engine=deepspeed", "train.ema.enabled=true"])
    assert "train.ema.enabled" in str(err.value) and "\n" not in str(err.value)


def test_weights_choice(tmp_path, capsys):
    run = tmp_path / "run"
    assert choose_weights(None, True, run, "training") == "ema"
    assert choose_weights("raw", True, run, "training") == "raw"
    assert choose_weights("ema", True, run, "export") == "ema"
    assert capsys.readouterr().err == ""
    assert choose_weights(None, False, run, "training") == "raw"  # falls back, with a note
    assert "holds no EMA weights; using the raw weights" in capsys.readouterr().err
    assert choose_weights(None, False, run, "base") == "raw" and capsys.readouterr().err == ""
    with pytest.raises(ValueError) as err:
        choose_weights("ema", False, run, "training")
    assert str(err.value).startswith("--weights ema:") and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="--weights must be"):
        choose_weights("best", True, run, "training")
