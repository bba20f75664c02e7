"""Reading megatron/torch distributed checkpoints without running code from them, and one-line load errors.

megatron-core's ``dist_checkpointing.load`` reads through torch's ``FileSystemReader``, which ``pickle.load``-s
``.metadata``, and torch's load planner, which ``torch.load(weights_only=False)``-s every object entry (our RNG
state). Either would run whatever a crafted file asks. :func:`no_code_execution` swaps both for the duration of a
load: ``.metadata`` goes through an unpickler that only constructs torch's checkpoint-metadata classes, ``torch.Size``
and dtypes; object entries through ``torch.load(weights_only=True)``; anything else is refused by name
(:class:`UnsafeCheckpoint`). ``common.pt`` already goes through ``torch.load`` whose default is ``weights_only=True``
(torch >= 2.6). That makes loading a training directory refuse code, but a training directory stays a format for
the user's own runs; what is shared leaves through ``lmfusion export-ckpt`` (safetensors + JSON,
:mod:`lmfusion.rundir.export`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pickle
import threading
import types
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from lmfusion.errors import UserError

__all__ = ["UnsafeCheckpoint", "CheckpointLoadError", "no_code_execution", "load_dist_checkpoint",
           "check_image_set_loaded", "load_image_set"]

_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint.filesystem")
_lock = threading.Lock()


class UnsafeCheckpoint(UserError):
    """A checkpoint file asks to run code that loading a checkpoint never needs."""


class CheckpointLoadError(UserError):
    """A distributed checkpoint that cannot be read (one line: the file or key, and what was wrong)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Constructs only what torch's ``Metadata`` is made of (the classes those modules define, torch.Size, dtypes)."""

    source = ".metadata"

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        elif (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        raise UnsafeCheckpoint(f"{self.source}: refuses to unpickle {module}.{name} (a checkpoint's metadata holds "
                               f"torch checkpoint-metadata classes only); not loading a file that asks to run code")


def _safe_pickle_module(source: str) -> types.SimpleNamespace:
    def load(f, **_):
        u = _MetadataUnpickler(f)
        u.source = source
        return u.load()

    return types.SimpleNamespace(load=load, loads=lambda b, **_: load(io.BytesIO(b)), dump=pickle.dump,
                                 dumps=pickle.dumps, HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL)


def _load_bytes_weights_only(self, read_item, value: io.BytesIO) -> None:
    """torch's ``DefaultLoadPlanner.load_bytes`` with ``weights_only=True``."""
    from torch.distributed.checkpoint._traverse import set_element

    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"object entry {read_item.dest_index.fqn!r}: refused by torch.load(weights_only=True) "
                               f"({' '.join(str(e).split())[:200]})") from None
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def no_code_execution(directory: Path):
    """Within: torch distributed checkpoint reads construct data only (see the module docstring)."""
    import torch.distributed.checkpoint.filesystem as fs
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    with _lock:
        saved = fs.pickle, DefaultLoadPlanner.load_bytes
        fs.pickle = _safe_pickle_module(f"{Path(directory) / '.metadata'}")
        DefaultLoadPlanner.load_bytes = _load_bytes_weights_only
        try:
            yield
        finally:
            fs.pickle, DefaultLoadPlanner.load_bytes = saved


def _last_line(e: BaseException) -> str:
    # torch's CheckpointException carries each rank's traceback: its last line is the message
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def load_dist_checkpoint(sharded: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``dist_checkpointing.load`` under :func:`no_code_execution`; failures as one line naming the directory."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with no_code_execution(directory), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # megatron calls torch's deprecated ShardedTensor APIs
            return dist_checkpointing.load(sharded, str(directory))
    except UnsafeCheckpoint:
        raise
    except CheckpointException as e:
        if "refuse" in str(e):
            raise UnsafeCheckpoint(f"{directory}: {_last_line(e)}") from None
        raise CheckpointLoadError(f"{directory}: cannot read the distributed checkpoint ({_last_line(e)})") from None
    except (CheckpointingException, KeyError, RuntimeError, EOFError, OSError, pickle.UnpicklingError,
            AssertionError) as e:
        if "refuses to unpickle" in str(e):  # megatron re-raises our refusal of .metadata as an AssertionError
            raise UnsafeCheckpoint(str(e)[str(e).index(str(Path(directory))):]) from None
        raise CheckpointLoadError(f"{directory}: cannot read the distributed checkpoint ({type(e).__name__}: "
                                  f"{_last_line(e)})") from None


def check_image_set_loaded(missing: Iterable[str], unexpected: Iterable[str], where: Path,
                           wanted: Optional[Iterable[str]] = None) -> None:
    """Every wanted parameter (default: the image set) came from the checkpoint, and nothing unknown did."""
    from lmfusion.model.weights import is_image_param

    wanted = None if wanted is None else set(wanted)
    missing = sorted(k for k in missing if (is_image_param(k) if wanted is None else k in wanted))
    unexpected = sorted(unexpected)
    if missing:
        raise CheckpointLoadError(f"{where}: parameters {missing[:3]} expected in the checkpoint, found missing "
                                  f"({len(missing)} in all)")
    if unexpected:
        raise CheckpointLoadError(f"{where}: keys {unexpected[:3]} found in the checkpoint, expected none that the "
                                  f"model does not have ({len(unexpected)} in all)")


def load_image_set(model: torch.nn.Module, iter_dir: Path, prefix: str = "") -> None:
    """The trained image set from a training iteration's dist checkpoint (megatron reshards it to this TP size)."""
    sharded = model.sharded_state_dict(prefix=prefix)
    loaded = load_dist_checkpoint(sharded, iter_dir)
    state = {k[len(prefix):]: loaded[k] for k in sharded if k in loaded}  # not the common state (optimizer groups)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the image set, and the text set of a run whose text trained (the model's ``saves_text``)
    wanted = [n for n, _ in model.named_parameters() if f"{prefix}{n}" in sharded]
    check_image_set_loaded(missing, unexpected, iter_dir, wanted)
