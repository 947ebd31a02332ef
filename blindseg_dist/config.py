"""One typed configuration tree: defaults here, YAML files override them, ``key=value`` overrides last.

Every field carries a one-line description (the comment under it). Loading validates keys and
values and names the bad key, its value and what is allowed. The resolved config is written next
to every run (``DIR/config.yaml``) and can be passed back with ``--config``.

A leaf module: it imports the standard library, yaml and blindseg_dist.errors only (no torch), so
tools and tests read a config cheaply. The allowed values of the choice keys are ``Literal`` field
types owned here; the modules that implement them (losses, data.stream, engine.evaluate,
engine.logging, model.blindnet) read them from here. What only the model code knows (backbone
names, timm's model list) is checked where the model is built (model/backbones.py, check_backbone).
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from . import atomic
from .errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "save_config", "model_kwargs", "to_dict", "CHOICES"]

# ---- the allowed values of the choice keys (field types below; CHOICES is built from them) -------
CeScope = Literal["reference", "exact"]
CovarianceScope = Literal["image", "batch"]
ContrastiveScope = Literal["image", "global"]
CwclNegatives = Literal["reference", "paper"]
OnCorrupt = Literal["warn", "fail"]
Precision = Literal["no", "bf16", "fp16"]
OutputStride = Literal[8, 16, 32]
Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["poly", "cosine"]
NoWeightDecayKind = Literal["norm", "bias", "pos_embed"]
ProjLevel = Literal["low", "mid", "aux", "high", "dec0", "dec1", "pd32", "pd16", "pd8", "mask"]
DecodeHead = Literal["deeplabv3plus", "mask2former"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio"]
Adapter = Literal["none", "rein", "lora"]
LoraInit = Literal["default", "svd_minor", "pissa", "gaussian"]
EvalProtocol = Literal["full", "mapillary_1536", "mapillary_1024", "synthia", "acdc"]
CompileBackend = Literal["inductor", "aot_eager", "eager"]

CE_SCOPES: tuple[str, ...] = typing.get_args(CeScope)
"""loss.ce_scope (losses/segmentation.py)."""
COVARIANCE_SCOPES: tuple[str, ...] = typing.get_args(CovarianceScope)
"""loss.covariance_scope (losses/covariance.py)."""
CONTRASTIVE_SCOPES: tuple[str, ...] = typing.get_args(ContrastiveScope)
"""loss.contrastive_scope (losses/cwcl.py, losses/sdcl.py)."""
CWCL_NEGATIVES: tuple[str, ...] = typing.get_args(CwclNegatives)
"""loss.cwcl_negatives (losses/cwcl.py)."""
ON_CORRUPT: tuple[str, ...] = typing.get_args(OnCorrupt)
"""data.on_corrupt (data/stream.py): skip the rest of a corrupt shard (counted) | raise."""
NO_WEIGHT_DECAY_KINDS: tuple[str, ...] = typing.get_args(NoWeightDecayKind)
"""Allowed entries of optim.no_weight_decay (engine/optim.py)."""
PROJ_LEVELS: tuple[str, ...] = typing.get_args(ProjLevel)
"""Features a projection head may read (model/blindnet.py)."""
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)
"""What ``run.log_with`` may name: accelerate's trackers (engine/logging.py), used as they are."""
EVAL_PROTOCOLS: tuple[str, ...] = typing.get_args(EvalProtocol)
"""Evaluation protocols of eval.protocols (engine/evaluate.py)."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are booleans, so `run.mixed_precision: no` (or the
    override run.mixed_precision=no) is the string "no", where YAML 1.1 reads no/yes/on/off as
    booleans. Boolean keys still accept yes/no/on/off (_coerce)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse config YAML (a file's text or an override's value) the way configs are read."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    """torchvision resnet18|resnet34|resnet50|resnet101, or timm:<name> (features_only)."""
    output_stride: OutputStride = 16
    """8 or 16 (torchvision ResNets, ConvNeXt); 32 for backbones that cannot dilate (Swin)."""
    num_classes: int = 19
    """Number of classes (19 Cityscapes trainIds)."""
    pretrained: str | None = None
    """Local path of the backbone's ImageNet weights (never downloaded); none = random init on purpose; null = not set."""
    require_pretrained: bool = False
    """Refuse to train (exit 2, naming the file to get) while model.pretrained is null (reference recipes)."""
    init_from: str | None = None
    """Start training from these weights (checkpoint folder or import-checkpoint output); optimizer and step start fresh."""
    channels_last: bool = False
    """Use the channels_last memory format (faster convolutions on recent GPUs)."""
    grad_checkpointing: bool = False
    """Activation checkpointing of the backbone stages, every block for a ViT (large backbones on small GPUs)."""
    timm_kwargs: dict[str, typing.Any] = field(default_factory=dict)
    """Extra timm.create_model arguments for a timm:<name> backbone, e.g. {depth: 2} (small test models)."""
    drop_path: float = 0.0
    """Stochastic depth rate of a timm backbone (ViT, ConvNeXt, Swin recipes)."""
    vit_blocks: list[int] = field(default_factory=list)
    """ViT: the 4 blocks (0-based, increasing) tapped for the pyramid levels 1/4, 1/8, 1/16, 1/os; [] = last block of each quarter."""
    vit_in_points: list[str] = field(default_factory=lambda: ["embed", "p4", "p8"])
    """ViT: the 3 affine-free IN points: embed (after the patch embedding) | block<i> | p4 | p8 | p16 | p32 (pyramid outputs)."""
    vit_pyramid_channels: int = 256
    """ViT: channels of every pyramid level."""
    proj_levels: list[ProjLevel] = field(default_factory=list)
    """Features read by the 3 projection heads: low | mid | aux | high (backbone outputs) | dec0 | dec1 (DeepLabV3+ in/out) |
    pd32 | pd16 | pd8 | mask (Mask2Former pixel decoder); [] = the head's: [high, dec0, dec1] | [pd16, pd8, mask]."""
    freeze_backbone: bool = False
    """requires_grad=False on the whole encoder (ViT: its pyramid stays trainable); no optimizer state, no all-reduce."""
    freeze_blocks: int = 0
    """Freeze the stem / patch embedding and the first k blocks of the encoder (0: none)."""
    adapter: Adapter = "none"
    """ViT adapter on a frozen encoder: none | rein (Rein layers after every block) | lora (peft LoRA layers)."""
    rein_tokens: int = 100
    """Rein: learnable tokens per layer (token 0 is the null slot)."""
    rein_rank: int = 16
    """Rein: rank of the low-rank token factors A [L, T, r] @ B [L, r, C]; 0 = full-rank tokens."""
    lora_rank: int = 16
    """LoRA: adapter rank r."""
    lora_alpha: float = 16.0
    """LoRA: scaling numerator (the update is alpha / r * B A)."""
    lora_dropout: float = 0.0
    """LoRA: dropout on the adapter's input."""
    lora_blocks: list[int] = field(default_factory=list)
    """LoRA: [first, last] blocks (0-based, inclusive) that get adapters; [] = every block."""
    lora_targets: str | None = None
    """LoRA: regex over a block's timm layer names (after blocks.<i>.); null = attn qkv/q,k,v_proj/proj + mlp fc1/fc2 (EVA-02: fc1_g/fc1_x)."""
    lora_init: LoraInit = "default"
    """LoRA: default (peft, B = 0) | svd_minor (SoMA: the r smallest singular components; the frozen weight keeps the rest) | pissa | gaussian."""
    lora_train_bias: bool = False
    """LoRA: the adapted layers' biases train too (SoMA)."""
    patch_size: int = 0
    """ViT patch size; 0 = the model's own. Pretrained kernels of another size are resized bicubically, position embeddings resampled (DINOv2 at 16)."""
    decode_head: DecodeHead = "deeplabv3plus"
    """deeplabv3plus | mask2former (transformers' pixel decoder + masked-attention decoder, set loss; output_stride 32 advised)."""
    m2f_hidden_dim: int = 256
    """Mask2Former: width of the pixel decoder, mask features and queries (a multiple of 32)."""
    m2f_queries: int = 100
    """Mask2Former: object queries (with model.adapter=rein: Rein's tokens per layer are the queries)."""
    m2f_encoder_layers: int = 6
    """Mask2Former: deformable-attention layers of the pixel decoder."""
    m2f_decoder_layers: int = 9
    """Mask2Former: masked-attention decoder layers (each, and the initial prediction, is supervised)."""
    m2f_points: int = 12544
    """Mask2Former: points sampled per mask by the matcher and the mask / dice losses."""


