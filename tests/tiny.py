"""The tiny models and configs the test modules share (tests/ is on sys.path).

One definition each, so that the programs the modules compile are the same programs: XLA's
persistent compilation cache (tests/conftest.py) then serves them to every module, xdist worker
and subprocess instead of compiling them again. The session fixtures built on them are in
tests/conftest.py.
"""

import importlib.util
from pathlib import Path

import jax

from vitjax.models import ViT, ViTConfig, init_params

REPO = Path(__file__).resolve().parents[1]

# Models: 32 px images, 16 patches, 3 blocks (masks, exactness, attention paths).
TINY = ViTConfig(
    num_classes=7, image_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_dim=48
)
# Training: 8 px images, 4 patches, 2 blocks (trainer, sharding, resume, two processes).
TINY_TRAIN = ViTConfig(
    num_classes=10, image_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_dim=64
)


def perturbed(config=TINY, seed=0, batch=3):
    """(ViT, params, images): parameters off their initial values (biases and the head start
    at zero, which would hide a wrong mapping or a missing bias), random images."""
    model = ViT(config)
    params = init_params(model, jax.random.key(seed))
    params = jax.tree.map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(seed + 1), a.shape), params
    )
    images = jax.random.normal(
        jax.random.key(seed + 2), (batch, config.image_size, config.image_size, 3))
    return model, params, images


def load_config(name: str, arg=None):
    """configs/<name>.py's get_config(arg), as `--config=configs/<name>.py[:arg]` loads it."""
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_digits(**train):
    """configs/digits.py:scratch with a tiny ViT and 4 training steps (the whole pipeline in
    seconds). The paper's from-scratch recipe: the shipped reference model does not fit it."""
    config = load_config("digits", "scratch")
    config.model.update(embed_dim=16, depth=2, num_heads=2, mlp_dim=32, patch_size=8)
    config.train.update(steps=4, warmup_steps=1, batch_size=32, eval_batch_size=128,
                        log_every=2, eval_every=4, ckpt_every=2, score_every=2, **train)
    config.score.batch_size = 32
    return config
