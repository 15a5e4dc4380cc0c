"""Training: supernet pretraining with sampled policies, finetuning, optimizer, checkpoints."""

from vitjax.data.mixup import MixConfig
from vitjax.training.batches import ArrayBatches, StepBatches
from vitjax.training.checkpoint import Checkpointer, CheckpointError, PreemptionWatch
from vitjax.training.config import (
    default_distributed_config,
    default_mesh_config,
    default_train_config,
    deit_train_config,
)
from vitjax.training.losses import classification_loss
from vitjax.training.optim import make_optimizer, weight_decay_mask
from vitjax.training.steps import StepConfig, TrainState, train_step
from vitjax.training.supernet import PolicySampler, fixed_eval_policies
from vitjax.training.train import Trainer, TrainResult, train

__all__ = [
    "ArrayBatches", "StepBatches", "Checkpointer", "CheckpointError", "PreemptionWatch",
    "deit_train_config",
    "default_distributed_config", "default_mesh_config", "default_train_config",
    "make_optimizer", "weight_decay_mask", "PolicySampler", "fixed_eval_policies", "Trainer",
    "TrainResult", "TrainState", "MixConfig", "StepConfig", "classification_loss", "train",
    "train_step",
]