@dataclass
class LossConfig:
    two_view: bool = True
    """Forward the augmented view x_a too; CE becomes 0.5 [CE(x) + CE(x_a)]. False = baseline."""
    aux: float = 0.4
    """Weight of the auxiliary CE on layer3 (original view only); 0 switches the aux head off."""
    cml: float = 0.2
    """Weight of the covariance matching loss (CML)."""
    ccl: float = 0.2
    """Weight of the cross-covariance loss (CCL)."""
    cwcl: float = 0.3
    """Weight of the class-wise contrastive loss (CWCL)."""
    sdcl: float = 0.3
    """Weight of the semantic disentanglement contrastive loss (SDCL)."""
    ce_scope: CeScope = "reference"
    """CE normalization: reference (per-rank mean) | exact (sum / global valid-pixel count)."""
    covariance_scope: CovarianceScope = "image"
    """CML/CCL statistics: image (per image, reference) | batch (pooled over the global batch)."""
    contrastive_scope: ContrastiveScope = "image"
    """CWCL/SDCL negatives: image (same image, reference) | global (every image of every rank)."""
    cwcl_negatives: CwclNegatives = "reference"
    """CWCL negatives: reference (all 750 sampled keys, as the released code) | paper (other classes)."""
    cwcl_global_keys: int = 750
    """contrastive_scope=global: keys each CWCL anchor is scored against, drawn from the whole global batch
    (750 = as many as the image scope's 15 x 50: the global scope changes where the negatives come from, not
    how many); bounds CWCL's bytes and logits per rank whatever the number of GPUs (docs/DISTRIBUTED.md)."""
    tau: float = 0.07
    """Temperature of both contrastive losses."""


