"""DeiT-S/16 on ImageNet-1k: the whole compression pipeline.

    python -m vitjax.main --config=configs/deit_s.py --workdir=runs/deit_s \
        --config.data.data_dir=$TFDS_DATA_DIR

Dense DeiT-S/16 is 4.6 GMACs and reaches 79.8% top-1 (DeiT paper) with this recipe (Table 7 of the
compression paper: AdamW, lr 5e-4 x batch/512, 300 epochs, warmup 5, cosine, weight decay 0.05,
label smoothing 0.1, stochastic depth 0.1, mixup 0.8, cutmix 1.0, random erasing 0.25, RandAugment
m9). The supernet is trained over policies at the FLOPs budget (default 60% of dense, the paper's
40% reduction), then every stage runs: HSIC scores, the criteria comparison, the search (population
100, 100 GP iterations, 50 hold-out images per class), the dimension ablation and the budgets of
the accuracy-vs-FLOPs front (20 + 20 evaluations each), prune, finetune, export and the report. The
paper reaches 79.9% at 37% fewer FLOPs (`:flops=0.63`) and 79.3% at 60% fewer (Tables 1 and 4);
`:expand=2` is its Table 2 row (82.1% at 4.6 GMACs).

Config arguments (comma-separated, e.g. `--config=configs/deit_s.py:flops=0.4,compare`):
`flops=F` the budget as a fraction of dense (0.63, 0.6, 0.4: the paper's 37%, 40%, 60% cuts);
`expand=W` expand-then-compress; `compare` also trains DynamicViT, block pruning and block +
token at the pruned model's FLOPs; `distilled` adds the distillation token; `init=CHECKPOINT`
compresses a trained model (below); `scratch` (the default) is the paper's recipe above.

Compress the released weights (the main road):

    python -m vitjax.main --config=configs/deit_s.py:init=deit_small_patch16_224.pth \
        --workdir=runs/deit_s_pretrained --config.data.data_dir=$TFDS_DATA_DIR

The supernet starts from the checkpoint and trains 30 epochs (lr 2.5e-4 x batch/512, 2 warmup
epochs) with the frozen dense model as teacher (logit KL, weight 0.5, T = 1); the pruned model is
finetuned 10 epochs (lr 5e-5 x batch/512) from the same teacher; the `baseline` stage trains the
same policy cut from the dense model for 40 epochs without a supernet. Estimated cost (not
measured): about 41 V100-hours in all, 25 without the baseline stage (DeiT's reported
training time, about 0.44 V100-hours per DeiT-S epoch, times about 93 epoch-equivalents:
a supernet epoch with the teacher costs about 1.2 dense epochs (the teacher x1.16,
measured), a finetuning or baseline epoch about 0.93, search, ablation and criteria
about 10), against about 130 V100-hours for the
300 epochs from scratch; roughly a third of the hours on A100s.
"""

from vitjax.configs import deit_imagenet_config, parse_arg


def get_config(arg: str | None = None):
    """arg: see the module docstring ('flops=F', 'expand=W', 'compare', 'distilled')."""
    return deit_imagenet_config("S/16", **parse_arg(arg))
