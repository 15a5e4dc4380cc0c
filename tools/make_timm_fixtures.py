"""Writes the timm golden fixtures that tests/test_interop.py checks vitjax against.

  python tools/make_timm_fixtures.py [--out tests/fixtures/timm]
  python tools/make_timm_fixtures.py --measure   # max |vitjax - timm| logits, fixtures + full size

Needs torch + timm (no downloads: every model is a seeded random init with tiny dimensions).
For each case it writes
  <case>.safetensors  the timm state dict (what load_timm reads)
  <case>.npz          'images' [B, H, W, 3] float32 (NHWC, the vitjax layout) and timm's
                      'logits' on them (eval mode)
and manifest.json with the timm model name, its kwargs and what load_timm needs to be told.

Newer timm families (DeiT-III LayerScale, average pooling with fc_norm, no class token, register
tokens) are timm cases like the others. The JAX .npz cases (AugReg = google-research/
vision_transformer, big_vision; class token or GAP) go the other way round: a random checkpoint
in that layout is written with numpy as <case>_weights.npz, timm's own `_load_weights` loads it,
and the fixture keeps timm's logits and, as <case>.safetensors, the state dict timm made of it.
Every weight is perturbed with Gaussian noise after timm's init, because timm zero-initialises
some tensors (biases, the classifier, sometimes the tokens): with zeros there a wrong mapping
could still reproduce the logits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# case -> timm name, timm kwargs, load_timm kwargs (which image size to run at, heads, ...).
CASES = {
    # Plain DeiT, 1000 classes, 64 px with 16 px patches, head_dim 16.
    "deit_c1000_64px": dict(
        timm="deit_tiny_patch16_224",
        kwargs=dict(embed_dim=32, depth=2, num_heads=2, img_size=64),
        load=dict(num_heads=2),
    ),
    # Distilled DeiT (VisionTransformerDistilled): dist token + head_dist, 10 classes.
    "deit_distilled_c10_32px": dict(
        timm="deit_tiny_distilled_patch16_224",
        kwargs=dict(embed_dim=32, depth=2, num_heads=4, patch_size=8, img_size=32, num_classes=10),
        load=dict(num_heads=4),
    ),
    # Headless ViT: logits are the final-norm class token.
    "vit_headless_16px": dict(
        timm="vit_tiny_patch16_224",
        kwargs=dict(embed_dim=24, depth=1, num_heads=3, patch_size=4, img_size=16, num_classes=0),
        load=dict(num_heads=3),
    ),
    # Checkpoint trained at 32 px, run at 48 px: timm resamples pos_embed while loading.
    "deit_resample_32to48px": dict(
        timm="deit_tiny_patch16_224",
        kwargs=dict(embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=32, num_classes=7),
        run_img_size=48,
        load=dict(num_heads=2, image_size=48),
    ),
}
CASES.update({
    # DeiT-III: LayerScale (ls1/ls2 gamma), position embedding without the class token.
    "deit3_c10_32px": dict(
        timm="deit3_small_patch16_224",
        kwargs=dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, num_classes=10),
        load=dict(num_heads=2),
    ),
    # No class token, global average pooling, fc_norm after pooling (timm's default for 'avg').
    "vit_gap_fcnorm_c5_32px": dict(
        timm="vit_tiny_patch16_224",
        kwargs=dict(embed_dim=24, depth=2, num_heads=3, patch_size=8, img_size=32, num_classes=5,
                    class_token=False, global_pool="avg"),
        load=dict(num_heads=3),
    ),
    # Class token and average pooling without fc_norm: the pooling is not in the state dict.
    "vit_cls_avg_c5_32px": dict(
        timm="vit_tiny_patch16_224",
        kwargs=dict(embed_dim=24, depth=2, num_heads=3, patch_size=8, img_size=32, num_classes=5,
                    global_pool="avg", fc_norm=False),
        load=dict(num_heads=3, global_pool="avg"),
    ),
    # Register tokens without a class token, average pooling (vit_*_reg4_gap_*).
    "vit_reg4_gap_c6_32px": dict(
        timm="vit_tiny_patch16_224",
        kwargs=dict(embed_dim=24, depth=2, num_heads=3, patch_size=8, img_size=32, num_classes=6,
                    class_token=False, reg_tokens=4, no_embed_class=True, global_pool="avg"),
        load=dict(num_heads=3),
    ),
    # Class token + 2 registers + LayerScale, token pooling (DINOv2-with-registers style).
    "vit_reg2_ls_c6_32px": dict(
        timm="vit_tiny_patch16_224",
        kwargs=dict(embed_dim=24, depth=2, num_heads=3, patch_size=8, img_size=32, num_classes=6,
                    reg_tokens=2, no_embed_class=True, init_values=1e-5),
        load=dict(num_heads=3),
    ),
})

# JAX .npz cases: layout, whether it has a class token ('tok') or pools the mean ('gap'), the
# timm model that reads it, and extras (scanned: big_vision's stacked encoderblock; pre_logits:
# an ImageNet-21k representation layer, which must be dropped with the head).
_TINY = dict(embed_dim=24, depth=2, num_heads=3, mlp_dim=48, patch_size=8, img_size=32)
NPZ_CASES = {
    "augreg_tok_c7_32px": dict(layout="augreg", class_token=True, num_classes=7),
    "augreg_gap_c7_32px": dict(layout="augreg", class_token=False, num_classes=7),
    "big_vision_tok_c7_32px": dict(layout="big_vision", class_token=True, num_classes=7),
    "big_vision_gap_scanned_c7_32px": dict(layout="big_vision", class_token=False,
                                           num_classes=7, scanned=True),
}
BATCH = 2
NOISE = 0.1


def random_jax_npz(layout: str, *, class_token: bool, num_classes: int, seed: int,
                   scanned: bool = False, pre_logits: bool = False, embed_dim: int = 24,
                   depth: int = 2, num_heads: int = 3, mlp_dim: int = 48, patch_size: int = 8,
                   img_size: int = 32) -> dict[str, np.ndarray]:
    """A random ViT checkpoint in the AugReg or big_vision .npz layout, written from the layouts
    those code bases document (not from vitjax's table)."""
    rng = np.random.default_rng(seed)
    d, h, f, p = embed_dim, num_heads, mlp_dim, patch_size
    dh = d // h

    def r(*shape):
        return (0.5 * rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    big_vision = layout == "big_vision"
    mha, ln2, mlp = (("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision
                     else ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"))
    patches = (img_size // p) ** 2
    out = {"embedding/kernel": r(p, p, 3, d), "embedding/bias": r(d)}
    if class_token:
        out["cls"] = r(1, 1, d)
    if big_vision:
        out["pos_embedding"] = r(1, patches, d)
    else:
        out["Transformer/posembed_input/pos_embedding"] = r(1, patches + class_token, d)
    blocks = []
    for _ in range(depth):
        block = {"LayerNorm_0/scale": 1 + r(d), "LayerNorm_0/bias": r(d),
                 f"{ln2}/scale": 1 + r(d), f"{ln2}/bias": r(d),
                 f"{mha}/out/kernel": r(h, dh, d), f"{mha}/out/bias": r(d),
                 f"{mlp}/Dense_0/kernel": r(d, f), f"{mlp}/Dense_0/bias": r(f),
                 f"{mlp}/Dense_1/kernel": r(f, d), f"{mlp}/Dense_1/bias": r(d)}
        for name in ("query", "key", "value"):
            block[f"{mha}/{name}/kernel"] = r(d, h, dh)
            block[f"{mha}/{name}/bias"] = r(h, dh)
        blocks.append(block)
    if scanned:
        for name in blocks[0]:
            out[f"Transformer/encoderblock/{name}"] = np.stack([b[name] for b in blocks])
    else:
        for i, block in enumerate(blocks):
            out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in block.items()})
    out["Transformer/encoder_norm/scale"] = 1 + r(d)
    out["Transformer/encoder_norm/bias"] = r(d)
    out["head/kernel"], out["head/bias"] = r(d, num_classes), r(num_classes)
    if pre_logits:
        out["pre_logits/kernel"], out["pre_logits/bias"] = r(d, d), r(d)
    prefix = "params/" if big_vision else ""
    return {prefix + k: v for k, v in out.items()}


def timm_model_for_npz(layout: str, class_token: bool, num_classes: int, **sizes):
    """The timm VisionTransformer that reads such a checkpoint (pooling as the layout does:
    class token, or the mean of all tokens after the final norm, without fc_norm)."""
    import timm

    sizes = {**_TINY, **sizes}
    kwargs = dict(embed_dim=sizes["embed_dim"], depth=sizes["depth"],
                  num_heads=sizes["num_heads"], mlp_ratio=sizes["mlp_dim"] / sizes["embed_dim"],
                  patch_size=sizes["patch_size"], img_size=sizes["img_size"],
                  num_classes=num_classes)
    if class_token:
        kwargs.update(no_embed_class=layout == "big_vision")
    else:
        kwargs.update(class_token=False, global_pool="avg", fc_norm=False)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def make_npz_case(name: str, case: dict, seed: int, out: Path) -> dict:
    from safetensors.torch import save_file
    from timm.models.vision_transformer import _load_weights

    checkpoint = random_jax_npz(case["layout"], class_token=case["class_token"],
                                num_classes=case["num_classes"], seed=seed,
                                scanned=case.get("scanned", False))
    np.savez(out / f"{name}_weights.npz", **checkpoint)
    model = timm_model_for_npz(case["layout"], case["class_token"], case["num_classes"])
    _load_weights(model, str(out / f"{name}_weights.npz"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{name}.safetensors"), metadata={"format": "pt"})
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (BATCH, _TINY["img_size"], _TINY["img_size"], 3))
    images = images.astype(np.float32)
    np.savez(out / f"{name}.npz", images=images, logits=timm_logits(model, images))
    return dict(format=case["layout"], npz=case, load={}, seed=seed,
                checkpoint=f"{name}_weights.npz", timm_state=f"{name}.safetensors",
                io=f"{name}.npz")


def perturbed_timm_model(name: str, seed: int, noise: float, **kwargs):
    """timm model with its random init plus N(0, noise^2) on every parameter, in eval mode."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * torch.randn_like(param))
    return model


def timm_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()


def make_case(name: str, case: dict, seed: int, out: Path) -> dict:
    import timm
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = perturbed_timm_model(case["timm"], seed, NOISE, **case["kwargs"])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{name}.safetensors"), metadata={"format": "pt"})

    run_size = case.get("run_img_size", case["kwargs"]["img_size"])
    if run_size != case["kwargs"]["img_size"]:
        # What timm does with pretrained weights at another resolution.
        model = timm.create_model(case["timm"], pretrained=False, **{
            **case["kwargs"], "img_size": run_size,
        }).eval()
        model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((BATCH, run_size, run_size, 3)).astype(np.float32)
    np.savez(out / f"{name}.npz", images=images, logits=timm_logits(model, images))
    return dict(
        format="timm", timm=case["timm"], timm_kwargs=case["kwargs"], load=case["load"],
        seed=seed, checkpoint=f"{name}.safetensors", io=f"{name}.npz",
    )


FULL_SIZE = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit3_small_patch16_224",  # LayerScale, no_embed_class
    "vit_base_patch16_reg4_gap_256",  # registers, no class token, average pooling + fc_norm
)


def measure(fixtures: Path) -> None:
    """Prints the largest logit difference vitjax vs timm for every fixture and full-size DeiT."""
    import jax

    from vitjax.interop import load_checkpoint, load_timm, parse_variant
    from vitjax.models import ViT

    def max_diff(model, params, images, expected):
        logits = np.asarray(jax.jit(model.apply)({"params": params}, images)[0])
        return float(np.abs(logits - expected).max()), float(np.abs(expected).max())

    print(f"{'architecture':44s} {'max|diff|':>10s} {'max|logit|':>10s}")
    cases = json.loads((fixtures / "manifest.json").read_text())["cases"]
    for name, entry in cases.items():
        golden = np.load(fixtures / entry["io"])
        loaded = load_checkpoint(fixtures / entry["checkpoint"], **entry["load"])
        model = ViT(loaded.config)
        diff, scale = max_diff(model, loaded.params, golden["images"], golden["logits"])
        print(f"{'fixture ' + name:44s} {diff:10.2e} {scale:10.2f}", flush=True)
    for name in FULL_SIZE:
        size = parse_variant(name)["image_size"]
        images = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
        timm_model = perturbed_timm_model(name, seed=0, noise=0.02)
        expected = timm_logits(timm_model, images)
        model, params = load_timm(timm_model.state_dict(), variant=name)
        diff, scale = max_diff(model, params, images, expected)
        print(f"{name + ' (batch 2)':44s} {diff:10.2e} {scale:10.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "tests/fixtures/timm"))
    parser.add_argument("--measure", action="store_true", help="compare, write nothing")
    args = parser.parse_args()
    if args.measure:
        measure(Path(args.out))
        return
    import timm
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "made_with": dict(timm=timm.__version__, torch=torch.__version__, noise=NOISE),
        "cases": {name: make_case(name, case, seed, out) for seed, (name, case) in enumerate(
            CASES.items()
        )},
    }
    manifest["cases"].update({
        name: make_npz_case(name, case, 100 + seed, out)
        for seed, (name, case) in enumerate(NPZ_CASES.items())
    })
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {len(manifest['cases'])} cases to {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
