"""kvjax.train: training the trainable parts of compressors (Locret's retaining heads, DuoAttention's gates) on a
frozen backbone with optax, checkpointed with orbax. See :mod:`kvjax.train.loop` (TrainState, optimizer, jitted
step, data-parallel mesh), :mod:`kvjax.train.checkpoint`, :mod:`kvjax.train.data` and :mod:`kvjax.train.run` (the
launch integration)."""
from kvjax.train.checkpoint import CheckpointError, Checkpointer, fingerprint, load_artifact, save_artifact
from kvjax.train.data import Batches, DataConfig
from kvjax.train.loop import TrainState, data_mesh, eval_loss, make_optimizer, make_schedule, make_train_step

__all__ = ["Batches", "CheckpointError", "Checkpointer", "DataConfig", "TrainState", "data_mesh", "eval_loss",
           "fingerprint", "load_artifact", "make_optimizer", "make_schedule", "make_train_step", "save_artifact"]
