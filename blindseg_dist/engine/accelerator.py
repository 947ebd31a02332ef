"""Accelerator set-up: CPU (gloo) or GPU, DDP or DeepSpeed ZeRO, and the launch guard.

`make_accelerator` is the one place that builds an `accelerate.Accelerator` (training and
`blindseg eval`). On a machine without GPUs it puts Accelerate in CPU mode, so that
`accelerate launch --multi_gpu --num_processes N` forms one gloo group; under a DeepSpeed
launch config it fills and checks the DeepSpeed JSON against our config (docs/OPERATIONS.md,
"Engines").
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from .. import dist
from ..config import Config, ConfigError


class LaunchError(RuntimeError):
    """The processes of a launch do not form one group (each would train its own copy)."""


def use_deepspeed() -> bool:
    """True when `accelerate launch` was given a DeepSpeed config (it sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


PRECISIONS = ("no", "bf16", "fp16")


def resolve_precision(cfg: Config) -> str:
    """The one mixed precision of the run, written back to ``cfg.run.mixed_precision`` (and so to
    DIR/config.yaml): the config's value when set, with a warning when the launcher asked for another
    (``accelerate launch`` puts its YAML's / --mixed_precision value in ACCELERATE_MIXED_PRECISION);
    null follows the launcher, else "no"."""
    import logging

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION") or None
    mine = cfg.run.mixed_precision
    if mine is None:
        if launcher is not None and launcher not in PRECISIONS:
            raise ConfigError(f"the launcher's mixed_precision {launcher!r} is not one of {list(PRECISIONS)}")
        chosen = launcher or "no"
    else:
        chosen = mine
        if launcher is not None and launcher != mine:
            logging.getLogger(__name__).warning(
                "precision: run.mixed_precision=%s (the config) wins over the launcher's mixed_precision=%s "
                "(accelerate config / --mixed_precision); set run.mixed_precision=null to follow the launcher",
                mine, launcher)
    cfg.run.mixed_precision = chosen
    return chosen


def make_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator in CPU mode when no GPU is present (gloo), with the run's collective timeout and
    its one precision (``resolve_precision``)."""
    resolve_precision(cfg)
    cpu = not torch.cuda.is_available()
    if cpu and cfg.run.mixed_precision == "fp16":
        raise ConfigError("config key 'run.mixed_precision': value 'fp16' needs a GPU (loss scaling); "
                          "use bf16 on the CPU, or no")
    timeout = timedelta(seconds=cfg.run.dist_timeout_s)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = use_deepspeed()
    if deepspeed and cpu:
        # Accelerate ignores the DeepSpeed plugin in its CPU mode, so stay out of it and name gloo.
        os.environ["ACCELERATE_USE_CPU"] = "false"
        disable_deepspeed_shm_comm()
    elif cpu:
        # Without this, `accelerate launch --multi_gpu` on a machine without GPUs aborts in the
        # first collective; with it, the processes form one gloo group.
        os.environ["ACCELERATE_USE_CPU"] = "1"
    # an explicit backend makes Accelerate expect a process group, so name it only under a launcher
    backend = "gloo" if cpu and (launched or deepspeed) else None
    handler = InitProcessGroupKwargs(backend=backend, timeout=timeout)
    acc = Accelerator(cpu=cpu and not deepspeed, mixed_precision=cfg.run.mixed_precision,
                      gradient_accumulation_steps=cfg.optim.grad_accum, kwargs_handlers=[handler])
    check_world(acc.num_processes)
    if deepspeed:
        configure_deepspeed(acc, cfg)
    return acc


def disable_deepspeed_shm_comm() -> None:
    """DeepSpeed's CPU all-reduce op compiles for ~75 s on first use and its bf16 kernel needs AVX-512;
    gloo is enough here. BLINDSEG_DS_SHM_COMM=1 keeps it. (Edits to DeepSpeed's compatible-ops table
    persist: deepspeed/ops/__init__.py caches it in the module.)"""
    if os.environ.get("BLINDSEG_DS_SHM_COMM", "0") == "1":
        return
    # imported here: DeepSpeed is an optional dependency (pip install blindseg_dist[deepspeed])
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_precision(ds_config: dict) -> str:
    """"bf16" | "fp16" | "no" as enabled in a DeepSpeed config."""
    for name in ("bf16", "fp16"):
        if str(ds_config.get(name, {}).get("enabled", False)).lower() == "true":
            return name
    return "no"


def configure_deepspeed(acc: Accelerator, cfg: Config) -> None:
    """Fill the DeepSpeed config's "auto" values from our config and refuse disagreeing explicit ones.

    Micro-batch size, gradient accumulation and clipping belong to DeepSpeed under ZeRO (the
    engine scales the loss, steps at the boundary and clips); mixed precision too (Accelerate's
    autocast is off under DeepSpeed, the engine holds bf16/fp16 weights)."""
    plugin = acc.state.deepspeed_plugin
    conf = plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    wanted = {
        "train_micro_batch_size_per_gpu": ("data.batch_size", cfg.data.batch_size),
        "gradient_accumulation_steps": ("optim.grad_accum", cfg.optim.grad_accum),
        "gradient_clipping": ("optim.grad_clip", cfg.optim.grad_clip),
    }
    for key, (ours, value) in wanted.items():
        have = conf.get(key, "auto")
        if have == "auto":
            conf[key] = value
        elif float(have) != float(value):
            raise ConfigError(
                f"config key '{ours}': value {value!r} disagrees with \"{key}\": {have!r} in {source}; "
                f"set {ours}={have} or \"{key}\": \"auto\" in the DeepSpeed config"
            )
    conf["train_batch_size"] = cfg.data.batch_size * cfg.optim.grad_accum * acc.num_processes
    ds_mp = deepspeed_precision(conf)
    if ds_mp != cfg.run.mixed_precision:
        raise ConfigError(
            f"config key 'run.mixed_precision': value {cfg.run.mixed_precision!r} disagrees with {source}, "
            f"which trains in {ds_mp!r}; set run.mixed_precision={ds_mp} or change bf16/fp16 \"enabled\" there "
            "(\"auto\" follows run.mixed_precision)"
        )
    if "optimizer" in conf or "scheduler" in conf:
        raise ConfigError(f"{source} defines an optimizer or scheduler; blindseg uses its own optimizer and "
                          "schedule (optim.*: sgd | adamw, warm-up, poly | cosine): remove those sections")


def check_world(num_processes: int) -> None:
    """Refuse to train when the launcher's WORLD_SIZE and the process group disagree."""
    env = os.environ.get("WORLD_SIZE")
    if env is not None and int(env) != num_processes:
        raise LaunchError(
            f"the launcher started WORLD_SIZE={env} processes but this one sees a group of {num_processes}: "
            "they would train independent copies. On a machine without GPUs launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m blindseg_dist train ...` "
            "(`--cpu --num_processes N` starts one process; torchrun without CPU mode never syncs)."
        )
    if dist.world_size() != num_processes:
        raise LaunchError(f"torch.distributed sees {dist.world_size()} ranks but Accelerate {num_processes}")
