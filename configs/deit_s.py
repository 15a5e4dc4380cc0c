"""DeiT-S/16 on ImageNet-1k: the whole compression pipeline.

    python -m vitjax.main --config=configs/deit_s.py --workdir=runs/deit_s \
        --config.data.data_dir=$TFDS_DATA_DIR

Dense DeiT-S/16 is 4.6 GMACs and reaches 79.8% top-1 (DeiT paper) with this recipe (Table 7 of the
compression paper: AdamW, lr 5e-4 x batch/512, 300 epochs, warmup 5, cosine, weight decay
0.05, label smoothing 0.1, stochastic depth 0.1, mixup 0.8, cutmix 1.0, random erasing 0.25,
RandAugment m9). The supernet is trained over policies at the FLOPs budget (default 60% of
dense, the
paper's 40% reduction; `--config=configs/deit_s.py:flops=0.4` for 60% fewer FLOPs), then the
search (population 100, 100 GP iterations, 50 hold-out images per class), prune, finetune,
export and report stages run. To start from
the released weights add --config.init.checkpoint=deit_..._patch16_224.pth.
"""

from vitjax.configs import deit_imagenet_config, parse_arg


def get_config(arg: str | None = None):
    """arg: comma-separated 'distilled' (class + distillation token) and 'flops=F' (the FLOPs
    budget as a fraction of dense: 0.63, 0.6 or 0.4 for the paper's 37%, 40%, 60% cuts)."""
    return deit_imagenet_config("S/16", **parse_arg(arg))