@dataclass
class DataConfig:
    train: str = "data_shards/gta5-train"
    """Training shards written by `blindseg shard`: a folder with manifest.json, a brace pattern
    (dir/gta5-train-{000000..000127}.tar), http(s)://HOST/DIR, pipe:CMD, s3://, gs:// (fsspec)."""
    crop_size: int = 768
    """Square crop of both views."""
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    """Random scale range of the full image before cropping."""
    class_uniform: float = 0.5
    """Class-uniform fraction of an epoch (released class_uniform_pct): N - 19k uniform images plus
    k = int(N x class_uniform / 19) (image, centroid) pairs of every class (docs/DATA.md)."""
    batch_size: int = 4
    """Images per process (the global batch is batch_size x processes)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    on_corrupt: OnCorrupt = "warn"
    """A corrupt or truncated shard: warn (skip it, count it) | fail (stop the run)."""
    remote_retries: int = 3
    """Remote shards (URL, pipe:): extra attempts after a failed read, resuming after the last sample."""
    remote_timeout: float = 600.0
    """Remote shards: seconds one shard may spend blocked waiting for bytes (a stalled read fails, then retries)."""
    cache_dir: str = ""
    """Remote evaluation shards are downloaded here, verified by sha256 ('' = $BLINDSEG_CACHE or
    ~/.cache/blindseg_dist/shards)."""
    cache_gb: float = 50.0
    """Size bound of cache_dir: least recently used shards are removed beyond it."""


@dataclass
class EvalConfig:
    targets: dict[str, str] = field(default_factory=dict)
    """Evaluation targets: name -> shard directory or dataset folder, or a shard location as data.train
    (brace pattern, http(s)://, pipe:CMD, s3://, gs://)."""
    every: int = 0
    """Evaluate every N optimizer steps during training (0: only at the end)."""
    at_end: bool = True
    """Evaluate all targets when training ends."""
    max_images: int = 0
    """Evaluate at most N images per target (0: all); for quick checks only."""
    protocols: dict[str, EvalProtocol] = field(default_factory=dict)
    """Per-target protocol: full | mapillary_1536 | mapillary_1024 | synthia | acdc; a target without one is
    inferred from its name / manifest dataset (mapillary -> mapillary_1536, synthia -> synthia, acdc -> acdc,
    else full)."""
    selection: str | None = None
    """Target whose mIoU picks the best checkpoint (DIR/best.json; never deleted by keep_last). null = the
    held-out source split (the target named 'source', or whose shards come from data.train's dataset);
    an unseen target is allowed and labelled as such in eval.jsonl, best.json and reports."""
    sliding_window: list[int] = field(default_factory=list)
    """Sliding-window inference: [] = whole image; [crop, stride] or [crop_h, crop_w, stride_h, stride_w] px."""


@dataclass
class OptimConfig:
    optimizer: Optimizer = "sgd"
    """sgd (momentum, the BlindNet recipe) | adamw."""
    lr: float = 0.01
    """Base learning rate (of the decoder and heads times optim.head_lr_mult; the encoder's scaled by layer_decay)."""
    momentum: float = 0.9
    """SGD momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 5e-4
    """Weight decay (SGD: L2 in the gradient; AdamW: decoupled)."""
    no_weight_decay: list[NoWeightDecayKind] = field(default_factory=list)
    """Parameter kinds without weight decay: norm (1-D weights: norm scales, layer scales) | bias | pos_embed (position embeddings, class / register tokens, relative position tables)."""
    schedule: Schedule = "poly"
    """poly | cosine decay over optim.max_steps, stepped once per optimizer step."""
    poly_power: float = 0.9
    """Poly decay power."""
    min_lr_ratio: float = 0.0
    """The decay ends at min_lr_ratio x lr."""
    warmup_steps: int = 0
    """Linear warm-up over the first N optimizer steps (0: none)."""
    warmup_ratio: float = 1e-6
    """LR factor at step 0 of the warm-up (it rises linearly to the decayed value at warmup_steps)."""
    layer_decay: float = 1.0
    """Layer-wise lr decay: encoder layer i of n gets lr x layer_decay ** (n - i) (ViT / ConvNeXt / Swin / ResNet blocks); 1 = off."""
    head_lr_mult: float = 1.0
    """LR multiplier of everything outside the encoder's blocks: decoder, aux and projection heads, a ViT's pyramid."""
    max_steps: int = 40000
    """Optimizer steps."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0: off)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    ema_decay: float = 0.0
    """EMA of the trained weights (0: off); when on, evaluation and checkpoints hold the EMA weights (engine/ema.py)."""
    ema_start: int = 0
    """The EMA copies the weights up to this optimizer step and averages after it (SoMA: 12000)."""


@dataclass
class RunConfig:
    seed: int = 304
    """Run seed (model init, data stream, loss sampling)."""
    output_dir: str | None = None
    """Run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints/, eval.json; null =
    runs/<run.name>/<UTC timestamp>/ (a new folder per run)."""
    name: str | None = None
    """Run name for the default run directory runs/<name>/<timestamp>/; null = the config file's name."""
    mixed_precision: Precision | None = None
    """no | bf16 | fp16 (covariance and contrastive math stay float32); null = the launcher's
    (accelerate config / --mixed_precision), else no. A value set here wins over the launcher's, with a warning."""
    log_every: int = 10
    """Log scalars every N optimizer steps."""
    checkpoint_every: int = 1000
    """Checkpoint every N optimizer steps (the final step is always saved)."""
    keep_last: int = 3
    """Keep the last N checkpoints."""
    image_every: int = 0
    """Log input / augmented / ground truth / prediction images every N steps (0: off)."""
    dist_timeout_s: int = 600
    """Seconds a collective may wait for a dead or hung rank before the run stops with an error."""
    max_nonfinite: int = 5
    """Non-finite losses in a row that stop the run (each one skips its step)."""
    threads: int = 0
    """torch intra-op threads per process (0: leave torch's default)."""
    log_with: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    """Trackers of the logged scalars, images and figures, through accelerate's tracker support:
    tensorboard (DIR/tb) | wandb | mlflow | aim | comet_ml | clearml | dvclive | swanlab | trackio
    (when installed; offline modes are the trackers' own, e.g. WANDB_MODE=offline). metrics.jsonl is always written."""
    record_stream: bool = False
    """Write DIR/streamed-rank<r>.json: the sample keys and shards each rank read, and a hash of its weights."""
    compile: bool = False
    """torch.compile the network (forward and the projection heads' row path; docs/GPU_STEP.md)."""
    compile_backend: CompileBackend = "inductor"
    """run.compile's backend: inductor (generated kernels) | aot_eager (graph capture and autograd tracing
    without code generation: compiles in seconds, for checks) | eager (capture only)."""


@dataclass
class DemoConfig:
    domains: int = 4
    """`blindseg demo`: rendering domains generated (domain 0 is the source)."""
    images_per_domain: int = 120
    """`blindseg demo`: images generated per domain."""
    size: list[int] = field(default_factory=lambda: [192, 384])
    """`blindseg demo`: generated image size [H, W]."""
    source_val_fraction: float = 0.15
    """`blindseg demo`: fraction of source frames held out for the in-domain evaluation."""
    samples_per_shard: int = 16
    """`blindseg demo`: samples per shard."""
    seed: int = 0
    """`blindseg demo`: seed of the scene generator."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights and scopes."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data stream."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation targets."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run-level settings."""
    demo: DemoConfig = field(default_factory=DemoConfig)
    """Data generation of `blindseg demo` (ignored by training)."""


def _choice_keys(cls: type, prefix: str = "") -> dict[str, tuple[tuple, bool]]:
    """path -> (allowed values, may be null) of every scalar Literal field under ``cls``."""
    out: dict[str, tuple[tuple, bool]] = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_choice_keys(tp, f"{prefix}{name}."))
            continue
        args = typing.get_args(tp)
        nullable = type(None) in args and typing.get_origin(tp) in (typing.Union, types.UnionType)
        lit = next((a for a in args if typing.get_origin(a) is Literal), None) if nullable else tp
        if typing.get_origin(lit) is Literal:
            out[f"{prefix}{name}"] = (typing.get_args(lit), nullable)
    return out


