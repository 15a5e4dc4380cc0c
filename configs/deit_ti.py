"""DeiT-Ti/16 on ImageNet-1k: supernet pretraining, HSIC scores and the criteria comparison.

    python -m vitjax.main --config=configs/deit_ti.py --workdir=runs/deit_ti \
        --config.data.data_dir=$TFDS_DATA_DIR

Dense DeiT-Ti/16 is 1.3 GMACs and reaches 72.2% top-1 (DeiT paper) with this recipe (Table 7 of the
compression paper: AdamW, lr 5e-4 x batch/512, 300 epochs, warmup 5, cosine, weight decay
0.05, label smoothing 0.1, stochastic depth 0.1, mixup 0.8, cutmix 1.0, random erasing 0.25,
RandAugment m9). The supernet is trained over policies at 60% of the dense FLOPs. To start from
the released weights add --config.init.checkpoint=deit_..._patch16_224.pth.
"""

from vitjax.configs import deit_imagenet_config


def get_config(arg: str | None = None):
    """arg 'distilled' selects the distilled DeiT (class + distillation token)."""
    return deit_imagenet_config("Ti/16", distilled=arg == "distilled")
