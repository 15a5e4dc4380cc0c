"""Fig. 1 of the paper: pruned accuracy (no finetuning) vs pruning ratio, per dimension and
criterion.

Each dimension (neuron / head / token) is pruned alone, with the same ratio in every layer,
by masks on the supernet; the other dimensions stay whole. Criteria: HSIC (Eq. 2), random,
and the dimension's conventional baseline (neurons: fc1 weight magnitude; heads: SpAtten head
importance; tokens: per-image class-token attention). The `criteria` pipeline stage runs it:

    python -m vitjax.main --config=configs/digits.py --workdir=runs/digits \
        --config.stages=pretrain,score,criteria

Accuracy comes from the shared evaluator (`vitjax.evaluate`), streamed over the evaluation set.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable

import jax

from vitjax import workdir
from vitjax.evaluate import evaluate
from vitjax.models.vit import ViT
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
    model: ViT, params, score_images, eval_batches: Callable[[], Iterable[dict]], mesh,
    out_dir=None, *, ratios=RATIOS, score_config: ScoreConfig | None = None,
    extra_hsic: dict | None = None, seed: int = 0, file_stem: str = "fig1",
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Accuracy of every (dimension, criterion, ratio); writes the table/plot into out_dir.

    eval_batches() returns a fresh pass over this process's padded evaluation batches
    (`Datasets.eval_batches`, `vitjax.evaluate.array_batches`); mesh: where they are sharded.
    extra_hsic: {'label': ScoreConfig} adds HSIC variants (e.g. other bandwidths) as criteria.
    Writes {file_stem}.md/.csv/.json/.png (out_dir: local or gs://; None writes nothing).
    Returns rows {'dimension', 'criterion', 'ratio', 'accuracy'}. progress: called with a
    line after each (dimension, criterion) curve.
    """
    config = model.config
    score_config = score_config or ScoreConfig()
    ranks = criterion_ranks(model, params, score_images, score_config=score_config, seed=seed)
    dimension_criteria = {d: list(c) for d, c in DIMENSION_CRITERIA.items()}
    if not config.class_token:
        # Per-image selection by class attention needs a class token (vitjax.pruning.masks).
        dimension_criteria["token"].remove("attn-prob")
    added = 0
    for label, extra_config in (extra_hsic or {}).items():
        if extra_config == score_config:
            continue  # the same ranking as 'hsic'
        ranks[label] = score_model(model, params, score_images, config=extra_config).ranks()
        added += 1
        for names in dimension_criteria.values():
            names.insert(added, label)
    evaluated = 0

    # Keep counts are traced: one compilation per token mode serves every ratio.
    @functools.partial(jax.jit, static_argnames="token_mode")
    def make_masks(ranks, neuron, head, token, token_mode):
        return masks_from_ranks(config, ranks, KeepCounts(neuron, head, token), token_mode)

    rows = []
    curves = sum(len(names) for names in dimension_criteria.values())
    started = time.perf_counter()
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
                result = evaluate(model, params, masks, eval_batches(), mesh)
                evaluated = result["count"]
                rows.append(dict(dimension=dimension, criterion=name, ratio=ratio,
                                 accuracy=result["accuracy"]))
            if progress is not None:
                done = len(rows) // len(ratios)
                spent = time.perf_counter() - started
                progress(f"{dimension}/{name} ({done}/{curves} curves), {spent:.0f}s, "
                         f"eta {spent / done * (curves - done):.0f}s")
    if out_dir is not None:
        used = {r["criterion"] for r in rows}
        described = {label: c for label, c in {"hsic": score_config, **(extra_hsic or {})}.items()
                     if label in used}
        notes = [f"- {label}: {_describe(c)}" for label, c in described.items()]
        notes += [f"- random: one uniform draw (seed {seed}); magnitude: L2 norm of each "
                  "neuron's fc1 weights; spatten: mean |head output|; attn-prob: per-image "
                  "top-k by class-token attention (Masks.token_keep)",
                  f"- scored on {len(score_images)} images; accuracy on {evaluated}; "
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


def write_sweep(rows: list[dict], out_dir, notes: list[str] = (),
                file_stem: str = "fig1") -> None:
    """{file_stem}.csv, .json, .md (one table per dimension) and .png, into out_dir."""
    out = workdir.epath.Path(out_dir)
    workdir.write_csv(out / f"{file_stem}.csv", rows,
                      ["dimension", "criterion", "ratio", "accuracy"])
    workdir.write_json(out / f"{file_stem}.json", rows)

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
    workdir.write_text(out / f"{file_stem}.md", "\n".join(lines))

    plt = workdir.pyplot()
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
    workdir.save_figure(fig, out / f"{file_stem}.png")
