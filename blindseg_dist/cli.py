"""`blindseg` command line: each subcommand parses its arguments and calls one library function."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HxW (e.g. 256x512)") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return h, w


def _named_paths(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --data takes NAME=PATH pairs, got {pair!r}")
        name, path = pair.split("=", 1)
        if not Path(path).exists():
            raise SystemExit(f"error: evaluation data {name!r}: {path!r} does not exist")
        out[name] = path
    return out


def cmd_synth(args) -> int:
    from .data.synth import generate

    summary = generate(args.out, domains=args.domains, images_per_domain=args.images_per_domain,
                       size=args.size, seed=args.seed)
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=1))
    return 0


def cmd_shard(args) -> int:
    from .data.shards import write_shards
    from .data.sources import get_source

    opts = {}
    if args.label_map:
        opts["label_map"] = args.label_map
    source = get_source(args.dataset, args.root, split=args.split, **opts)
    write_shards(source, args.out, samples_per_shard=args.samples_per_shard, image_format=args.image_format,
                 workers=args.workers)
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .engine.trainer import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"optim.max_steps={args.max_steps}")
    cfg = load_config(args.config, overrides)
    train(cfg, resume=args.resume)
    return 0


def cmd_eval(args) -> int:
    from .tools.evaluate_cli import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, _named_paths(args.data), args.json, max_images=args.max_images,
                        tb_dir=args.tb_dir)
    return 0


def cmd_demo(args) -> int:
    from .tools.demo import run_demo

    run_demo(output_dir=args.output_dir, steps=args.steps, processes=args.processes,
             images_per_domain=args.images_per_domain)
    return 0


def cmd_flops(args) -> int:
    from .config import load_config, model_kwargs
    from .tools.flops import compute_flops, format_flops_table

    cfg = load_config(args.config)
    result = compute_flops(model_kwargs(cfg), size=args.size)
    print(format_flops_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blindseg", description="Distributed BlindNet training for DGSS.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate the procedural multi-domain street scenes")
    s.add_argument("out")
    s.add_argument("--domains", type=int, default=4)
    s.add_argument("--images-per-domain", type=int, default=100)
    s.add_argument("--size", type=_size, default=(256, 512), help="HxW (default 256x512)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("shard", help="write a dataset as WebDataset shards with a manifest")
    s.add_argument("dataset", choices=["gta5", "cityscapes", "bdd100k", "mapillary", "synthia"])
    s.add_argument("root")
    s.add_argument("--out", required=True)
    s.add_argument("--split", default=None, help="split name (train/val/test/all) or a file listing frames")
    s.add_argument("--samples-per-shard", type=int, default=64)
    s.add_argument("--image-format", choices=["png", "jpg"], default="png")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--label-map", default=None, help="mapillary: robustnet (default) or openseg")
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("train", help="train (launch with accelerate for several processes)")
    s.add_argument("--config", required=True)
    s.add_argument("--output-dir", default=None)
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=0.02")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="evaluate a checkpoint on target datasets")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", nargs="+", required=True, metavar="NAME=PATH")
    s.add_argument("--json", required=True)
    s.add_argument("--max-images", type=int, default=0, help="at most N images per target (0: all)")
    s.add_argument("--tb-dir", default=None, help="also log mIoU and per-class IoU to this TensorBoard folder")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("demo", help="synth -> shard -> 2-process training -> eval on unseen domains")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.yaml)")
    s.add_argument("--output-dir", default="demo_output")
    s.add_argument("--processes", type=int, default=2)
    s.add_argument("--images-per-domain", type=int, default=None)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("flops", help="fvcore FLOPs and parameters of a config and its baseline")
    s.add_argument("--config", required=True)
    s.add_argument("--size", type=_size, default=(1024, 2048))
    s.add_argument("--json", default=None)
    s.set_defaults(func=cmd_flops)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"blindseg {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"blindseg {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
