"""The training loop around Accelerate: DDP (+ synchronized BN) or DeepSpeed ZeRO, SGD + poly LR.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` images per rank. The LR
scheduler is ours (not prepared by Accelerate), so it steps exactly once per optimizer step. The
streaming loader is not prepared either: each rank streams its own shards (Accelerate would
dispatch from rank 0 or split the data twice).

Engines (DISTRIBUTED.md 3, 4), one training step for both:
- DDP: micro-batches before the last run under ``no_sync``; Accelerate divides the loss by
  grad_accum; clipping by ``accelerator.clip_grad_norm_``; bf16 by Accelerate's autocast.
- DeepSpeed (``accelerate launch --config_file launch/accelerate/deepspeed_zero*.yaml``):
  the engine owns gradient accumulation (we mark the last micro-batch with
  ``accelerator.sync_gradients``; the engine scales the loss and steps there), clipping and
  mixed precision come from the DeepSpeed JSON, whose "auto" values are filled from this config
  and whose explicit values must agree with it (configure_deepspeed). Never no_sync (ZeRO 2/3).

Exit codes: 0 finished, or stopped by SIGTERM/SIGINT after writing a checkpoint; 2 config error;
3 stopped after run.max_nonfinite non-finite losses in a row (checkpoint written);
4 a collective failed: another rank died or hung longer than run.dist_timeout_s.

Testing hooks (environment variables, read once; tests/engine/test_faults.py uses them):
BLINDSEG_FAULT_RANK (default 0) is the rank they act on; BLINDSEG_FAULT_NAN="1,3" makes the loss
non-finite at those step attempts (0-based, skipped attempts count); BLINDSEG_FAULT_EXIT=k ends
the process with os._exit(17) at attempt k; BLINDSEG_FAULT_HANG=k makes it sleep forever there.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import dist
from ..config import Config, ConfigError, model_kwargs, save_config, to_dict
from ..model import build_model
from ..model.objective import BlindNetObjective
from ..model.pretrained import check_pretrained
from ..model.syncbn import convert_sync_batchnorm
from . import checkpoint as ckpt
from .evaluate import evaluate_targets, format_table
from .logging import RunLogger, log_images

EXIT_NONFINITE = 3
EXIT_COLLECTIVE = 4


class LaunchError(RuntimeError):
    """The processes of a launch do not form one group (each would train its own copy)."""


def use_deepspeed() -> bool:
    """True when `accelerate launch` was given a DeepSpeed config (it sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: Config):
    """An Accelerator in CPU mode when no GPU is present (gloo), with the run's collective timeout."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

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
        _disable_deepspeed_shm_comm()
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


def _disable_deepspeed_shm_comm() -> None:
    """DeepSpeed's CPU all-reduce op compiles for ~75 s on first use and its bf16 kernel needs AVX-512;
    gloo is enough here. BLINDSEG_DS_SHM_COMM=1 keeps it. (Edits to DeepSpeed's compatible-ops table
    persist: deepspeed/ops/__init__.py caches it in the module.)"""
    if os.environ.get("BLINDSEG_DS_SHM_COMM", "0") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_precision(ds_config: dict) -> str:
    """"bf16" | "fp16" | "no" as enabled in a DeepSpeed config."""
    for name in ("bf16", "fp16"):
        if str(ds_config.get(name, {}).get("enabled", False)).lower() == "true":
            return name
    return "no"


def configure_deepspeed(acc, cfg: Config) -> None:
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
        raise ConfigError(f"{source} defines an optimizer or scheduler; blindseg uses its own SGD and poly "
                          "schedule (optim.*): remove those sections")


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


def poly_lambda(max_steps: int, power: float):
    return lambda step: max(0.0, 1.0 - step / max_steps) ** power


class _StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Faults:
    """The testing hooks of the module docstring (inactive unless their variables are set)."""

    def __init__(self, rank: int) -> None:
        env = os.environ.get
        on = rank == int(env("BLINDSEG_FAULT_RANK", "0"))
        self.nan = {int(v) for v in env("BLINDSEG_FAULT_NAN", "").split(",") if v.strip()} if on else set()
        self.exit_at = int(env("BLINDSEG_FAULT_EXIT")) if on and env("BLINDSEG_FAULT_EXIT") else None
        self.hang_at = int(env("BLINDSEG_FAULT_HANG")) if on and env("BLINDSEG_FAULT_HANG") else None

    def before_step(self, attempt: int, rank: int) -> None:
        if attempt == self.exit_at:
            print(f"[fault] rank {rank}: exiting abruptly at step attempt {attempt}", flush=True)
            os._exit(17)
        if attempt == self.hang_at:
            print(f"[fault] rank {rank}: hanging at step attempt {attempt}", flush=True)
            while True:
                time.sleep(60)

    def loss(self, loss: torch.Tensor, attempt: int) -> torch.Tensor:
        return loss * float("nan") if attempt in self.nan else loss


def _stream_record(cfg: Config, keys: list[list[str]], net: torch.nn.Module, rank: int) -> dict:
    """What this rank streamed (sample keys per micro-batch, their shards) and a hash of its weights."""
    manifest = Path(cfg.data.train) / "manifest.json"
    shard_of = {}
    if manifest.is_file():
        shard_of = {s["key"]: s["shard"] for s in json.loads(manifest.read_text()).get("samples", [])}
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"rank": rank, "keys": keys, "shards": sorted({shard_of.get(k, "?") for b in keys for k in b}),
            "params_sha256": h.hexdigest()}


def train(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    """Train with the resolved config; returns a summary (steps, time, final checkpoint, eval)."""
    check_pretrained(cfg.model)  # a recipe that needs ImageNet weights stops here, before any output
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    acc = make_accelerator(cfg)
    deepspeed = acc.distributed_type.value == "DEEPSPEED"
    rank, world = acc.process_index, acc.num_processes
    out_dir = Path(cfg.run.output_dir)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    net = build_model(**model_kwargs(cfg))
    if cfg.model.init_from:  # weights only; a --resume checkpoint below replaces them
        ckpt.load_init_weights(net, cfg.model.init_from)
    resume_from = ckpt.latest_checkpoint(out_dir) if resume else None
    if resume and resume_from is None and acc.is_main_process:
        print(f"[train] --resume: no checkpoint under {out_dir / 'checkpoints'}; starting from step 0")
    if resume_from is not None:
        net.load_state_dict(ckpt.load_model_weights(resume_from))
    if world > 1:
        net = convert_sync_batchnorm(net)  # before prepare() (DISTRIBUTED.md 4)
    objective = BlindNetObjective(net, cfg.loss, run_seed=cfg.run.seed)
    optimizer = torch.optim.SGD(
        objective.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(cfg.optim.max_steps, cfg.optim.poly_power))
    n_params = sum(p.numel() for p in net.parameters())  # before prepare: ZeRO-3 partitions them
    grad_bytes = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    objective, optimizer = acc.prepare(objective, optimizer)
    # DeepSpeed holds 16-bit weights under bf16/fp16 (Accelerate's autocast is off there): feed that dtype
    in_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.mixed_precision) if deepspeed else None
    counters = {"nonfinite_skipped": 0, "corrupt_shards": 0}
    start_step, rng = 0, None
    if resume_from is not None:
        start_step, rng = _restore(acc, objective, optimizer, scheduler, counters, resume_from, deepspeed)
    torch.manual_seed(cfg.run.seed + 1000 * rank)  # per-rank stream for dropout

    from ..data.stream import make_train_loader

    micro = cfg.optim.grad_accum
    loader = make_train_loader(
        cfg.data.train,
        batch_size=cfg.data.batch_size,
        crop_size=cfg.data.crop_size,
        scale_range=tuple(cfg.data.scale_range),
        class_uniform=cfg.data.class_uniform,
        num_workers=cfg.data.num_workers,
        seed=cfg.run.seed,
        rank=rank,
        world_size=world,
        start_step=start_step * micro,  # the stream position (exact while no step was skipped)
        on_corrupt=cfg.data.on_corrupt,
    )
    logger = RunLogger(out_dir / "tb")
    if acc.is_main_process:
        engine = f"DeepSpeed ZeRO-{acc.state.deepspeed_plugin.zero_stage}" if deepspeed else acc.distributed_type.value
        print(
            f"[train] world size {world} ({engine}, {acc.device}, precision {cfg.run.mixed_precision}), "
            f"{n_params / 1e6:.2f}M parameters, global batch {cfg.data.batch_size * world * micro}, "
            f"steps {start_step}->{cfg.optim.max_steps}, output {out_dir}", flush=True
        )

    global_batch = cfg.data.batch_size * world
    data_iter = iter(loader)  # draws a seed from torch's RNG: restore the checkpoint's RNG after it
    if rng is not None:
        ckpt.set_rng_state(rng)
    elif resume_from is not None and acc.is_main_process:
        print(f"[train] checkpoint {resume_from} has no RNG state for rank {rank}; continuing with fresh RNG")
    step, attempt = start_step, 0
    faults = _Faults(rank)
    streamed: list[list[str]] | None = [] if cfg.run.record_stream else None
    nonfinite_in_a_row = 0
    t_last, imgs_since, steps_since = time.perf_counter(), 0, 0
    dist.reset_comm_stats()
    t_start = time.perf_counter()
    last_ckpt: Path | None = resume_from
    stop_reason = "finished"
    last_loss: float | None = None
    objective.train()
    from tqdm import tqdm

    bar = tqdm(total=cfg.optim.max_steps, initial=start_step, desc="train", disable=not acc.is_main_process,
               dynamic_ncols=True, mininterval=2.0)
    with _StopFlag() as signal_flag:
        try:
            while step < cfg.optim.max_steps:
                # ---- one optimizer step: `micro` micro-batches, then step (or skip) --------------
                faults.before_step(attempt, rank)
                sums: dict[str, float] = {}
                skip = stop = False
                for m in range(micro):
                    batch = next(data_iter)
                    image, label = batch["image"].to(acc.device, in_dtype), batch["label"].to(acc.device)
                    image_aug = batch["image_aug"].to(acc.device, in_dtype) if cfg.loss.two_view else None
                    if cfg.model.channels_last:
                        image = image.contiguous(memory_format=torch.channels_last)
                        if image_aug is not None:
                            image_aug = image_aug.contiguous(memory_format=torch.channels_last)
                    if streamed is not None:
                        streamed.append(list(batch["keys"]))
                    b = image.shape[0]
                    gidx = (step * micro + m) * global_batch + rank * b + torch.arange(b)
                    last = m == micro - 1
                    # The last micro-batch closes the accumulation: DDP all-reduces only there (no_sync
                    # before it), DeepSpeed steps there; the prepared optimizer steps only when it is set.
                    acc.sync_gradients = last
                    no_sync = not last and world > 1 and not deepspeed
                    with acc.no_sync(objective) if no_sync else contextlib.nullcontext():
                        with acc.autocast():
                            out = objective(image, label, image_aug, step=step * micro + m, global_index=gidx)
                        loss = faults.loss(out["total"], attempt)
                        # Every rank learns whether any loss is non-finite or any rank got SIGTERM (one
                        # tiny all-reduce), so all skip or stop at the same step and none hangs.
                        flag = torch.tensor([float(not torch.isfinite(loss)), float(signal_flag.requested)])
                        flag = dist.all_reduce_sum(flag, tag="control")
                        stop = stop or bool(flag[1] > 0)
                        if flag[0] > 0:
                            skip = True
                            break
                        acc.backward(loss)  # DDP: loss / micro; DeepSpeed: the engine scales and steps
                    for k, v in out["terms"].items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / micro
                    sums["total"] = sums.get("total", 0.0) + float(out["total"].detach()) / micro
                    imgs_since += b * world
                    if "corrupt_shards" in batch:
                        counters["corrupt_shards"] = max(counters["corrupt_shards"], int(batch["corrupt_shards"]))
                attempt += 1
                if skip:
                    acc.sync_gradients = True
                    if deepspeed:
                        objective.zero_grad()  # the engine's accumulated (partitioned) gradients
                    else:
                        optimizer.zero_grad(set_to_none=True)
                    counters["nonfinite_skipped"] += 1
                    nonfinite_in_a_row += 1
                    if acc.is_main_process:
                        print(f"[train] step {step}: non-finite loss, step skipped ({nonfinite_in_a_row} in a row)")
                    if nonfinite_in_a_row >= cfg.run.max_nonfinite:
                        stop_reason = f"stopped: {nonfinite_in_a_row} non-finite losses in a row (run.max_nonfinite)"
                        break
                    if stop:
                        stop_reason = "stopped by signal"
                        break
                    continue
                nonfinite_in_a_row = 0
                if cfg.optim.grad_clip > 0 and not deepspeed:  # DeepSpeed clips inside its step
                    acc.clip_grad_norm_(objective.parameters(), cfg.optim.grad_clip)
                optimizer.step()  # a no-op under DeepSpeed (the engine stepped in backward)
                scheduler.step()  # ours: once per optimizer step, on every engine
                optimizer.zero_grad(set_to_none=True)
                step += 1
                steps_since += 1
                bar.update(1)
                # ---- hooks: logging, checkpoint, evaluation -------------------------------------
                if step % cfg.run.log_every == 0 or step == cfg.optim.max_steps:
                    now = time.perf_counter()
                    names = sorted(sums)
                    vals = dist.all_reduce_sum(torch.tensor([sums[k] for k in names], dtype=torch.float64), tag="log")
                    scalars = {f"loss/{k}": float(v) / world for k, v in zip(names, vals)}
                    scalars["lr"] = optimizer.param_groups[0]["lr"]  # what the engine's optimizer uses
                    scalars["images_per_s"] = imgs_since / max(now - t_last, 1e-9)
                    scalars["faults/nonfinite_skipped"] = counters["nonfinite_skipped"]
                    scalars["faults/corrupt_shards"] = counters["corrupt_shards"]
                    # bytes per optimizer step, averaged since the last log, beside the gradient all-reduce payload
                    for tag, nbytes in dist.comm_stats().items():
                        scalars[f"comm_bytes/{tag}"] = nbytes / steps_since
                    scalars["comm_bytes/gradient_allreduce"] = grad_bytes if world > 1 else 0
                    dist.reset_comm_stats()
                    logger.scalars(scalars, step)
                    last_loss = scalars["loss/total"]
                    bar.set_postfix(loss=f"{scalars['loss/total']:.3f}", ips=f"{scalars['images_per_s']:.1f}")
                    t_last, imgs_since, steps_since = now, 0, 0
                if cfg.run.image_every and step % cfg.run.image_every == 0:
                    log_images(logger, batch, out["logits"], step)  # rank 0 only (others: no writer)
                if stop:
                    stop_reason = "stopped by signal"
                    break
                if step % cfg.run.checkpoint_every == 0 and step < cfg.optim.max_steps:
                    last_ckpt = _save(acc, objective, optimizer, scheduler, step, counters, cfg, config_yaml, deepspeed)
                if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.optim.max_steps:
                    evaluate_targets(acc.unwrap_model(objective).net, cfg.eval, acc.device, logger, step)
            bar.close()
            last_ckpt = _save(acc, objective, optimizer, scheduler, step, counters, cfg, config_yaml, deepspeed)
        except RuntimeError as err:
            if world == 1:
                raise
            # A collective failed: a peer died (connection closed) or hung past run.dist_timeout_s.
            # Exit at once: any further collective (checkpoint, barrier) would wait for it again.
            print(f"\n[train] rank {rank}: a collective failed at step {step} ({type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''}). Another rank died or hung longer than "
                  f"run.dist_timeout_s={cfg.run.dist_timeout_s}; see its log. Last checkpoint: {last_ckpt}; "
                  "continue with --resume.", file=sys.stderr, flush=True)
            os._exit(EXIT_COLLECTIVE)
    elapsed = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "world_size": world,
        "engine": f"deepspeed_zero{acc.state.deepspeed_plugin.zero_stage}" if deepspeed else "ddp",
        "steps": step,
        "stop_reason": stop_reason,
        "seconds": elapsed,
        "checkpoint": str(last_ckpt),
        "counters": counters,
        "lr": optimizer.param_groups[0]["lr"],
        "last_loss": last_loss,
    }
    if streamed is not None:
        record = _stream_record(cfg, streamed, acc.unwrap_model(objective).net, rank)
        (out_dir / f"streamed-rank{rank}.json").write_text(json.dumps(record))
    if stop_reason == "finished" and cfg.eval.at_end and cfg.eval.targets:
        results = evaluate_targets(acc.unwrap_model(objective).net, cfg.eval, acc.device, logger, step)
        summary["eval"] = {"world_size": world, "targets": results}
        if acc.is_main_process:
            (out_dir / "eval.json").write_text(json.dumps(summary["eval"], indent=1))
            print(format_table(results))
    logger.close()
    if acc.is_main_process:
        (out_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=1))
        print(f"[train] {stop_reason} at step {step} in {elapsed:.0f} s; checkpoint {last_ckpt}", flush=True)
    dist.barrier()
    if stop_reason.startswith("stopped: "):
        print(f"[train] {stop_reason}; last checkpoint {last_ckpt}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NONFINITE)
    return summary


def _restore(acc, objective, optimizer, scheduler, counters: dict, path: Path, deepspeed: bool):
    """Load optimizer, scheduler and counters from checkpoint ``path``; returns (step, this rank's RNG or None)."""
    state, rng = ckpt.load_state(path)
    if deepspeed:  # partitioned optimizer state, one file per rank
        objective.load_checkpoint(str(path / "deepspeed"), tag="engine", load_optimizer_states=True,
                                  load_lr_scheduler_states=False)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    counters.update(state.get("counters", {}))
    if acc.is_main_process:
        print(f"[train] resumed from {path} at step {state['step']}")
    return int(state["step"]), rng


def _save(acc, objective, optimizer, scheduler, step, counters, cfg: Config, config_yaml: str, deepspeed: bool) -> Path:
    # get_state_dict gathers full parameters under ZeRO-3 (collective; stage3_gather_16bit_weights_on_model_save)
    full = acc.get_state_dict(objective) or {}  # None on ranks > 0 under ZeRO-3
    model_state = {k[len("net."):]: v for k, v in full.items() if k.startswith("net.")}

    def engine_state(tmp: Path) -> None:  # every rank writes its optimizer partition
        objective.save_checkpoint(str(tmp / "deepspeed"), tag="engine", save_latest=False)

    return ckpt.save_checkpoint(
        cfg.run.output_dir,
        step,
        model_state=model_state,
        state={"optimizer": None if deepspeed else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "counters": dict(counters)},
        config_yaml=config_yaml,
        keep_last=cfg.run.keep_last,
        collective_save=engine_state if deepspeed else None,
    )
