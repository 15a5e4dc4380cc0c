"""Fig. 1 of the paper: pruned accuracy (no finetuning) vs pruning ratio, per dimension and
criterion.

Each dimension (neuron / head / token) is pruned alone, with the same ratio in every layer,
by masks on the dense model; the other dimensions stay whole. Criteria: HSIC (Eq. 2), random,
and the dimension's conventional baseline (neurons: fc1 weight magnitude; heads: SpAtten head
importance; tokens: per-image class-token attention).

    python -m vitjax.scoring.sweep --workdir=runs/fig1_digits

trains a small dense ViT on scikit-learn's digits (300 AdamW steps, 1.5-3 min on two shared CPU
cores; saved to workdir/dense_params so a rerun skips it) unless `--checkpoint` gives
parameters (an orbax checkpoint of the dense model, with `--model_config` its ViTConfig JSON),
then writes fig1.md, fig1.csv, fig1.json, fig1.png (about 2.5 more minutes). The pipeline calls
`run_criteria_sweep` directly with its supernet.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models.config import ViTConfig
from vitjax.models.vit import ViT, init_params
from vitjax.pruning.masks import Ranks, identity_ranks, masks_from_ranks, ranks_from_scores
from vitjax.pruning.policy import KeepCounts, Policy
from vitjax.scoring import criteria
from vitjax.scoring.scores import ScoreConfig, score_model

RATIOS = tuple(round(0.1 * i, 1) for i in range(10))
# criterion -> (name in the table, token selection mode)
DIMENSION_CRITERIA = {
    "neuron": ("hsic", "random", "magnitude"),
    "head": ("hsic", "random", "spatten"),
    "token": ("hsic", "random", "attn-prob"),
}

DIGITS_MODEL = ViTConfig(
    num_classes=10, image_size=32, patch_size=4, in_chans=3, embed_dim=96, depth=4,
    num_heads=6, mlp_dim=384,
)


def train_digits_vit(config: ViTConfig = DIGITS_MODEL, *, steps: int = 300, batch: int = 64,
                     learning_rate: float = 1e-3, seed: int = 0):
    """A dense ViT trained briefly on digits (a stand-in until the pretrain stage exists)."""
    import optax

    from vitjax.data.digits import digits_splits

    images, labels = digits_splits(config.image_size, seed=seed)["train"]
    model = ViT(config)
    params = init_params(model, jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 10, steps)
    optimizer = optax.adamw(schedule, weight_decay=0.05)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(images), batch, replace=False)
        params, opt_state, _ = step(params, opt_state, images[idx], labels[idx])
    return params


def _accuracy_fn(model: ViT):
    @jax.jit
    def correct(params, images, labels, masks):
        logits, _ = model.apply({"params": params}, images, masks=masks)
        return jnp.sum(jnp.argmax(logits, -1) == labels)

    def accuracy(params, images, labels, masks, batch: int = 512):
        hits = sum(
            int(correct(params, images[i:i + batch], labels[i:i + batch], masks))
            for i in range(0, len(images), batch)
        )
        return hits / len(images)

    return accuracy


def criterion_ranks(model: ViT, params, images, *, score_config: ScoreConfig, seed: int = 0):
    """Ranks of every criterion: {'hsic'|'random'|'magnitude'|'spatten': Ranks}."""
    config = model.config
    hsic = score_model(model, params, images, config=score_config)
    _, aux = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    rand = criteria.random_scores(config, jax.random.key(seed))
    base = identity_ranks(config)
    return {
        "hsic": hsic.ranks(),
        "random": rand.ranks(),
        "magnitude": dataclasses.replace(
            base, neuron=ranks_from_scores(criteria.magnitude_neuron_scores(params, config))),
        "spatten": dataclasses.replace(
            base, head=ranks_from_scores(criteria.spatten_head_scores(aux))),
        "attn-prob": base,  # tokens chosen per image inside the model
    }


def run_criteria_sweep(
    model: ViT, params, score_images, eval_images, eval_labels, out_dir: str | None = None, *,
    ratios=RATIOS, score_config: ScoreConfig | None = None, extra_hsic: dict | None = None,
    seed: int = 0, file_stem: str = "fig1",
) -> list[dict]:
    """Accuracy of every (dimension, criterion, ratio); writes the table/plot into out_dir.

    extra_hsic: {'label': ScoreConfig} adds HSIC variants (e.g. other bandwidths) as criteria.
    Writes {file_stem}.md/.csv/.json/.png. Returns rows {'dimension', 'criterion', 'ratio',
    'accuracy'}.
    """
    config = model.config
    score_config = score_config or ScoreConfig()
    ranks = criterion_ranks(model, params, score_images, score_config=score_config, seed=seed)
    dimension_criteria = {d: list(c) for d, c in DIMENSION_CRITERIA.items()}
    added = 0
    for label, extra_config in (extra_hsic or {}).items():
        if extra_config == score_config:
            continue  # the same ranking as 'hsic'
        ranks[label] = score_model(model, params, score_images, config=extra_config).ranks()
        added += 1
        for names in dimension_criteria.values():
            names.insert(added, label)
    accuracy = _accuracy_fn(model)
    eval_images, eval_labels = jnp.asarray(eval_images), jnp.asarray(eval_labels)

    # Keep counts are traced: one compilation per token mode serves every ratio.
    @functools.partial(jax.jit, static_argnames="token_mode")
    def make_masks(ranks, neuron, head, token, token_mode):
        return masks_from_ranks(config, ranks, KeepCounts(neuron, head, token), token_mode)

    rows = []
    for dimension, names in dimension_criteria.items():
        for name in names:
            token_mode = "attention" if name == "attn-prob" else "static"
            criterion_ranks_ = ranks[name]
            if criterion_ranks_.token is None:
                criterion_ranks_ = Ranks(criterion_ranks_.head, criterion_ranks_.neuron,
                                         identity_ranks(config).token)
            for ratio in ratios:
                keep = Policy.uniform(config.depth, **{dimension: ratio}).keep_counts(config)
                masks = make_masks(criterion_ranks_, keep.neuron, keep.head, keep.token,
                                   token_mode=token_mode)
                acc = accuracy(params, eval_images, eval_labels, masks)
                rows.append(dict(dimension=dimension, criterion=name, ratio=ratio,
                                 accuracy=acc))
    if out_dir is not None:
        used = {r["criterion"] for r in rows}
        described = {label: c for label, c in {"hsic": score_config, **(extra_hsic or {})}.items()
                     if label in used}
        notes = [f"- {label}: {_describe(c)}" for label, c in described.items()]
        notes += [f"- random: one uniform draw (seed {seed}); magnitude: L2 norm of each "
                  "neuron's fc1 weights; spatten: mean |head output|; attn-prob: per-image "
                  "top-k by class-token attention (Masks.token_keep)",
                  f"- scored on {len(score_images)} images; accuracy on {len(eval_images)}; "
                  "tokens: ratio of the surviving patches removed at every layer (compounding)"]
        write_sweep(rows, out_dir, notes, file_stem)
    return rows


def _describe(config: ScoreConfig) -> str:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    shown = ("sigma_mode", "sigma", "sigmas", "output_kernel", "output_sigma", "estimator")
    if fields["sigma_mode"] != "multi":
        shown = tuple(f for f in shown if f != "sigmas")
    if fields["output_kernel"] == "linear":
        shown = tuple(f for f in shown if f != "output_sigma")
    return ", ".join(f"{f}={fields[f]}" for f in shown)


def write_sweep(rows: list[dict], out_dir: str, notes: list[str] = (),
                file_stem: str = "fig1") -> None:
    """{file_stem}.csv, .json, .md (one table per dimension) and .png."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{file_stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dimension", "criterion", "ratio", "accuracy"])
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, f"{file_stem}.json"), "w") as f:
        json.dump(rows, f, indent=1)

    dimensions = list(dict.fromkeys(r["dimension"] for r in rows))
    ratios = sorted({r["ratio"] for r in rows})
    lines = ["# Fig. 1: accuracy without finetuning vs uniform pruning ratio (one dimension)", "",
             *notes, "", "Accuracy in %; columns are the pruning ratio applied to every layer.",
             ""]
    for dimension in dimensions:
        names = list(dict.fromkeys(r["criterion"] for r in rows if r["dimension"] == dimension))
        lines += [f"## {dimension}", "",
                  "| criterion | " + " | ".join(f"{r:.1f}" for r in ratios) + " |",
                  "|---" * (len(ratios) + 1) + "|"]
        for name in names:
            acc = {r["ratio"]: r["accuracy"] for r in rows
                   if r["dimension"] == dimension and r["criterion"] == name}
            lines.append(f"| {name} | " + " | ".join(
                f"{100 * acc[r]:.1f}" if r in acc else "" for r in ratios) + " |")
        lines.append("")
    with open(os.path.join(out_dir, f"{file_stem}.md"), "w") as f:
        f.write("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dimensions), figsize=(4.5 * len(dimensions), 3.6),
                             squeeze=False)
    for ax, dimension in zip(axes[0], dimensions, strict=True):
        for name in dict.fromkeys(r["criterion"] for r in rows if r["dimension"] == dimension):
            pts = sorted((r["ratio"], r["accuracy"]) for r in rows
                         if r["dimension"] == dimension and r["criterion"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
        ax.set_title(f"{dimension} pruning")
        ax.set_xlabel("pruning ratio (every layer)")
        ax.set_ylabel("accuracy (no finetuning)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{file_stem}.png"), dpi=120)
    plt.close(fig)


def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    del argv
    from vitjax.data.digits import digits_splits

    model_config = DIGITS_MODEL
    if FLAGS.model_config:
        with open(FLAGS.model_config) as f:
            model_config = ViTConfig.from_json(f.read())
    model = ViT(model_config)
    start = time.time()
    import orbax.checkpoint as ocp

    trained = os.path.abspath(os.path.join(FLAGS.workdir, "dense_params"))
    if FLAGS.checkpoint or os.path.exists(trained):
        checkpointer = ocp.StandardCheckpointer()
        params = checkpointer.restore(os.path.abspath(FLAGS.checkpoint or trained))
        params = params.get("params", params)
    else:
        params = train_digits_vit(model_config, steps=FLAGS.train_steps, seed=FLAGS.seed)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(trained, params)  # a rerun skips training
        checkpointer.wait_until_finished()
    print(f"model ready in {time.time() - start:.1f}s")
    splits = digits_splits(model_config.image_size, seed=FLAGS.seed)
    train_images = splits["train"][0]
    idx = np.random.default_rng(FLAGS.seed).choice(len(train_images), FLAGS.score_batch,
                                                   replace=False)
    score_config = ScoreConfig(sigma_mode=FLAGS.sigma_mode, sigma=FLAGS.sigma,
                               output_kernel=FLAGS.output_kernel, estimator=FLAGS.estimator)
    extra = {}
    if FLAGS.hsic_variants:
        extra = {
            "hsic-paper": ScoreConfig.paper(),
            "hsic-median": ScoreConfig(sigma_mode="median"),
            "hsic-authors": ScoreConfig.authors_code(),
        }
    rows = run_criteria_sweep(model, params, jnp.asarray(train_images[idx]), *splits["test"],
                              FLAGS.workdir, score_config=score_config, extra_hsic=extra,
                              seed=FLAGS.seed)
    dense = next(r["accuracy"] for r in rows if r["ratio"] == 0.0)
    print(f"dense test accuracy {100 * dense:.1f}%; wrote {FLAGS.workdir}/fig1.md "
          f"(total {time.time() - start:.1f}s)")
    with open(os.path.join(FLAGS.workdir, "fig1.md")) as f:
        print(f.read())


def _define_flags():
    from absl import flags

    flags.DEFINE_string("workdir", "runs/fig1_digits", "where fig1.{md,csv,json,png} go")
    flags.DEFINE_string("checkpoint", None, "orbax checkpoint of dense params (else: train)")
    flags.DEFINE_string("model_config", None, "ViTConfig JSON of --checkpoint's model")
    flags.DEFINE_integer("train_steps", 300, "AdamW steps when training the stand-in model")
    flags.DEFINE_integer("score_batch", 256, "images the HSIC scores are computed on")
    flags.DEFINE_integer("seed", 0, "data split, training and random-criterion seed")
    default = ScoreConfig()
    flags.DEFINE_enum("sigma_mode", default.sigma_mode, ["fixed", "median", "multi"],
                      "HSIC feature-kernel bandwidth rule")
    flags.DEFINE_float("sigma", default.sigma, "HSIC bandwidth (fixed) or median multiplier")
    flags.DEFINE_enum("output_kernel", default.output_kernel, ["gaussian", "linear"],
                      "kernel over the softmax outputs")
    flags.DEFINE_enum("estimator", default.estimator, ["biased", "unbiased"], "HSIC estimator")
    flags.DEFINE_bool("hsic_variants", True,
                      "also rank by the paper's sigma=1, median-bandwidth and authors'-code HSIC")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
