"""`blindseg eval`: evaluate a checkpoint on named targets, across every process of the launch."""
from __future__ import annotations

from pathlib import Path

from .. import atomic, dist
from ..config import ConfigError, load_config, model_kwargs
from ..engine import checkpoint as ckpt
from ..engine.evaluate import corruption_report, evaluate_targets, format_corruption_table, format_table
from ..engine.figures import save_confusion_png
from ..engine.logging import RunLogger
from ..engine.accelerator import make_accelerator
from ..model import build_model


def resolve_checkpoint(path: str | Path) -> Path:
    """What `blindseg eval --checkpoint PATH` evaluates: PATH itself when it holds weights (a
    checkpoint folder, an import-checkpoint folder, a .safetensors file); for a run folder its best
    checkpoint (DIR/best.json), else its latest."""
    import json

    p = Path(path)
    if p.is_file() or (p / ckpt.MODEL_FILE).is_file():
        return p
    if p.is_dir() and (p / "checkpoints").is_dir():
        best = p / "best.json"
        if best.is_file():
            cand = Path(json.loads(best.read_text())["checkpoint"])
            if (cand / ckpt.MODEL_FILE).is_file():
                return cand
        latest = ckpt.latest_checkpoint(p)
        if latest is not None:
            return latest
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist; pass a run folder, RUN/checkpoints/<step> "
                                "or an import-checkpoint folder")
    raise FileNotFoundError(f"{str(p)!r} holds no weights ({ckpt.MODEL_FILE}) and no checkpoints/; pass a run "
                            "folder, RUN/checkpoints/<step> or an import-checkpoint folder")


def find_run_config(checkpoint: str | Path) -> Path:
    """The resolved config saved with a checkpoint (its folder, or the run folder above it)."""
    p = Path(checkpoint)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist; pass RUN/checkpoints/<step>")
    folder = p if p.is_dir() else p.parent
    for cand in (folder / "config.yaml", folder.parent / "config.yaml", folder.parent.parent / "config.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"no config.yaml next to checkpoint {str(p)!r} or in its run folder")


def load_checkpoint_model(checkpoint: str | Path, overrides: dict | None = None):
    """(config, network with the checkpoint's weights) of a checkpoint folder."""
    cfg = load_config(find_run_config(checkpoint), overrides)
    # every weight comes from the checkpoint, but for a frozen backbone's: from the weights file it names
    source = ckpt.frozen_source(checkpoint)
    net = build_model(**{**model_kwargs(cfg), "pretrained": source})
    ckpt.fit_weights(net, ckpt.load_model_weights(checkpoint), checkpoint, partial=source is not None)
    return cfg, net


def evaluate_checkpoint(checkpoint: str | Path, data: dict[str, str], json_out: str | Path, *,
                        max_images: int = 0, tb_dir: str | Path | None = None,
                        protocols: dict[str, str] | None = None,
                        sliding_window: list[int] | None = None) -> dict:
    """Evaluate ``checkpoint`` on ``data`` (name -> shard dir, folder or shard location); rank 0 writes ``json_out``.

    ``protocols`` (name -> protocol) add to the run config's eval.protocols of the same targets;
    ``sliding_window`` replaces eval.sliding_window when given.
    """
    given, checkpoint = checkpoint, resolve_checkpoint(checkpoint)
    if dist.rank() == 0 and Path(given) != checkpoint:
        print(f"[eval] {given}: evaluating {checkpoint}", flush=True)
    run_cfg = load_config(find_run_config(checkpoint))
    merged = {k: v for k, v in run_cfg.eval.protocols.items() if k in data}
    merged.update(protocols or {})
    ev = {"targets": data, "max_images": max_images, "protocols": merged, "selection": None}
    if sliding_window is not None:
        ev["sliding_window"] = list(sliding_window)
    cfg, net = load_checkpoint_model(checkpoint, {"eval": ev})
    acc = make_accelerator(cfg)
    net.to(acc.device)
    logger = RunLogger(tb_dir) if tb_dir else None
    step = int(Path(checkpoint).name) if Path(checkpoint).name.isdigit() else 0
    results = evaluate_targets(net, cfg.eval, acc.device, logger, step, data_cfg=cfg.data)
    report = {"world_size": dist.world_size(), "targets": results, "checkpoint": str(checkpoint), "eval_data": data,
              "sliding_window": cfg.eval.sliding_window}
    groups = corruption_report(data, results)
    if groups:
        report["corruptions"] = groups
    if dist.rank() == 0:
        atomic.write_json(json_out, report, indent=1)
        # a corrupted family's sets are shown grouped (its own table), not as rows of the per-target one
        plain = {k: v for k, v in results.items() if not any(k.startswith(f + "/") for f in groups)}
        if plain:
            print(format_table(plain))
        if groups:
            print()
            print(format_corruption_table(groups))
        for name, res in results.items():  # beside the JSON: OUT-confusion-<target>.png
            save_confusion_png(res["confusion_matrix"], confusion_png(json_out, name),
                               f"{name}: confusion matrix (row-normalized)")
        print(f"[eval] world size {report['world_size']}; wrote {json_out}")
    if logger is not None:
        logger.close()
    dist.barrier()
    return report


def confusion_png(json_out: str | Path, target: str) -> Path:
    """Where `blindseg eval --json OUT.json` writes a target's confusion figure: OUT-confusion-<target>.png."""
    j = Path(json_out)
    return j.with_name(f"{j.stem}-confusion-{target.replace('/', '_')}.png")  # a corrupted family's set: FAMILY/SET
