"""Mask2Former decode head on our four-level pyramid (docs/METHOD.md, "Mask2Former head").

Built from ``transformers``' Mask2Former modules, not written anew: the multi-scale
deformable-attention pixel decoder (``Mask2FormerPixelDecoder``) on the pyramid levels 1/8 ..
1/32 with an FPN step to 1/4, and the masked-attention transformer decoder
(``Mask2FormerTransformerModule``) over ``queries`` object queries; a linear class predictor
(K classes + no-object) reads every decoder layer (deep supervision: the initial prediction and
one per layer). No weights are downloaded: the modules are built from a ``Mask2FormerConfig``
and initialized by transformers' own Mask2Former initialization.

Any backbone's ``Backbone`` interface feeds it: the four outputs (strides 4, 8, 16, output
stride), for CNNs and ViTs (model/vit.py's simple pyramid) alike.

Queries: the head's own learned query features and positions, or, with Rein tokens
(``token_queries``), the released ``link_token_to_query``: all layer tokens [L, T, C] ->
Linear(C, d); max, mean and last over depth -> Linear(3d, d) = the query positions; Linear(d, d)
of those = the initial query features (``TokenQueries``).

Semantic inference (``semantic_inference``): per class, the sum over queries of the class
probability (softmax over K + 1, the no-object column dropped) times the mask probability
(sigmoid).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Mask2FormerHead", "TokenQueries", "semantic_inference", "M2F_LEVELS", "M2F_DEFAULT_PROJ_LEVELS",
           "hf_config"]

M2F_LEVELS: tuple[str, ...] = ("pd32", "pd16", "pd8", "mask")
"""Pixel-decoder features a projection head can read: the deformable encoder's outputs at 1/32,
1/16, 1/8 and the mask features (1/4, the per-pixel embeddings the query masks are products with)."""
M2F_DEFAULT_PROJ_LEVELS: tuple[str, str, str] = ("pd16", "pd8", "mask")
"""BlindNet's three levels on Mask2Former (docs/METHOD.md, "Mask2Former head")."""


def hf_config(num_classes: int, *, hidden_dim: int = 256, queries: int = 100, encoder_layers: int = 6,
              decoder_layers: int = 9, heads: int = 8, strides: Sequence[int] = (4, 8, 16, 32),
              points: int = 12544):
    """The ``Mask2FormerConfig`` of the head: widths ``hidden_dim`` everywhere (pixel decoder, mask
    features, queries), feed-forward 1024 (pixel decoder) / 2048 (transformer decoder) scaled with
    the width, ``decoder_layers`` masked-attention layers (transformers counts the initial prediction
    as one more), no dropout (no random draw outside the seeded loss sampling), and the usual
    loss weights: class 2, mask 5, dice 5, no-object 0.1, ``points`` sampled points per mask
    (oversample 3, importance 0.75)."""
    from transformers import Mask2FormerConfig

    if hidden_dim % 32:
        raise ValueError(f"Mask2Former width {hidden_dim} must be a multiple of 32 (GroupNorm(32) in the pixel decoder)")
    if hidden_dim % heads:
        raise ValueError(f"Mask2Former width {hidden_dim} must be divisible by its {heads} attention heads")
    return Mask2FormerConfig(
        num_labels=num_classes, hidden_dim=hidden_dim, feature_size=hidden_dim, mask_feature_size=hidden_dim,
        num_queries=queries, encoder_layers=encoder_layers, decoder_layers=decoder_layers + 1,
        num_attention_heads=heads, dim_feedforward=8 * hidden_dim, encoder_feedforward_dim=4 * hidden_dim,
        feature_strides=list(strides), common_stride=4, dropout=0.0, pre_norm=False,
        class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1, train_num_points=points,
        oversample_ratio=3.0, importance_sample_ratio=0.75, use_auxiliary_loss=True,
    )


def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """(B, Q, K + 1) class logits and (B, Q, h, w) mask logits -> (B, K, h, w) class scores:
    sum over queries of softmax(class)[:K] x sigmoid(mask)."""
    return torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())


