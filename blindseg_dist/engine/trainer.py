"""The training loop around Accelerate: DDP (+ synchronized BN) or DeepSpeed ZeRO.

``TrainLoop`` is the loop and its hooks (engine/hooks.py), without a model; ``Trainer`` adds the
set-up (accelerator, model, optimizer, data stream, resume) and ``train_step``. Everything
periodic (logging, images, checkpoints, evaluation, the progress bar, the summary) is a hook.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` images per rank. The LR
scheduler (engine/optim.py) is ours (not prepared by Accelerate), so it steps exactly once per
optimizer step. The streaming loader is not prepared either: each rank streams its own shards
(Accelerate would dispatch from rank 0 or split the data twice).

Engines (docs/OPERATIONS.md, "Engines"), one training step for both:
- DDP: micro-batches before the last run under ``no_sync``; Accelerate divides the loss by
  grad_accum; clipping by ``accelerator.clip_grad_norm_``; bf16 by Accelerate's autocast.
- DeepSpeed (``accelerate launch --config_file launch/accelerate/deepspeed_zero*.yaml``):
  the engine owns gradient accumulation (we mark the last micro-batch with
  ``accelerator.sync_gradients``; the engine scales the loss and steps there), clipping and
  mixed precision come from the DeepSpeed JSON, whose "auto" values are filled from this config
  and whose explicit values must agree with it (accelerator.configure_deepspeed). Never no_sync
  (ZeRO 2/3).

Exit codes (errors.py): a rank that fails prints its error; on 2+ processes the others name that
rank and its error and exit with its code.

Fault injection for the tests (environment variables): engine/faults.py, installed at set-up only
when its variables are set.
"""
from __future__ import annotations

import abc
import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from .. import dist
from ..config import Config, model_kwargs, save_config, to_dict
from ..data.stream import smallest_frame, train_loader_from_config
from ..data.workers import die_with_parent, shutdown_workers
from ..errors import EXIT_COLLECTIVE, EXIT_NONFINITE, ConfigError, exit_code
from ..losses.plans import PLAN_KEY, SDCL_KEY, STEP_KEY, LoaderPlanner
from ..model import build_model
from ..model.backbones import check_backbone
from ..model.objective import BlindNetObjective, projection_sizes
from ..model.pretrained import check_pretrained
from ..model.syncbn import convert_sync_batchnorm
from . import checkpoint as ckpt
from . import faults
from .accelerator import make_accelerator
from .evaluate import evaluate_targets, selection_target
from .hooks import (BestCheckpointHook, CheckpointHook, EvalHook, Hook, ImageHook, LogHook, MetricsFileHook,
                    ProgressBar, StepOutput, StreamRecordHook, SummaryHook)
from .logging import RunLogger
from .optim import build_optimizer
from .rundir import plan_run, resume_values


class _StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the next step boundary.

    Installed from the start of the set-up (a signal during set-up stops the run after its first
    step) until the end of ``train()``; restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def install(self) -> "_StopFlag":
        if self._old:
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


