"""The training loop around Accelerate: DDP (+ synchronized BN), SGD + poly LR, two-view BlindNet.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` images per rank. The LR
scheduler is ours (not prepared by Accelerate), so it steps exactly once per optimizer step. The
streaming loader is not prepared either: each rank streams its own shards (Accelerate would
dispatch from rank 0 or split the data twice).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import dist
from ..config import Config, model_kwargs, save_config, to_dict
from ..model import build_model
from ..model.objective import BlindNetObjective, LossWeights
from ..model.syncbn import convert_sync_batchnorm
from . import checkpoint as ckpt
from .evaluate import evaluate_dataset, format_table, target_result
from .logging import RunLogger


class LaunchError(RuntimeError):
    """The processes of a launch do not form one group (each would train its own copy)."""


def make_accelerator(cfg: Config):
    """An Accelerator in CPU mode when no GPU is present (gloo), with the run's collective timeout."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()
    if cpu:
        # Without this, `accelerate launch --multi_gpu` on a machine without GPUs aborts in the
        # first collective; with it, the processes form one gloo group.
        os.environ["ACCELERATE_USE_CPU"] = "1"
    timeout = timedelta(seconds=cfg.run.dist_timeout_s)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # an explicit backend makes Accelerate expect a process group, so name it only under a launcher
    handler = InitProcessGroupKwargs(backend="gloo" if cpu and launched else None, timeout=timeout)
    acc = Accelerator(cpu=cpu, mixed_precision=cfg.run.mixed_precision, kwargs_handlers=[handler])
    check_world(acc.num_processes)
    return acc


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


def _loss_weights(cfg: Config) -> LossWeights:
    return LossWeights(**asdict(cfg.loss))


def build_eval_sets(cfg: Config) -> dict[str, Any]:
    from ..data.evalset import EvalDataset

    return {name: EvalDataset(path) for name, path in cfg.eval.targets.items()}


def run_evaluation(net, cfg: Config, device, logger: RunLogger | None = None, step: int = 0) -> dict:
    """Evaluate every target of cfg.eval.targets; returns {name: target_result}."""
    results = {}
    for name, ds in build_eval_sets(cfg).items():
        cm = evaluate_dataset(net, ds, device=device, max_images=cfg.eval.max_images, desc=f"eval {name}")
        results[name] = target_result(cm)
        if logger is not None:
            logger.scalars({f"miou/{name}": results[name]["miou"]}, step)
            logger.scalars(
                {f"iou/{name}/{c}": v for c, v in results[name]["per_class_iou"].items() if v is not None}, step
            )
    return results


