"""Multimodal training data: latent shard sets -> packed text+image micro-batches (see ``loader.py``).

    loader = MultimodalLoader.from_parallel_state(data_config, model_config)
    batch = next(loader)                          # lmfusion.data.Batch
    inputs = batch.to_model_inputs(x_t, t)        # lmfusion.model.model.ModelInputs
    state = loader.state_dict()                   # JSON; a collective over the data-parallel group
    loader.load_state_dict(state)                 # exact resume (rules in loader.py)
"""

from lmfusion.data.batch import Batch, collate
from lmfusion.data.config import DataConfig
from lmfusion.data.loader import STATE_FORMAT, MultimodalLoader, merge_states
from lmfusion.data.sequence import IGNORE_INDEX, Document, Packer, SequenceBuilder, row_arrays
from lmfusion.data.shards import ShardError, ShardSet, read_shard
from lmfusion.data.stream import DataError

__all__ = ["Batch", "collate", "DataConfig", "MultimodalLoader", "merge_states", "STATE_FORMAT", "IGNORE_INDEX",
           "Document", "Packer", "SequenceBuilder", "row_arrays", "ShardError", "ShardSet", "read_shard",
           "DataError"]