class TrainLoop(abc.ABC):
    """Steps from ``step`` to ``max_steps`` and calls the hooks (engine/hooks.py) around them.

    A subclass gives ``train_step`` (one optimizer step; sets ``stop_reason`` to end the loop),
    ``summary``, ``close`` and what its hooks call (``save_checkpoint``, ``evaluate``, ...)."""

    def __init__(self, *, max_steps: int, start_step: int = 0, rank: int = 0, world: int = 1,
                 dist_timeout_s: float | None = None) -> None:
        self.step, self.max_steps = start_step, max_steps
        self.rank, self.world = rank, world
        self.dist_timeout_s = dist_timeout_s  # named in the message of a failed collective
        self.stop_reason: str | None = None  # set when the loop is to end; "finished" at max_steps
        self.last_checkpoint: Path | None = None
        self.protected: list[Path] = []  # checkpoints keep_last must not delete (the best one)
        self.signal = _StopFlag()
        self.hooks: list[Hook] = []
        # seconds since the start of the loop: waiting for the loader (next_batch), and the rest of
        # the steps (compute, including skipped steps); LogHook logs them per interval (time/data, time/step)
        self.seconds = {"data": 0.0, "step": 0.0}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def register_hooks(self, hooks: list[Hook]) -> None:
        """Append hooks; they run in this order (see engine/hooks.py for when)."""
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def call_hooks(self, method: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, method)(*args)

    def train(self) -> dict[str, Any]:
        """Run the loop; returns the summary. Exits 3 after too many non-finite losses, 4 when a
        collective fails on a multi-process run."""
        t_start = time.perf_counter()
        with self.signal, self._exit_on_collective_failure():  # a signal until the very end only sets the flag
            self.call_hooks("before_train")
            while self.step < self.max_steps and self.stop_reason is None:
                t, data = time.perf_counter(), self.seconds["data"]
                taken = self.train_step()
                self.seconds["step"] += time.perf_counter() - t - (self.seconds["data"] - data)
                if taken:
                    self.call_hooks("after_step")
            self.stop_reason = self.stop_reason or "finished"
            self.call_hooks("after_train")
            summary = self.summary(time.perf_counter() - t_start)
            self.call_hooks("summarize", summary)
            self.close()
        if self.stop_reason.startswith("stopped: "):
            print(f"[train] {self.stop_reason}; last checkpoint {self.last_checkpoint}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_NONFINITE)
        return summary

    @abc.abstractmethod
    def train_step(self) -> bool:
        """One optimizer step; True when it was taken (False: skipped, hooks not called)."""

    def next_batch(self) -> Any:
        """The next batch of ``self.data_iter``; the time spent waiting for it counts as data time."""
        t = time.perf_counter()
        try:
            return next(self.data_iter)
        finally:
            self.seconds["data"] += time.perf_counter() - t

    def summary(self, seconds: float) -> dict[str, Any]:
        """The run summary handed to the hooks' ``summarize``."""
        return {"world_size": self.world, "steps": self.step, "stop_reason": self.stop_reason,
                "seconds": seconds, "checkpoint": str(self.last_checkpoint)}

    def close(self) -> None:
        """Release what the run holds, after the summary."""

    @contextlib.contextmanager
    def _exit_on_collective_failure(self, during: str | None = None) -> Iterator[None]:
        """On 2+ processes (``during``: "set-up" when not in the loop), an exception ends this rank at once (any further collective would wait
        for the others): this rank's own error is printed, recorded for the others (exit 1, or 2
        for a config error); a failed collective names the rank that failed first and its error
        (and exits with its code), or, when no rank recorded one, a dead or hung peer (exit 4)."""
        try:
            yield
        except Exception as err:
            if self.world == 1:
                raise
            first = str(err).splitlines()[0] if str(err) else ""
            where = f"during {during}" if during else f"at step {self.step}"
            if dist.is_collective_failure(err):
                peer = dist.read_failure()
                if peer is not None and peer.get("rank") != self.rank:
                    peer_where = peer.get("where") or f"at step {peer['step']}"
                    print(f"\n[train] rank {self.rank}: stopping {where}: rank {peer['rank']} failed "
                          f"{peer_where} with {peer['error']} (its traceback is in its output). Last "
                          f"checkpoint: {self.last_checkpoint}.", file=sys.stderr, flush=True)
                    os._exit(int(peer.get("exit", 1)))
                # A peer died (connection closed) or hung past run.dist_timeout_s without a word.
                print(f"\n[train] rank {self.rank}: a collective failed {where} ({type(err).__name__}: "
                      f"{first}). Another rank died or hung longer than run.dist_timeout_s="
                      f"{self.dist_timeout_s}; see its log. Last checkpoint: {self.last_checkpoint}; continue "
                      f"with --resume.", file=sys.stderr, flush=True)
                os._exit(EXIT_COLLECTIVE)
            code = exit_code(err, setup=during is not None)
            dist.publish_failure({"rank": self.rank, "step": self.step, "error": f"{type(err).__name__}: {first}",
                                  "exit": code, "where": where})
            traceback.print_exc()
            print(f"[train] rank {self.rank}: failed {where} ({type(err).__name__}: {first}); the other "
                  f"ranks stop too. Last checkpoint: {self.last_checkpoint}.", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(code)


class Trainer(TrainLoop):
    """BlindNet training with the resolved config ``cfg``. ``resume``: True = from the run's latest
    checkpoint, a path = from that checkpoint or run folder; ``allow_changed``: resume keys that may
    differ from the checkpoint's (engine/rundir.py)."""

    def __init__(self, cfg: Config, *, resume: bool | str = False, allow_changed: tuple[str, ...] = (),
                 hooks: list[Hook] | None = None) -> None:
        stop = _StopFlag().install()  # from now on SIGTERM/SIGINT stop the run after its next step
        if os.environ.get("TORCHELASTIC_RUN_ID"):  # a launcher that dies (kill -9) sends us SIGTERM: checkpoint, exit
            die_with_parent(signal.SIGTERM)
        try:
            self._setup(cfg, resume, allow_changed, hooks)
        except BaseException:
            stop.restore()
            raise
        self.signal = stop

    def _setup(self, cfg: Config, resume: bool | str, allow_changed: tuple[str, ...],
               hooks: list[Hook] | None) -> None:
        check_backbone(cfg.model.backbone)  # a name the model code does not know stops here, before any output
        check_pretrained(cfg.model)  # a recipe that needs ImageNet weights stops here, before any output
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.cfg, self.micro = cfg, cfg.optim.grad_accum
        self.acc = make_accelerator(cfg)
        if self.acc.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop: cuDNN picks its kernels once
        self.deepspeed = self.acc.distributed_type.value == "DEEPSPEED"
        super().__init__(max_steps=cfg.optim.max_steps, rank=self.acc.process_index, world=self.acc.num_processes,
                         dist_timeout_s=cfg.run.dist_timeout_s)
        # from here the process group exists: an error on one rank is recorded and named by the others
        with self._exit_on_collective_failure(during="set-up"):
            self._setup_run(cfg, resume, allow_changed, hooks)

    def _setup_run(self, cfg: Config, resume: bool | str, allow_changed: tuple[str, ...],
                   hooks: list[Hook] | None) -> None:
        """Set-up after the accelerator (process group) and the loop's counters exist."""
        self._check_data(cfg)
        plan = plan_run(cfg, resume, self.world, tuple(allow_changed))  # refusals: before anything is written
        self.out_dir, self.run_id, resume_from = plan.out_dir, plan.run_id, plan.resume_from
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        self.config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        if resume and resume_from is None and self.is_main:
            print(f"[train] --resume: no checkpoint under {self.out_dir / 'checkpoints'}; starting from step 0")
        faults.install(self)  # testing only: nothing unless BLINDSEG_FAULT_* is set
        rng = self._build_model(resume_from)
        self._build_stream(resume_from, rng)
        self.register_hooks(default_hooks(self) if hooks is None else hooks)

    def _check_data(self, cfg: Config) -> None:
        """What only the launch knows: the world size (BatchNorm needs 2+ images per step across
        ranks: the ASPP image pooling has one value per image and channel) and the frames' sizes."""
        if cfg.data.batch_size * self.world < 2:
            raise ConfigError(f"config key 'data.batch_size': value {cfg.data.batch_size} on {self.world} process: "
                              "BatchNorm in training needs at least 2 images per step over all processes; use "
                              "data.batch_size >= 2 or more processes")
        frame = smallest_frame(cfg.data.train)
        if frame is not None and cfg.data.crop_size > min(frame) and self.is_main:
            import logging

            logging.getLogger("blindseg_dist").warning(
                "data.crop_size=%d is larger than the smallest training frame (%dx%d in %s): such crops are padded "
                "(image 0, label ignored) at scale 1", cfg.data.crop_size, frame[1], frame[0], cfg.data.train)

    def _build_model(self, resume_from: Path | None) -> dict | None:
        """Model, objective, optimizer and scheduler, prepared; restored from ``resume_from``.
        Returns this rank's RNG state from the checkpoint (None: none to restore)."""
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        net = build_model(**model_kwargs(cfg))
        # CWCL's label-only sampling is planned in the loader workers at these sizes (losses/plans.py)
        self.plan_sizes = (projection_sizes(net, cfg.data.crop_size)
                           if cfg.loss.two_view and (cfg.loss.cwcl > 0 or cfg.loss.sdcl > 0) else None)
        if cfg.model.init_from:  # weights only; a --resume checkpoint below replaces them
            ckpt.load_init_weights(net, cfg.model.init_from)
        self._frozen_checkpoints(net)
        if resume_from is not None:
            partial = ckpt.frozen_source(resume_from, self.pretrained_file or "none") is not None
            if partial and self.pretrained_file is None:
                from ..config import ConfigError

                raise ConfigError(f"config key 'model.pretrained': checkpoint {resume_from} holds the trained tensors "
                                  "only and its frozen backbone comes from a weights file; set model.pretrained to it")
            ckpt.fit_weights(net, ckpt.load_model_weights(resume_from), resume_from, partial=partial)
        if self.world > 1:
            net = convert_sync_batchnorm(net)  # before prepare() (docs/OPERATIONS.md, "Engines")
        if cfg.run.compile:  # in place: parameters and state_dict keys unchanged (model/compiled.py)
            from ..model.compiled import compile_network

            compile_network(net, cfg.run.compile_backend)
        objective = BlindNetObjective(net, cfg.loss, run_seed=cfg.run.seed)
        optimizer, self.scheduler = build_optimizer(cfg, objective)
        self.n_params = sum(p.numel() for p in net.parameters())  # before prepare: ZeRO-3 partitions them
        self.n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        self.grad_bytes = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
        self.objective, self.optimizer = self.acc.prepare(objective, optimizer)
        self.ema = None
        if cfg.optim.ema_decay > 0:
            if self.deepspeed:
                from ..config import ConfigError

                raise ConfigError("config key 'optim.ema_decay': the EMA of the weights runs under DDP only "
                                  "(DeepSpeed partitions them); set optim.ema_decay=0")
            from .ema import WeightEMA

            self.ema = WeightEMA(net, cfg.optim.ema_decay, cfg.optim.ema_start)
        # DeepSpeed holds 16-bit weights under bf16/fp16 (Accelerate's autocast is off there): feed that dtype
        self.in_dtype = ({"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.mixed_precision)
                         if self.deepspeed else None)
        self.counters = {"nonfinite_skipped": 0, "corrupt_shards": 0}
        self.last_checkpoint = resume_from
        return self._restore(resume_from) if resume_from is not None else None

    def _frozen_checkpoints(self, net: torch.nn.Module) -> None:
        """With a frozen encoder (model.adapter, model.freeze_backbone) loaded from a weights file,
        checkpoints hold the trained tensors only, plus that file's path and sha256
        (engine/checkpoint.py, ``frozen_source``); without a file they hold every tensor."""
        pretrained = model_kwargs(self.cfg)["pretrained"]
        self.pretrained_file = str(pretrained) if pretrained is not None else None
        self.frozen_keys: set[str] = ckpt.frozen_state_keys(net) if pretrained is not None else set()
        self.frozen_meta = None
        if self.frozen_keys:
            self.frozen_meta = ckpt.frozen_metadata(pretrained, ckpt.file_sha256(pretrained), len(self.frozen_keys))

    def _build_stream(self, resume_from: Path | None, rng: dict | None) -> None:
        """This rank's data stream at the resumed position, then the checkpoint's RNG state."""
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed + 1000 * self.rank)  # per-rank stream for dropout
        # the stream position (exact while no step was skipped); `blindseg browse` uses the same call;
        # page-locked batches on CUDA: the copies in _forward are non_blocking
        planner = (LoaderPlanner(cfg.run.seed, self.plan_sizes, cfg.data.batch_size, self.rank, self.world,
                                 cwcl=cfg.loss.cwcl > 0, sdcl_keys=cfg.loss.sdcl > 0)
                   if self.plan_sizes else None)
        loader = train_loader_from_config(cfg, rank=self.rank, world_size=self.world,
                                          start_step=self.step * self.micro,
                                          pin_memory=self.acc.device.type == "cuda", planner=planner)
        self.logger = RunLogger(self.out_dir / "tb", log_with=cfg.run.log_with,
                                purge_step=self.step + 1 if resume_from is not None else None)
        self._print_header()
        self.loader_iter = iter(loader)  # draws a seed from torch's RNG: restore the checkpoint's RNG after it
        self.data_iter: Iterator[dict] = self.loader_iter
        if rng is not None:
            ckpt.set_rng_state(rng)
        elif resume_from is not None and self.is_main:
            print(f"[train] checkpoint {resume_from} has no RNG state for rank {self.rank}; continuing with fresh RNG")
        self.attempt, self.nonfinite_in_a_row, self.images_seen, self.grad_norm = 0, 0, 0, None
        self.last: StepOutput | None = None
        self.objective.train()

    def _print_header(self) -> None:
        if not self.is_main:
            return
        cfg, acc = self.cfg, self.acc
        engine = f"DeepSpeed ZeRO-{acc.state.deepspeed_plugin.zero_stage}" if self.deepspeed else acc.distributed_type.value
        print(
            f"[train] world size {self.world} ({engine}, {acc.device}, precision {cfg.run.mixed_precision}), "
            f"{self.n_params / 1e6:.2f}M parameters ({self.n_trainable / 1e6:.2f}M trained), global batch {cfg.data.batch_size * self.world * self.micro}, "
            f"steps {self.step}->{self.max_steps}, output {self.out_dir}", flush=True
        )

    # ---- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> bool:
        """``grad_accum`` micro-batches, then the optimizer step, or a skip on every rank.

        After each micro-batch's forward, every rank learns whether any loss is non-finite or any
        rank got SIGTERM/SIGINT (one tiny all-reduce of two flags), so all skip or stop at the same
        step and none waits in a collective the others never enter."""
        sums: dict[str, float] = {}
        skip = stop = False
        for m in range(self.micro):
            batch = self.next_batch()
            last = m == self.micro - 1
            # The last micro-batch closes the accumulation: DDP all-reduces only there (no_sync
            # before it), DeepSpeed steps there; the prepared optimizer steps only when it is set.
            self.acc.sync_gradients = last
            no_sync = not last and self.world > 1 and not self.deepspeed
            with self.acc.no_sync(self.objective) if no_sync else contextlib.nullcontext():
                out = self._forward(batch, m)
                loss = out["total"]
                flag = torch.tensor([float(not torch.isfinite(loss)), float(self.signal.requested)])
                flag = dist.all_reduce_sum(flag, tag="control")
                stop = stop or bool(flag[1] > 0)
                if flag[0] > 0:
                    skip = True
                    break
                self.acc.backward(loss)  # DDP: loss / micro; DeepSpeed: the engine scales and steps
            self._accumulate(sums, out, batch)
        self.attempt += 1  # step attempts so far, skipped ones included
        if skip:
            self._skip(stop)
            return False
        self._optimizer_step()
        self.last = StepOutput(terms=sums, batch=batch, out=out)
        if stop:
            self.stop_reason = "stopped by signal"
        return True

    def _forward(self, batch: dict, m: int) -> dict:
        """The objective on micro-batch ``m`` of this step (inputs on the device, in autocast)."""
        dev, dtype = self.acc.device, self.in_dtype
        image = batch["image"].to(dev, dtype, non_blocking=True)
        label = batch["label"].to(dev, non_blocking=True)
        image_aug = batch["image_aug"].to(dev, dtype, non_blocking=True) if self.cfg.loss.two_view else None
        if self.cfg.model.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
            if image_aug is not None:
                image_aug = image_aug.contiguous(memory_format=torch.channels_last)
        b = image.shape[0]
        k = self.step * self.micro + m  # the micro-batch index: loss sampling seeds, global image indices
        gidx = k * self.cfg.data.batch_size * self.world + self.rank * b + torch.arange(b)
        # the loader's sampling plans, when made for this micro-batch index (after a skipped step the
        # stream is one batch ahead of k: the objective then samples itself, as without plans)
        plans = sdcl_keys = None
        if STEP_KEY in batch and int(batch[STEP_KEY]) == k:
            if PLAN_KEY in batch:
                plans = [{n: t.to(dev, non_blocking=True) for n, t in lvl.items()} for lvl in batch[PLAN_KEY]]
            if SDCL_KEY in batch:
                sdcl_keys = [t.to(dev, non_blocking=True) for t in batch[SDCL_KEY]]
        with self.acc.autocast():
            return self.objective(image, label, image_aug, step=k, global_index=gidx, plans=plans,
                                  sdcl_keys=sdcl_keys)

    def _accumulate(self, sums: dict[str, float], out: dict, batch: dict) -> None:
        """Add a micro-batch's loss terms (/ grad_accum) to ``sums``; count its images and corrupt shards."""
        names = [*out["terms"], "total"]
        # one read of the device for every term (float64 holds each term's value exactly)
        values = torch.stack([v.detach().to(torch.float64).reshape(())
                              for v in (*out["terms"].values(), out["total"])]).tolist()
        for k, v in zip(names, values):
            sums[k] = sums.get(k, 0.0) + v / self.micro
        self.images_seen += batch["image"].shape[0] * self.world
        if "corrupt_shards" in batch:
            self.counters["corrupt_shards"] = max(self.counters["corrupt_shards"], int(batch["corrupt_shards"]))

    def _skip(self, stop: bool) -> None:
        """Drop the step's gradients after a non-finite loss; stop after run.max_nonfinite in a row."""
        self.acc.sync_gradients = True
        if self.deepspeed:
            self.objective.zero_grad()  # the engine's accumulated (partitioned) gradients
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.counters["nonfinite_skipped"] += 1
        self.nonfinite_in_a_row += 1
        n = self.nonfinite_in_a_row
        if self.is_main:
            print(f"[train] step {self.step}: non-finite loss, step skipped ({n} in a row)")
        if n >= self.cfg.run.max_nonfinite:
            self.stop_reason = f"stopped: {n} non-finite losses in a row (run.max_nonfinite)"
        elif stop:
            self.stop_reason = "stopped by signal"

    def _optimizer_step(self) -> None:
        self.nonfinite_in_a_row = 0
        self.grad_norm = self._grad_norm()
        self.optimizer.step()  # a no-op under DeepSpeed (the engine stepped in backward)
        self.scheduler.step()  # ours: once per optimizer step, on every engine
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)

    def _grad_norm(self) -> torch.Tensor | float | None:
        """The global gradient norm of this step (logged as grad_norm), clipping to optim.grad_clip
        when set; DeepSpeed clips inside its own step and reports the norm it saw."""
        if self.deepspeed:
            return self.objective.get_global_grad_norm()
        if self.cfg.optim.grad_clip > 0:
            return self.acc.clip_grad_norm_(self.objective.parameters(), self.cfg.optim.grad_clip)
        grads = [p.grad for p in self.objective.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else None

    # ---- what the hooks use -----------------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        """The network itself (unwrapped from DDP / DeepSpeed and the objective)."""
        return self.acc.unwrap_model(self.objective).net

    @property
    def lr(self) -> float:
        group = self.optimizer.param_groups[0]  # what the engine's optimizer uses, per unit lr scale
        return group["lr"] / group.get("lr_scale", 1.0)

    def evaluate(self) -> dict[str, dict]:
        """Every eval.targets entry at the current step (collective), logged to TensorBoard."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            return evaluate_targets(self.net, self.cfg.eval, self.acc.device, self.logger, self.step,
                                    data_cfg=self.cfg.data)

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (collective: every rank calls it); returns its folder."""
        # get_state_dict gathers full parameters under ZeRO-3 (collective; stage3_gather_16bit_weights_on_model_save)
        full = self.acc.get_state_dict(self.objective) or {}  # None on ranks > 0 under ZeRO-3
        model_state = {k[len("net."):]: v for k, v in full.items() if k.startswith("net.")}
        if self.frozen_meta is not None:  # the frozen backbone is the weights file's: not copied
            model_state = {k: v for k, v in model_state.items() if k not in self.frozen_keys}
        ema_live = None
        if self.ema is not None:  # model.safetensors: the EMA weights; state.pt: the live ones
            model_state, ema_live = self.ema.state_for_checkpoint(model_state)

        def engine_state(tmp: Path) -> None:  # every rank writes its optimizer partition
            self.objective.save_checkpoint(str(tmp / "deepspeed"), tag="engine", save_latest=False)

        self.last_checkpoint = ckpt.save_checkpoint(
            self.cfg.run.output_dir, self.step, model_state=model_state,
            state={"optimizer": None if self.deepspeed else self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(), "counters": dict(self.counters),
                   **({"ema_live": ema_live} if ema_live is not None else {})},
            config_yaml=self.config_yaml, keep_last=self.cfg.run.keep_last,
            collective_save=engine_state if self.deepspeed else None,
            meta={"run_id": self.run_id, **resume_values(self.cfg, self.world)}, protect=self.protected,
            model_metadata=self.frozen_meta,
        )
        if self.is_main:
            size = ckpt.folder_bytes(self.last_checkpoint)
            what = (f"trained tensors only; frozen backbone {self.pretrained_file} "
                    f"(sha256 {self.frozen_meta[ckpt.FROZEN_SHA_KEY][:12]}...)" if self.frozen_meta else "every tensor")
            print(f"[train] checkpoint {self.last_checkpoint}: {size / 2**20:.1f} MB ({what})", flush=True)
        return self.last_checkpoint

    def _restore(self, path: Path) -> dict | None:
        """Load optimizer, scheduler, counters and the step from checkpoint ``path``; returns this
        rank's RNG state (None if the checkpoint came from fewer ranks)."""
        state, rng = ckpt.load_state(path)
        if self.deepspeed:  # partitioned optimizer state, one file per rank
            self.objective.load_checkpoint(str(path / "deepspeed"), tag="engine", load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.counters.update(state.get("counters", {}))
        if self.ema is not None:
            self.ema.restore(state.get("ema_live"))
        if self.is_main:
            print(f"[train] resumed from {path} at step {state['step']}")
        self.step = int(state["step"])
        return rng

    def summary(self, seconds: float) -> dict[str, Any]:
        engine = f"deepspeed_zero{self.acc.state.deepspeed_plugin.zero_stage}" if self.deepspeed else "ddp"
        return {"world_size": self.world, "engine": engine, "steps": self.step, "stop_reason": self.stop_reason,
                "seconds": seconds, "checkpoint": str(self.last_checkpoint), "counters": self.counters,
                "lr": self.lr, "trainable_params": self.n_trainable, "total_params": self.n_params}

    def close(self) -> None:
        self.logger.close()
        shutdown_workers(self.loader_iter)  # the loader's workers end now, not at interpreter exit
        dist.barrier()


def default_hooks(trainer: Trainer) -> list[Hook]:
    """The hooks of a `blindseg train` run, in their calling order."""
    run, ev = trainer.cfg.run, trainer.cfg.eval
    bar, files = ProgressBar(), MetricsFileHook()
    hooks: list[Hook] = [bar, files, LogHook(run.log_every, writers=[trainer.logger, bar, files]),
                         ImageHook(run.image_every, trainer.logger), CheckpointHook(run.checkpoint_every)]
    if run.record_stream:
        hooks.append(StreamRecordHook(trainer.cfg.data.train))
    best = BestCheckpointHook(*selection_target(ev, trainer.cfg.data.train), announce=bool(ev.targets))
    hooks += [EvalHook(ev.every, at_end=ev.at_end and bool(ev.targets), listeners=[best.on_eval, files.on_eval]),
              best, SummaryHook()]
    return hooks


def train(cfg: Config, *, resume: bool | str = False, allow_changed: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train with the resolved config; returns a summary (steps, time, final checkpoint, eval)."""
    return Trainer(cfg, resume=resume, allow_changed=allow_changed).train()
