"""Tiny models and single-process references shared by the megatron worker modules (no cases here).

Every model is an MLP block stack ``x -> x + W2 tanh(W1 x + b1) + b2`` built from *full* weights that each rank
draws from the same seed, so a rank can run the unsharded reference on its own: no communication is involved in
the reference, which makes it independent of what is being tested.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

HIDDEN = 8
FFN = 16


def make_config(**kwargs) -> TransformerConfig:
    """A TransformerConfig that only carries what the schedules, DDP and layers read (sizes, parallel sizes)."""
    base = dict(
        num_layers=4,
        hidden_size=HIDDEN,
        num_attention_heads=4,  # divisible by every TP size used
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    base.update(kwargs)
    return TransformerConfig(**base)


def full_weights(num_blocks: int, seed: int, scale: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """Full (unsharded) weights of ``num_blocks`` MLP blocks, identical on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=gen) * 2 - 1) * scale

    return [
        {"w1": rand(FFN, HIDDEN), "b1": rand(FFN), "w2": rand(HIDDEN, FFN), "b2": rand(HIDDEN)}
        for _ in range(num_blocks)
    ]


class PlainBlock(torch.nn.Module):
    """The MLP block with torch.nn.Linear (tp=1): the same ops as the reference, so results can be bit-exact."""

    def __init__(self, w: dict[str, torch.Tensor]):
        super().__init__()
        self.fc1 = torch.nn.Linear(HIDDEN, FFN)
        self.fc2 = torch.nn.Linear(FFN, HIDDEN)
        with torch.no_grad():
            self.fc1.weight.copy_(w["w1"]), self.fc1.bias.copy_(w["b1"])
            self.fc2.weight.copy_(w["w2"]), self.fc2.bias.copy_(w["b2"])

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))

    def full_grads(self) -> dict[str, torch.Tensor]:
        return {"w1": self.fc1.weight.grad, "b1": self.fc1.bias.grad, "w2": self.fc2.weight.grad,
                "b2": self.fc2.bias.grad}


class TPBlock(MegatronModule):
    """The MLP block as megatron's ColumnParallelLinear -> RowParallelLinear, loaded with this TP rank's shard.

    A MegatronModule, not a plain torch.nn.Module: megatron's sharded_state_dict only recurses through
    MegatronModules; below a plain module every tensor is saved as TP-replicated (transformer/utils.py:240-250).
    """

    def __init__(self, config: TransformerConfig, w: dict[str, torch.Tensor] | None = None):
        super().__init__(config=config)
        init = torch.nn.init.zeros_
        self.fc1 = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init, bias=True, gather_output=False)
        self.fc2 = RowParallelLinear(FFN, HIDDEN, config=config, init_method=init, bias=True, input_is_parallel=True,
                                     skip_bias_add=False)
        if w is not None:
            rows = self._rows()
            with torch.no_grad():
                self.fc1.weight.copy_(w["w1"][rows]), self.fc1.bias.copy_(w["b1"][rows])
                self.fc2.weight.copy_(w["w2"][:, rows]), self.fc2.bias.copy_(w["b2"])

    @staticmethod
    def _rows() -> slice:
        per = FFN // parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        return slice(rank * per, (rank + 1) * per)

    def forward(self, x):
        hidden, _ = self.fc1(x)
        out, _ = self.fc2(torch.tanh(hidden))
        return x + out

    def shard_of(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of full-weight-shaped tensors (e.g. reference grads)."""
        rows = self._rows()
        return {"w1": full["w1"][rows], "b1": full["b1"][rows], "w2": full["w2"][:, rows], "b2": full["b2"]}

    def local(self, grads: bool = False) -> dict[str, torch.Tensor]:
        get = (lambda p: p.grad) if grads else (lambda p: p.detach())
        return {"w1": get(self.fc1.weight), "b1": get(self.fc1.bias), "w2": get(self.fc2.weight),
                "b2": get(self.fc2.bias)}


class Stage(MegatronModule):
    """A pipeline stage (or model chunk): a run of blocks; takes data on the first stage, else the received input."""

    def __init__(self, config: TransformerConfig, blocks: list[torch.nn.Module], is_first: bool):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by the schedules
        self.blocks = torch.nn.ModuleList(blocks)
        self.is_first = is_first
        self.input_tensor = None

    def set_input_tensor(self, input_tensor):
        # The schedules pass a list (one tensor per model input); a single-input stage takes the first.
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def forward(self, x):
        h = x if self.is_first else self.input_tensor
        for block in self.blocks:
            h = block(h)
        return h


def shared_tmpdir() -> str:
    """One fresh directory, the same path on every rank (rank 0 creates it)."""
    import tempfile

    path = [tempfile.mkdtemp(prefix="lmfusion-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-exact comparison with a readable failure."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual, expected), f"{what}: max |diff| {max_abs_diff(actual, expected):.3e} (expected exact)"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = max_abs_diff(actual, expected)
    assert diff <= tol, f"{what}: max |diff| {diff:.3e} > {tol:.1e}"
