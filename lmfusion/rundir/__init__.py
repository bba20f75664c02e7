"""The run directory: one module owns its contract.

* :mod:`~lmfusion.rundir.layout`: names, JSON files, ``latest`` resolution and repair, the base reference and its hash,
  the checkpoint record and train state.
* :mod:`~lmfusion.rundir.integrity`: ``integrity.json``, sha256 and size of every checkpoint file; verified at load.
* :mod:`~lmfusion.rundir.digest`: sha256 of files in parallel, while they are written, and cached for the base.
* :mod:`~lmfusion.rundir.save`: the save protocol both engines follow (tmp directory, hashes, record last, rename,
  ``latest``, pruning).
* :mod:`~lmfusion.rundir.lock`: one training per run directory.
* :mod:`~lmfusion.rundir.trust`: reading distributed checkpoints without running code; the image-set load.
* :mod:`~lmfusion.rundir.export`: the export, the shareable form (safetensors + JSON), and its loader (written by
  ``lmfusion export-ckpt``: :mod:`lmfusion.inference.export`).

Trainer, both engines, inference, evaluation and export use these; nothing else reads or writes these files.
"""

from lmfusion.rundir.integrity import INTEGRITY, IntegrityError
from lmfusion.rundir.layout import (CHECKPOINT_JSON, CONFIG, LATEST, RECORD_FORMAT, STATE_FORMAT, STATE_VERSION,
                                    TRAIN_STATE, base_files, base_sha256, check_base, complete_iterations,
                                    find_checkpoint, is_complete, iter_name, read_json, read_record, read_train_state,
                                    resolve_base)
from lmfusion.rundir.lock import LOCK, RunLock, RunLocked
from lmfusion.rundir.save import (CheckpointWriteError, begin_save, describe_write_error, finish_save, prune,
                                  write_guard)
from lmfusion.rundir.trust import CheckpointLoadError, UnsafeCheckpoint, load_dist_checkpoint, load_image_set

__all__ = ["CHECKPOINT_JSON", "CONFIG", "LATEST", "RECORD_FORMAT", "STATE_FORMAT", "STATE_VERSION", "TRAIN_STATE",
           "INTEGRITY", "LOCK", "IntegrityError", "RunLock", "RunLocked", "CheckpointLoadError", "UnsafeCheckpoint",
           "base_files", "base_sha256", "check_base", "complete_iterations", "find_checkpoint", "is_complete",
           "iter_name", "read_json", "read_record", "read_train_state", "resolve_base", "begin_save", "finish_save",
           "prune", "load_dist_checkpoint", "load_image_set", "CheckpointWriteError", "write_guard",
           "describe_write_error"]
