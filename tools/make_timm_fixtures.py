"""Writes the timm golden fixtures that tests/test_interop.py checks vitjax against.

  python tools/make_timm_fixtures.py [--out tests/fixtures/timm]
  python tools/make_timm_fixtures.py --measure   # max |vitjax - timm| logits, fixtures + full size

Needs torch + timm (no downloads: every model is a seeded random init with tiny dimensions).
For each case it writes
  <case>.safetensors  the timm state dict (what load_timm reads)
  <case>.npz          'images' [B, H, W, 3] float32 (NHWC, the vitjax layout) and timm's
                      'logits' on them (eval mode)
and manifest.json with the timm model name, its kwargs and what load_timm needs to be told.
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
BATCH = 2
NOISE = 0.1


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
        timm=case["timm"], timm_kwargs=case["kwargs"], load=case["load"], seed=seed,
        checkpoint=f"{name}.safetensors", io=f"{name}.npz",
    )


FULL_SIZE = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
)


def measure(fixtures: Path) -> None:
    """Prints the largest logit difference vitjax vs timm for every fixture and full-size DeiT."""
    import jax

    from vitjax.interop import load_timm

    def max_diff(model, params, images, expected):
        logits = np.asarray(jax.jit(model.apply)({"params": params}, images)[0])
        return float(np.abs(logits - expected).max()), float(np.abs(expected).max())

    print(f"{'architecture':44s} {'max|diff|':>10s} {'max|logit|':>10s}")
    cases = json.loads((fixtures / "manifest.json").read_text())["cases"]
    for name, entry in cases.items():
        golden = np.load(fixtures / entry["io"])
        model, params = load_timm(fixtures / entry["checkpoint"], **entry["load"])
        diff, scale = max_diff(model, params, golden["images"], golden["logits"])
        print(f"{'fixture ' + name:44s} {diff:10.2e} {scale:10.2f}", flush=True)
    images = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    for name in FULL_SIZE:
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
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {len(CASES)} cases to {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