CHOICES: dict[str, tuple] = {path: allowed for path, (allowed, _) in _choice_keys(Config).items()}
"""Allowed values of the choice keys (their Literal field types): loss scopes, data.on_corrupt, ...."""

NULL_CHOICES: tuple[str, ...] = tuple(path for path, (_, nullable) in _choice_keys(Config).items() if nullable)
"""CHOICES keys that may also be null (run.mixed_precision: null follows the launcher)."""


KEEPS_NONE: tuple[str, ...] = ("model.pretrained",)
"""Optional keys where the word ``none`` is a value of its own (an explicit choice), not null."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is Literal:  # converted to the choices' type here; the choice itself is checked by validate
        tp = type(typing.get_args(tp)[0])
        origin = None
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if path in KEEPS_NONE and isinstance(value, str) and value.strip().lower() == "none":
            return "none"
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(path, value, args[0])
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = load_yaml(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            (item,) = typing.get_args(tp)
            return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
        if origin is dict:
            if isinstance(value, str):
                value = load_yaml(value)
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise ValueError
            _, vt = typing.get_args(tp)
            return {str(k): _coerce(f"{path}.{k}", v, vt) for k, v in value.items()}
        return value
    except ConfigError:
        raise
    except (ValueError, TypeError):
        raise ConfigError(f"config key '{path}': value {value!r} is not a valid {_type_name(tp)}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    types_ = _field_types(type(obj))
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(
                f"unknown config key '{path}'; allowed keys here: {', '.join(sorted(types_))}"
            )
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(obj, key), value, prefix=f"{path}.")
        else:
            setattr(obj, key, _coerce(path, value, tp))


def validate(cfg: Config) -> Config:
    """Check values whose type is right but whose meaning is not; raise ConfigError naming the key."""
    for path, allowed in CHOICES.items():
        value = get_value(cfg, path)
        if value is None and path in NULL_CHOICES:
            continue
        if value not in allowed:
            extra = " or null" if path in NULL_CHOICES else ""
            raise ConfigError(f"config key '{path}': value {value!r} is not allowed; choose one of {list(allowed)}{extra}")

    def positive(path: str, strict: bool = True) -> None:
        v = get_value(cfg, path)
        if v < 0 or (strict and v == 0):
            raise ConfigError(f"config key '{path}': value {v!r} must be {'> 0' if strict else '>= 0'}")

    for p in ("data.crop_size", "data.batch_size", "optim.max_steps", "optim.grad_accum", "model.num_classes",
              "optim.lr", "loss.tau", "loss.cwcl_global_keys", "data.remote_timeout", "data.cache_gb", "run.log_every",
              "run.checkpoint_every", "run.keep_last", "run.dist_timeout_s",
              "run.max_nonfinite"):
        positive(p)
    for p in ("loss.aux", "loss.cml", "loss.ccl", "loss.cwcl", "loss.sdcl", "data.num_workers", "eval.every",
              "eval.max_images", "data.remote_retries", "optim.grad_clip", "optim.weight_decay", "optim.momentum",
              "run.image_every", "run.threads", "model.drop_path", "model.freeze_blocks", "optim.warmup_steps",
              "optim.min_lr_ratio"):
        positive(p, strict=False)
    if not 0.0 <= cfg.optim.momentum < 1.0:
        raise ConfigError(f"config key 'optim.momentum': value {cfg.optim.momentum!r} must be in [0, 1) (SGD momentum)")
    for p in ("model.vit_pyramid_channels", "optim.head_lr_mult", "optim.warmup_ratio", "optim.layer_decay",
              "model.m2f_hidden_dim", "model.m2f_queries", "model.m2f_encoder_layers", "model.m2f_decoder_layers",
              "model.m2f_points"):
        positive(p)
    _validate_recipe(cfg)
    lo, hi = (cfg.data.scale_range + [None, None])[:2] if len(cfg.data.scale_range) == 2 else (None, None)
    if lo is None or not (0 < lo <= hi):
        raise ConfigError(f"config key 'data.scale_range': value {cfg.data.scale_range!r} must be [low, high] with 0 < low <= high")
    if not 0.0 <= cfg.data.class_uniform <= 1.0:
        raise ConfigError(f"config key 'data.class_uniform': value {cfg.data.class_uniform!r} must be in [0, 1]")
    bad = [t for t in cfg.run.log_with if t not in TRACKERS]
    if bad:
        raise ConfigError(f"config key 'run.log_with': {bad} not a tracker; choose from {list(TRACKERS)}")
    _validate_eval(cfg)
    if not cfg.loss.two_view:
        used = [k for k in ("cml", "ccl", "cwcl", "sdcl") if getattr(cfg.loss, k) > 0]
        if used:
            raise ConfigError(
                f"config key 'loss.two_view': value False, but the two-view losses {used} have weights > 0; "
                "set loss.two_view=true or their weights to 0 (baseline)"
            )
    return cfg


def _validate_recipe(cfg: Config) -> None:
    o, m = cfg.optim, cfg.model
    bad = [k for k in o.no_weight_decay if k not in NO_WEIGHT_DECAY_KINDS]
    if bad:
        raise ConfigError(f"config key 'optim.no_weight_decay': value {o.no_weight_decay!r}: {bad} not allowed; "
                          f"choose among {list(NO_WEIGHT_DECAY_KINDS)}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"config key 'optim.betas': value {o.betas!r} must be [beta1, beta2] in [0, 1)")
    for key, value, hi in (("optim.layer_decay", o.layer_decay, 1.0), ("optim.warmup_ratio", o.warmup_ratio, 1.0),
                           ("optim.min_lr_ratio", o.min_lr_ratio, 1.0), ("model.drop_path", m.drop_path, 1.0)):
        if value > hi:
            raise ConfigError(f"config key '{key}': value {value!r} must be <= {hi}")
    if m.freeze_backbone and m.freeze_blocks:
        raise ConfigError("config key 'model.freeze_blocks': set either model.freeze_backbone=true (the whole "
                          f"encoder) or model.freeze_blocks={m.freeze_blocks}, not both")
    if m.adapter != "none" and m.freeze_blocks:
        raise ConfigError(f"config key 'model.freeze_blocks': value {m.freeze_blocks} with model.adapter={m.adapter}: "
                          "an adapter freezes the whole encoder already; set model.freeze_blocks=0")
    if m.lora_blocks and (len(m.lora_blocks) != 2 or not 0 <= m.lora_blocks[0] <= m.lora_blocks[1]):
        raise ConfigError(f"config key 'model.lora_blocks': value {m.lora_blocks!r} must be [] (every block) or "
                          "[first, last] with 0 <= first <= last")
    for key, value, lo in (("model.rein_tokens", m.rein_tokens, 2), ("model.rein_rank", m.rein_rank, 0),
                           ("model.lora_rank", m.lora_rank, 1), ("model.patch_size", m.patch_size, 0)):
        if value < lo:
            raise ConfigError(f"config key '{key}': value {value!r} must be >= {lo}")
    if not 0.0 <= o.ema_decay < 1.0 or o.ema_start < 0:
        raise ConfigError(f"config key 'optim.ema_decay': value {o.ema_decay!r} must be in [0, 1) (0: off), "
                          f"optim.ema_start ({o.ema_start}) >= 0")
    if not 0.0 <= m.lora_dropout < 1.0:
        raise ConfigError(f"config key 'model.lora_dropout': value {m.lora_dropout!r} must be in [0, 1)")
    if m.lora_targets is not None:
        try:
            re.compile(m.lora_targets)
        except re.error as e:
            raise ConfigError(f"config key 'model.lora_targets': value {m.lora_targets!r} is not a regex ({e})") from None
    if m.vit_blocks and len(m.vit_blocks) != 4:
        raise ConfigError(f"config key 'model.vit_blocks': value {m.vit_blocks!r} must be [] or 4 block indices")
    levels = ("low", "mid", "aux", "high") + (("pd32", "pd16", "pd8", "mask") if m.decode_head == "mask2former"
                                              else ("dec0", "dec1"))
    if m.proj_levels and (len(m.proj_levels) != 3 or any(p not in levels for p in m.proj_levels)):
        raise ConfigError(f"config key 'model.proj_levels': value {m.proj_levels!r} must be [] (the head's) or 3 of "
                          f"{list(levels)} with model.decode_head={m.decode_head}")
    if m.decode_head == "mask2former" and m.m2f_hidden_dim % 32:
        raise ConfigError(f"config key 'model.m2f_hidden_dim': value {m.m2f_hidden_dim!r} must be a multiple of 32 "
                          "(the pixel decoder's GroupNorm(32))")
    if m.decode_head == "mask2former" and m.adapter == "rein" and m.m2f_queries != m.rein_tokens:
        raise ConfigError(f"config key 'model.m2f_queries': value {m.m2f_queries} with model.adapter=rein: Rein's "
                          f"tokens are the queries, so it must equal model.rein_tokens ({m.rein_tokens})")
    if len(m.vit_in_points) != 3 or len(set(m.vit_in_points)) != 3 or not all(
            re.fullmatch(r"embed|block\d+|p(4|8|16|32)", p) for p in m.vit_in_points):
        raise ConfigError(f"config key 'model.vit_in_points': value {m.vit_in_points!r} must be 3 distinct of "
                          "embed, block<i>, p4, p8, p16, p32")


def _validate_eval(cfg: Config) -> None:
    for name, proto in cfg.eval.protocols.items():
        if proto not in EVAL_PROTOCOLS:
            raise ConfigError(f"config key 'eval.protocols.{name}': value {proto!r} is not allowed; "
                              f"choose one of {list(EVAL_PROTOCOLS)}")
        if cfg.eval.targets and name not in cfg.eval.targets:
            raise ConfigError(f"config key 'eval.protocols.{name}': no target {name!r} in eval.targets "
                              f"({', '.join(cfg.eval.targets)}); name an evaluation target")
    sel = cfg.eval.selection
    if sel is not None and sel not in cfg.eval.targets:
        raise ConfigError(f"config key 'eval.selection': {sel!r} is not in eval.targets "
                          f"({', '.join(cfg.eval.targets) or 'none'}); name an evaluation target or null")
    sw = cfg.eval.sliding_window
    if sw:
        if len(sw) not in (2, 4) or min(sw) <= 0:
            raise ConfigError(f"config key 'eval.sliding_window': value {sw!r} must be [] (off), [crop, stride] "
                              "or [crop_h, crop_w, stride_h, stride_w] with positive sizes")
        crop, stride = (sw[:1] * 2, sw[1:] * 2) if len(sw) == 2 else (sw[:2], sw[2:])
        if any(s > c for s, c in zip(stride, crop)):
            raise ConfigError(f"config key 'eval.sliding_window': value {sw!r}: a stride larger than the crop "
                              "would leave pixels without a prediction; use stride <= crop")


def get_value(cfg: Config, path: str) -> Any:
    obj: Any = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "loss.cml=0"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form section.key=value (e.g. optim.lr=0.02)")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = load_yaml(raw) if raw != "" else ""
    return out


def shipped_configs() -> Path:
    """The folder of the configs shipped with the package: the repository's configs/ (which
    blindseg_dist/configs links to), installed with the package as package data."""
    return Path(str(resources.files("blindseg_dist") / "configs"))


def shipped_config_names() -> list[str]:
    """Names of the shipped training configs ("demo", "scaling/resnet50", ...; ablation grids excluded)."""
    root = shipped_configs()
    names = (q.relative_to(root).with_suffix("").as_posix() for q in root.rglob("*.yaml"))
    return sorted(n for n in names if not n.startswith("ablation/") and not n.rsplit("/", 1)[-1].startswith("_"))


def find_config(path: str | os.PathLike) -> Path:
    """``path`` if that file exists, else the shipped config it names: "configs/demo.yaml",
    "demo.yaml" and "demo" all name the packaged configs/demo.yaml, so they work from any folder
    and from an installed wheel. Raises ConfigError listing the shipped names."""
    p = Path(path)
    if p.is_file():
        return p
    parts = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
    if parts and not p.is_absolute():
        cand = shipped_configs().joinpath(*parts)
        for c in (cand, cand.with_name(cand.name + ".yaml")):
            if c.is_file():
                return c
    raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML path or a shipped config name: "
                      f"{', '.join(shipped_config_names())}")


BASE_KEY = "_base_"


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a config file with its ``_base_`` chain merged in: ``_base_: other.yaml`` (or a
    list, merged in order) names files relative to this one, or shipped config names; this file's
    keys override the bases' (sections merge key by key)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config file {str(path)!r}: _base_ cycle through {[str(p) for p in _seen]}")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        local = path.parent / str(base)
        try:
            target = local if local.is_file() else find_config(base)
        except ConfigError as e:
            raise ConfigError(f"config file {str(path)!r}: _base_ {base!r} not found next to it nor shipped ({e})") from None
        merged = _deep_merge(merged, read_config_tree(target, (*_seen, path)))
    return _deep_merge(merged, data)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file (a path or a shipped name, see find_config; its ``_base_`` chain first,
    see read_config_tree) <- overrides, validated.
    Raises ConfigError with the bad key."""
    cfg = Config()
    if path is not None:
        p = find_config(path)
        _merge(cfg, read_config_tree(p))
        if cfg.run.name is None:
            cfg.run.name = p.stem
    if overrides:
        _merge(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    if cfg.run.name is None:
        cfg.run.name = "run"
    return validate(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _adapter_kwargs(m: ModelConfig) -> dict[str, Any]:
    """The ViT adapter / patch-size options of build_model's ``vit`` (only those that are set, so
    backbones without them see nothing new)."""
    out: dict[str, Any] = {}
    if m.patch_size:
        out["patch_size"] = m.patch_size
    if m.adapter == "rein":
        out.update(adapter="rein", rein=dict(num_tokens=m.rein_tokens, rank=m.rein_rank))
    elif m.adapter == "lora":
        out.update(adapter="lora", lora=dict(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout,
                                             blocks=list(m.lora_blocks) or None, targets=m.lora_targets,
                                             init=m.lora_init, train_bias=m.lora_train_bias))
    return out


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """Arguments of model.build_model for this config (heads only where a loss uses them)."""
    return dict(
        backbone=cfg.model.backbone,
        num_classes=cfg.model.num_classes,
        output_stride=cfg.model.output_stride,
        pretrained=None if cfg.model.pretrained in (None, "none") else cfg.model.pretrained,
        aux=cfg.loss.aux > 0,
        proj_heads=cfg.loss.two_view and (cfg.loss.cwcl > 0 or cfg.loss.sdcl > 0),
        channels_last=cfg.model.channels_last,
        grad_checkpointing=cfg.model.grad_checkpointing,
        proj_levels=tuple(cfg.model.proj_levels),
        vit=dict(blocks=list(cfg.model.vit_blocks) or None, in_points=tuple(cfg.model.vit_in_points),
                 pyramid_channels=cfg.model.vit_pyramid_channels, drop_path=cfg.model.drop_path,
                 **_adapter_kwargs(cfg.model)),
        timm_kwargs=dict(cfg.model.timm_kwargs),
        freeze_backbone=cfg.model.freeze_backbone,
        freeze_blocks=cfg.model.freeze_blocks,
        in_losses=cfg.loss.two_view and (cfg.loss.cml > 0 or cfg.loss.ccl > 0),
        decode_head=cfg.model.decode_head,
        mask2former=dict(hidden_dim=cfg.model.m2f_hidden_dim, queries=cfg.model.m2f_queries,
                         encoder_layers=cfg.model.m2f_encoder_layers, decoder_layers=cfg.model.m2f_decoder_layers,
                         points=cfg.model.m2f_points) if cfg.model.decode_head == "mask2former" else None,
    )
