"""Config blocks of the trainer: `config.train`, `config.mesh`, `config.distributed`.

configs/*.py compose these, e.g. `config.train = deit_train_config('B/16')`.
"""

from __future__ import annotations

import ml_collections

IMAGENET_TRAIN_IMAGES = 1_281_167


def default_train_config() -> ml_collections.ConfigDict:
    """Trainer defaults (small: digits on a laptop CPU); every key documented."""
    c = ml_collections.ConfigDict()
    c.steps = 1000  # optimizer steps in total
    c.batch_size = 128  # global batch over all hosts/devices
    c.eval_batch_size = 256  # global batch of the periodic evaluation
    c.lr = 1e-3  # peak learning rate (after warmup), scaled by batch_size / lr_base_batch
    c.lr_base_batch = ml_collections.config_dict.placeholder(int)  # None: lr is absolute
    c.min_lr = 1e-5  # end of the cosine decay (DeiT min_lr)
    c.warmup_lr = 1e-6  # start of the linear warmup (DeiT warmup_lr)
    c.warmup_steps = 50
    c.weight_decay = 0.05  # AdamW, not on biases, norms, tokens and position embeddings
    c.b1 = 0.9
    c.b2 = 0.999
    c.label_smoothing = 0.1
    c.grad_clip = ml_collections.config_dict.placeholder(float)  # global-norm clip; None: off
    c.drop_path = 0.1  # stochastic depth at the last block
    c.seed = 0  # parameters, dropout and policy sampling all derive from it
    # Knowledge distillation from the frozen dense teacher (config.init.checkpoint; the finetune
    # stage falls back to the dense supernet without one): loss = (1 - distill) x cross-entropy
    # + distill x T^2 KL(teacher || student) at temperature T. 0: off (the paper's recipe).
    c.distill = 0.0
    c.temperature = 1.0
    # Supernet (Eq. 5): one policy from U_T per step, applied as masks.
    c.sample_policies = True  # False (or a pruned model): plain training, e.g. finetuning
    c.sandwich = False  # also train the dense and the smallest sub-network every step
    c.target_gmacs = ml_collections.config_dict.placeholder(float)  # T; None: no constraint
    c.target_tol = ml_collections.config_dict.placeholder(float)  # sample GMACs in [T(1-tol), T]
    c.token_mode = "attention"  # 'attention' (per image, by class attention) | 'static'
    c.score_every = 0  # refresh ranks with rank_fn every N steps; 0: only at the start
    # Bookkeeping; these may change between a run and its resumption.
    c.log_every = 50
    c.eval_every = 500  # 0: only at the end
    c.ckpt_every = 500
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    # Resume a run with these optimisation keys changed (comma-separated, e.g. 'lr' after the
    # loss diverged); any other change to a run's configuration is refused on resume.
    c.resume_overrides = ""
    return c


def default_mesh_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = -1  # -1: all devices not used by 'model'
    c.model = 1  # tensor parallelism over heads and FFN hidden units
    c.fsdp = False  # also shard parameters and optimizer state over 'data'
    c.fsdp_min_size = 2**18  # arrays smaller than this stay replicated under FSDP
    return c


def default_distributed_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # None: initialise when the environment shows several processes (SLURM, TPU pod, launch/).
    c.initialize = ml_collections.config_dict.placeholder(bool)
    c.coordinator_address = ml_collections.config_dict.placeholder(str)  # 'host:port'
    c.num_processes = ml_collections.config_dict.placeholder(int)
    c.process_id = ml_collections.config_dict.placeholder(int)
    return c


def deit_train_config(
    variant: str = "B/16", *, finetune: bool = False
) -> ml_collections.ConfigDict:
    """The DeiT recipe of the paper's Table 7 (ImageNet-1k, 300 epochs).

    AdamW, lr 5e-4 per 512 images (1e-3 at batch 1024), 5 warmup epochs, cosine decay, weight
    decay 0.05, label smoothing 0.1, stochastic depth 0.1, no dropout, no gradient clipping.
    The data-side part of Table 7 (Mixup 0.8, CutMix 1.0, random erasing 0.25, RandAugment
    rand-m9-mstd0.5-inc1) belongs to `config.data`. Finetuning the pruned model uses the same
    recipe (Sec. 4: "finetuned following the same training strategy"), without sampling.
    """
    del variant  # the recipe is the same for Ti/S/B; kept for symmetry with the model configs
    c = default_train_config()
    c.batch_size = 1024
    c.lr = 5e-4
    c.lr_base_batch = 512
    c.min_lr = 1e-5
    c.warmup_lr = 1e-6
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.batch_size
    c.steps = 300 * steps_per_epoch
    c.warmup_steps = 5 * steps_per_epoch
    c.weight_decay = 0.05
    c.label_smoothing = 0.1
    c.drop_path = 0.1
    c.grad_clip = None
    c.eval_batch_size = 1024
    c.log_every = 100
    c.eval_every = 5 * steps_per_epoch
    c.ckpt_every = 1000
    c.keep_checkpoints = 3
    c.sample_policies = not finetune
    return c
