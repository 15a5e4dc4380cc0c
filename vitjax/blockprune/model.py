"""`MovementViT`: the model block movement pruning trains, a ViT whose heads and FFN neuron
blocks are masked by learned scores (`vitjax.blockprune.movement`)."""

from __future__ import annotations

import flax.linen as nn
import jax

from vitjax.blockprune.movement import (
    MovementConfig,
    init_scores,
    learned_scores,
    movement_masks,
)
from vitjax.models.config import ViTConfig
from vitjax.models.vit import ViT


class MovementViT(nn.Module):
    """A ViT whose heads and FFN neuron blocks are masked by learned movement scores: params
    {'vit': ViT params, 'scores': {'head', 'neuron'}}, so the shared trainer and evaluator see
    one model (the evaluator calls it like a ViT)."""

    config: ViTConfig
    mcfg: MovementConfig
    drop_path_rate: float = 0.0
    dtype: object = None

    @nn.compact
    def __call__(self, images, masks=None, train: bool = False):
        if masks is not None:
            raise ValueError("movement pruning learns its own masks; pass masks=None")
        stored = self.param("scores", lambda _: jax.tree.map(
            lambda s: s / self.mcfg.score_lr_scale, init_scores(self.config, self.mcfg)))
        scores = learned_scores({"scores": stored}, self.mcfg)
        kwargs = {} if self.dtype is None else {"dtype": self.dtype}
        vit = ViT(self.config, drop_path_rate=self.drop_path_rate, name="vit", **kwargs)
        return vit(images, movement_masks(scores, self.mcfg), train=train)