def train(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    """Train with the resolved config; returns a summary (steps, time, final checkpoint, eval)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    acc = make_accelerator(cfg)
    rank, world = acc.process_index, acc.num_processes
    out_dir = Path(cfg.run.output_dir)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    net = build_model(**model_kwargs(cfg))
    start_step = 0
    resume_from = ckpt.latest_checkpoint(out_dir) if resume else None
    if resume and resume_from is None and acc.is_main_process:
        print(f"[train] --resume: no checkpoint under {out_dir / 'checkpoints'}; starting from step 0")
    if resume_from is not None:
        net.load_state_dict(ckpt.load_model_weights(resume_from))
    if world > 1:
        net = convert_sync_batchnorm(net)
    objective = BlindNetObjective(net, _loss_weights(cfg), run_seed=cfg.run.seed)
    optimizer = torch.optim.SGD(
        objective.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(cfg.optim.max_steps, cfg.optim.poly_power))
    objective, optimizer = acc.prepare(objective, optimizer)
    counters = {"nonfinite_skipped": 0, "corrupt_shards": 0}
    if resume_from is not None:
        state, rng = ckpt.load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        counters.update(state.get("counters", {}))
        if rng is not None:
            ckpt.set_rng_state(rng)
        elif acc.is_main_process:
            print(f"[train] checkpoint {resume_from} has no RNG state for rank {rank}; continuing with fresh RNG")
        if acc.is_main_process:
            print(f"[train] resumed from {resume_from} at step {start_step}")
    else:
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
        start_step=start_step * micro,
        on_corrupt=cfg.data.on_corrupt,
    )
    logger = RunLogger(out_dir / "tb")
    n_params = sum(p.numel() for p in acc.unwrap_model(objective).net.parameters())
    if acc.is_main_process:
        print(
            f"[train] world size {world} ({acc.distributed_type.value}, {acc.device}), "
            f"{n_params / 1e6:.2f}M parameters, global batch {cfg.data.batch_size * world * micro}, "
            f"steps {start_step}->{cfg.optim.max_steps}, output {out_dir}"
        )

    global_batch = cfg.data.batch_size * world
    data_iter = iter(loader)
    step = start_step
    nonfinite_in_a_row = 0
    t_last, imgs_since, steps_since = time.perf_counter(), 0, 0
    grad_bytes = sum(p.numel() * p.element_size() for p in objective.parameters() if p.requires_grad)
    dist.reset_comm_stats()
    t_start = time.perf_counter()
    last_ckpt: Path | None = resume_from
    stop_reason = "finished"
    objective.train()
    from tqdm import tqdm

    bar = tqdm(total=cfg.optim.max_steps, initial=start_step, desc="train", disable=not acc.is_main_process,
               dynamic_ncols=True, mininterval=2.0)
    with _StopFlag() as stop:
        while step < cfg.optim.max_steps:
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            bad = 0.0
            for m in range(micro):
                batch = next(data_iter)
                image, label = batch["image"].to(acc.device), batch["label"].to(acc.device)
                image_aug = batch["image_aug"].to(acc.device) if cfg.loss.two_view else None
                if cfg.model.channels_last:
                    image = image.contiguous(memory_format=torch.channels_last)
                    if image_aug is not None:
                        image_aug = image_aug.contiguous(memory_format=torch.channels_last)
                b = image.shape[0]
                gidx = (step * micro + m) * global_batch + rank * b + torch.arange(b)
                sync = acc.no_sync(objective) if (m < micro - 1 and world > 1) else contextlib.nullcontext()
                with sync, acc.autocast():
                    out = objective(image, label, image_aug, step=step * micro + m, global_index=gidx)
                    loss = out["total"] / micro
                # All ranks agree on skipping a non-finite step (one tiny all-reduce), so none hangs.
                flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, 1.0 if stop.requested else 0.0])
                flag = dist.all_reduce_sum(flag, tag="control")
                if flag[1] > 0:
                    stop.requested = True
                if flag[0] > 0:
                    bad = 1.0
                    break
                acc.backward(loss)
                for k, v in out["terms"].items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / micro
                sums["total"] = sums.get("total", 0.0) + float(out["total"].detach()) / micro
                imgs_since += b * world
                if "corrupt_shards" in batch:
                    counters["corrupt_shards"] = max(counters["corrupt_shards"], int(batch["corrupt_shards"]))
            if bad:
                counters["nonfinite_skipped"] += 1
                nonfinite_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                if acc.is_main_process:
                    print(f"[train] step {step}: non-finite loss, step skipped ({nonfinite_in_a_row} in a row)")
                if nonfinite_in_a_row >= cfg.run.max_nonfinite:
                    stop_reason = f"stopped: {nonfinite_in_a_row} non-finite losses in a row (run.max_nonfinite)"
                    break
                if stop.requested:
                    stop_reason = "stopped by signal"
                    break
                continue
            nonfinite_in_a_row = 0
            if cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(objective.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            steps_since += 1
            bar.update(1)
            if step % cfg.run.log_every == 0 or step == cfg.optim.max_steps:
                now = time.perf_counter()
                names = sorted(sums)
                vals = dist.all_reduce_sum(torch.tensor([sums[k] for k in names], dtype=torch.float64), tag="log") / world
                scalars = {f"loss/{k}": float(v) for k, v in zip(names, vals)}
                scalars["lr"] = scheduler.get_last_lr()[0]
                scalars["images_per_s"] = imgs_since / max(now - t_last, 1e-9)
                scalars["faults/nonfinite_skipped"] = counters["nonfinite_skipped"]
                scalars["faults/corrupt_shards"] = counters["corrupt_shards"]
                # bytes per optimizer step, averaged since the last log, beside the gradient all-reduce payload
                for tag, nbytes in dist.comm_stats().items():
                    scalars[f"comm_bytes/{tag}"] = nbytes / steps_since
                scalars["comm_bytes/gradient_allreduce"] = grad_bytes if world > 1 else 0
                dist.reset_comm_stats()
                logger.scalars(scalars, step)
                bar.set_postfix(loss=f"{scalars['loss/total']:.3f}", ips=f"{scalars['images_per_s']:.1f}")
                t_last, imgs_since, steps_since = now, 0, 0
            if stop.requested:
                stop_reason = "stopped by signal"
                break
            if step % cfg.run.checkpoint_every == 0 and step < cfg.optim.max_steps:
                last_ckpt = _save(acc, objective, optimizer, scheduler, step, counters, cfg, config_yaml)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.optim.max_steps:
                run_evaluation(acc.unwrap_model(objective).net, cfg, acc.device, logger, step)
    bar.close()
    last_ckpt = _save(acc, objective, optimizer, scheduler, step, counters, cfg, config_yaml)
    elapsed = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "world_size": world,
        "steps": step,
        "stop_reason": stop_reason,
        "seconds": elapsed,
        "checkpoint": str(last_ckpt),
        "counters": counters,
    }
    if stop_reason == "finished" and cfg.eval.at_end and cfg.eval.targets:
        results = run_evaluation(acc.unwrap_model(objective).net, cfg, acc.device, logger, step)
        summary["eval"] = {"world_size": world, "targets": results}
        if acc.is_main_process:
            (out_dir / "eval.json").write_text(json.dumps(summary["eval"], indent=1))
            print(format_table(results))
    logger.close()
    if acc.is_main_process:
        (out_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=1))
        print(f"[train] {stop_reason} at step {step} in {elapsed:.0f} s; checkpoint {last_ckpt}")
    dist.barrier()
    if stop_reason.startswith("stopped: "):
        raise SystemExit(f"[train] {stop_reason}; last checkpoint {last_ckpt}")
    return summary


def _save(acc, objective, optimizer, scheduler, step, counters, cfg: Config, config_yaml: str) -> Path:
    net = acc.unwrap_model(objective).net
    return ckpt.save_checkpoint(
        cfg.run.output_dir,
        step,
        model_state=net.state_dict(),
        state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "counters": dict(counters)},
        config_yaml=config_yaml,
        keep_last=cfg.run.keep_last,
    )

