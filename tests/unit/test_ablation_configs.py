"""examples/configs/ablations/: the paper's nine ablation settings (Section 5.1) at 8B and their tiny CPU twins.

Each file's settings are read back through the config loader (``extends`` chains included) and compared with what
its name says and with the paper's shared setting; nothing is compared with a count typed here but the paper's own
numbers (250K steps, 4096 tokens, ~250K tokens a step, image lr 1e-4, a 50/50 text/image-caption blend)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from lmfusion.config_io import load_config
from tests.fixtures import TINY_CONFIG, config_only_base

ABLATIONS = Path(__file__).resolve().parents[2] / "examples" / "configs" / "ablations"
SEPARATIONS, RATIOS = ("none", "shallow", "deep"), ("0", "0.1", "1")
SETTINGS = list(itertools.product(SEPARATIONS, RATIOS))


def test_the_folder_holds_exactly_the_nine_settings_and_their_tiny_twins():
    names = {p.name for p in ABLATIONS.glob("*.yaml")} - {"base_8b.yaml", "tiny_base.yaml"}
    want = {f"{prefix}{s}_ratio{r}.yaml" for prefix in ("", "tiny_") for s, r in SETTINGS}
    assert names == want


@pytest.mark.parametrize("separation,ratio", SETTINGS)
def test_8b_setting_is_the_paper_ablation_with_its_own_separation_and_ratio(separation, ratio):
    cfg = load_config(ABLATIONS / f"{separation}_ratio{ratio}.yaml", resolve_base=False)
    recipe = load_config(ABLATIONS.parent / "llama3_8b.yaml", resolve_base=False)
    assert (cfg.model.separation, cfg.optimizer.text_lr_ratio) == (separation, float(ratio))
    assert cfg.train.train_iters == 250_000 and cfg.data.seq_length == 4096 and cfg.optimizer.lr == 1e-4
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    assert abs(tokens - 250_000) / 250_000 < 0.05, tokens  # "250K-token batches"
    assert cfg.data.blend_weights == [0.5, 0.5] and len(cfg.data.datasets) == 2
    assert cfg.data_parallel_size(64) * cfg.train.micro_batch_size <= cfg.train.global_batch_size
    # everything else is the LMFusion recipe
    same = dataclasses.replace(cfg, data=recipe.data, train=recipe.train, checkpoint=recipe.checkpoint,
                               model=dataclasses.replace(cfg.model, separation=recipe.model.separation),
                               optimizer=dataclasses.replace(cfg.optimizer,
                                                             text_lr_ratio=recipe.optimizer.text_lr_ratio))
    assert same == recipe
    assert cfg.checkpoint.save.endswith(f"{separation}_ratio{ratio}")


@pytest.mark.parametrize("separation,ratio", SETTINGS)
def test_tiny_twin_is_tiny_cpu_with_the_same_setting(tmp_path, separation, ratio):
    base = config_only_base(tmp_path)
    overrides = [f"init.base_checkpoint={base}", "data.datasets=[text,images]"]
    cfg = load_config(ABLATIONS / f"tiny_{separation}_ratio{ratio}.yaml", overrides)
    big = load_config(ABLATIONS / f"{separation}_ratio{ratio}.yaml", resolve_base=False)
    assert (cfg.model.separation, cfg.optimizer.text_lr_ratio) == (big.model.separation, big.optimizer.text_lr_ratio)
    assert cfg.data.blend_weights == big.data.blend_weights
    tiny = load_config(TINY_CONFIG, overrides)
    assert cfg.train == tiny.train and cfg.model.image == tiny.model.image and cfg.parallel == tiny.parallel