class TokenQueries(nn.Module):
    """Rein's tokens -> object queries (the released ``link_token_to_query``).

    tokens [L, T, C] -> ``transform`` Linear(C, d) -> max, mean and last over the L layers,
    stacked per channel (d x 3, the released layout: [c0_max, c0_mean, c0_last, c1_max, ...]) ->
    ``merge`` Linear(3d, d): the T query positions; ``to_feat`` Linear(d, d) of them: the initial
    query features (the released head's ``querys2feat``)."""

    def __init__(self, token_dim: int, dim: int) -> None:
        super().__init__()
        self.transform = nn.Linear(token_dim, dim)
        self.merge = nn.Linear(3 * dim, dim)
        self.to_feat = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [L, T, C] -> (query positions [T, d], initial query features [T, d])."""
        t = self.transform(tokens)  # (L, T, d)
        pooled = torch.stack([t.amax(0), t.mean(0), t[-1]], dim=-1).flatten(-2)  # (T, 3d), per-channel triples
        pos = self.merge(pooled)
        return pos, self.to_feat(pos)


def _hf_init(config, module: nn.Module) -> None:
    """transformers' Mask2Former initialization on ``module``: ``Mask2FormerPreTrainedModel._init_weights``
    applied to every submodule, descendants before their parent (a parent's own rule, e.g. the
    deformable attention's sampling-offset grid, is the last word on its children)."""
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPreTrainedModel

    class _Init(Mask2FormerPreTrainedModel):
        def __init__(self, cfg):
            super().__init__(cfg)

    init = _Init(config)
    with torch.no_grad():
        for m in reversed(list(module.modules())):
            init._init_weights(m)


class Mask2FormerHead(nn.Module):
    """Pixel decoder + masked-attention decoder + class predictor (module doc).

    forward(feats, tokens=None) -> {"class_logits": [(B, Q, K + 1)] x (decoder_layers + 1),
    "mask_logits": [(B, Q, H/4, W/4)] x (decoder_layers + 1), "levels": {"pd32", "pd16", "pd8",
    "mask"}}; the last entries are the final prediction."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int, *,
                 hidden_dim: int = 256, queries: int = 100, encoder_layers: int = 6, decoder_layers: int = 9,
                 heads: int = 8, points: int = 12544, token_dim: int | None = None) -> None:
        super().__init__()
        from transformers.models.mask2former.modeling_mask2former import (
            Mask2FormerPixelDecoder,
            Mask2FormerTransformerModule,
        )

        if len(in_channels) != 4 or len(strides) != 4:
            raise ValueError(f"Mask2Former reads a four-level pyramid; got channels {list(in_channels)}, "
                             f"strides {list(strides)}")
        self.config = hf_config(num_classes, hidden_dim=hidden_dim, queries=queries, encoder_layers=encoder_layers,
                                decoder_layers=decoder_layers, heads=heads, strides=strides, points=points)
        self.num_classes = num_classes
        self.queries = queries
        self.hidden_dim = hidden_dim
        self.pixel_decoder = Mask2FormerPixelDecoder(self.config, feature_channels=list(in_channels))
        self.transformer = Mask2FormerTransformerModule(in_features=hidden_dim, config=self.config)
        self.class_predictor = nn.Linear(hidden_dim, num_classes + 1)
        self.token_queries: TokenQueries | None = None
        if token_dim is not None:  # Rein: the tokens are the queries; the head's own are dropped (unused under DDP)
            self.transformer.queries_embedder = None
            self.transformer.queries_features = None
            self.token_queries = TokenQueries(token_dim, hidden_dim)
        _hf_init(self.config, self)

    def _decode(self, ms: Sequence[Tensor], mask_features: Tensor, pos: Tensor, feat: Tensor):
        """``Mask2FormerTransformerModule.forward`` with given query positions / features [Q, d]
        (the module reads its own embeddings; Rein's come from the tokens)."""
        tm = self.transformer
        stage_feats, stage_pos, sizes = [], [], []
        for i in range(tm.num_feature_levels):
            x = ms[i]
            sizes.append(x.shape[-2:])
            stage_pos.append(tm.position_embedder(x.shape, x.device, x.dtype, None).flatten(2).permute(2, 0, 1))
            stage_feats.append((tm.input_projections[i](x).flatten(2) + tm.level_embed.weight[i][None, :, None])
                               .permute(2, 0, 1))
        b = ms[0].shape[0]
        return tm.decoder(
            inputs_embeds=feat.unsqueeze(1).repeat(1, b, 1),
            multi_stage_positional_embeddings=stage_pos,
            pixel_embeddings=mask_features,
            encoder_hidden_states=stage_feats,
            query_position_embeddings=pos.unsqueeze(1).repeat(1, b, 1),
            feature_size_list=sizes,
            return_dict=True,
        )

    def forward(self, feats: Sequence[Tensor], tokens: Tensor | None = None, *, all_layers: bool = True) -> dict:
        pd = self.pixel_decoder(list(feats), return_dict=True)
        ms, mask_features = pd.multi_scale_features, pd.mask_features  # (1/32, 1/16, 1/8), 1/4
        if self.token_queries is not None:
            if tokens is None:
                raise ValueError("this Mask2Former head takes its queries from Rein's tokens; none were given")
            pos, feat = self.token_queries(tokens.to(mask_features.dtype))
            dec = self._decode(ms, mask_features, pos, feat)
        else:
            dec = self.transformer(ms, mask_features)
        hidden = dec.intermediate_hidden_states if all_layers else dec.intermediate_hidden_states[-1:]
        masks = dec.masks_queries_logits if all_layers else dec.masks_queries_logits[-1:]
        return {
            "class_logits": [self.class_predictor(h.transpose(0, 1)) for h in hidden],
            "mask_logits": list(masks),
            "levels": dict(pd32=ms[0], pd16=ms[1], pd8=ms[2], mask=mask_features),
        }

    @staticmethod
    def eval_scores(class_logits: Tensor, mask_logits: Tensor, size: Sequence[int]) -> Tensor:
        """Eval-time class scores at the input ``size``: the mask logits resized first (bilinear,
        align_corners=False, as the released Mask2Former inference), then ``semantic_inference``."""
        masks = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
        return semantic_inference(class_logits, masks)
