"""`blindseg` command line: each subcommand parses its arguments and calls one library function."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from . import runtime_env
from .errors import EXIT_CONFIG, ConfigError, UsageError, exit_code


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HxW (e.g. 256x512)") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return h, w


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 512,256)") from None
    if len(vals) not in (2, 4) or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give CROP,STRIDE or CROP_H,CROP_W,STRIDE_H,STRIDE_W (positive)")
    return vals


def _named_paths(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--data takes NAME=PATH pairs, got {pair!r}")
        name, path = pair.split("=", 1)
        from .data.location import has_braces, is_remote
        from .engine.evaluate import raw_target

        raw = raw_target(path)  # NAME=DATASET:PATH, or a raw dataset folder detected from its layout
        if raw is not None and not Path(raw[1]).is_dir():
            raise FileNotFoundError(f"evaluation data {name!r}: {raw[0]} folder {raw[1]!r} does not exist")
        if raw is None and not is_remote(path) and not has_braces(path) and not Path(path).exists():
            raise FileNotFoundError(f"evaluation data {name!r}: {path!r} does not exist")
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
    from .data.sources import DEFAULT_SPLITS, TARGETS, get_source

    opts = {}
    if args.label_map:
        opts["label_map"] = args.label_map
    if args.dataset == "hf":
        opts.update(image_column=args.image_column, label_column=args.label_column, key_column=args.key_column)
    elif args.image_column != "image" or args.label_column != "label" or args.key_column:
        raise SystemExit("error: --image-column / --label-column / --key-column are for `blindseg shard hf`")
    if args.dataset == "acdc":
        opts["condition"] = args.condition or "all"
    elif args.condition:
        raise UsageError("--condition is for `blindseg shard acdc`")
    upload = None
    if args.upload_to:
        from .data.location import upload_command

        try:
            upload = upload_command(args.out, args.upload_to)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    split = args.split
    if split is None and args.dataset in TARGETS:
        split = DEFAULT_SPLITS[args.dataset]
        print(f"blindseg shard: no --split given: {args.dataset} is an evaluation target, taking its evaluation "
              f"split '{split}' (pass --split train, all or a list file for another one)")
    try:
        source = get_source(args.dataset, args.root, split=split, **opts)
    except ValueError as e:  # a bad split, column or label map: the message names it
        print(f"blindseg shard: {e}", file=sys.stderr)
        return 2
    manifest = write_shards(source, args.out, samples_per_shard=args.samples_per_shard,
                            image_format=args.image_format, workers=args.workers, centroid_tile=args.centroid_tile,
                            shuffle_seed=None if args.no_shuffle else args.shuffle_seed)
    if manifest["num_samples"] == 0:  # nothing to train on: not a success
        print(f"blindseg shard: every pair was skipped ({len(manifest['skipped'])}; reasons in "
              f"{Path(args.out) / 'manifest.json'}); no shard written", file=sys.stderr)
        return 1
    if upload:
        print(f"upload (tars first, manifest.json last):\n  {upload}\nthen train with "
              f"data.train={args.upload_to.rstrip('/')}")
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .engine.trainer import train

    overrides, resume = list(args.overrides), args.resume
    allow = [k for k in args.allow_changed or () if "=" not in k]
    overrides += [k for k in args.allow_changed or () if "=" in k]  # overrides after --allow-changed KEY...
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        overrides.insert(0, resume)  # `--resume key=value ...`: an override, not a checkpoint path
        resume = True
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"optim.max_steps={args.max_steps}")
    cfg = load_config(args.config, overrides)
    from .engine.checkpoint import CheckpointError

    try:
        train(cfg, resume=resume, allow_changed=tuple(allow))
    except CheckpointError as e:  # disk full: the message says where and how much (one process; 2+: trainer)
        print(f"blindseg train: {e}", file=sys.stderr)
        return 1
    return 0


def _named_protocols(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--protocol takes NAME=PROTOCOL pairs, got {pair!r}")
        name, proto = pair.split("=", 1)
        out[name] = proto
    return out


def cmd_eval(args) -> int:
    from .tools.evaluate_cli import evaluate_checkpoint

    data = _named_paths(args.data)
    protocols = _named_protocols(args.protocol)
    unknown = sorted(set(protocols) - set(data))
    if unknown:
        raise UsageError(f"--protocol names {unknown}, which are not --data targets ({', '.join(data)})")
    evaluate_checkpoint(args.checkpoint, data, args.json, max_images=args.max_images,
                        tb_dir=args.tb_dir, protocols=protocols, sliding_window=args.sliding_window)
    return 0


def cmd_corrupt(args) -> int:
    from .tools.corrupt import CorruptionError, corrupt_dataset, parse_corruptions, parse_severities

    try:
        names, levels = parse_corruptions(args.corruptions), parse_severities(args.severities)
    except CorruptionError as e:
        raise UsageError(str(e)) from None
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    data = args.data
    from .engine.evaluate import raw_target

    raw = raw_target(data)
    if raw is not None and not Path(raw[1]).is_dir():
        raise FileNotFoundError(f"{raw[0]} folder {raw[1]!r} does not exist")
    from .data.location import has_braces, is_remote

    if raw is None and not is_remote(data) and not has_braces(data) and not Path(data).exists():
        raise FileNotFoundError(f"evaluation set {data!r} does not exist")
    summary = corrupt_dataset(data, args.out, names, levels, workers=args.workers,
                              samples_per_shard=args.samples_per_shard)
    return 1 if any(r["num_samples"] == 0 for r in summary["sets"]) else 0


def cmd_ablate(args) -> int:
    from .tools.ablate import run_ablation

    summary = run_ablation(args.config, args.seeds, grid=args.grid, output_dir=args.output_dir,
                           overrides=args.overrides, processes=args.processes, parallel=args.parallel)
    return 1 if summary["failed"] else 0


def cmd_scale(args) -> int:
    from .tools.scale import run_scaling

    size = tuple(int(v) for v in args.flops_size.lower().split("x"))
    summary = run_scaling(args.configs, args.seeds, output_dir=args.output_dir, overrides=args.overrides,
                          processes=args.processes, flops_size=size)
    return 1 if summary["failed"] else 0


def cmd_predict(args) -> int:
    from .tools.predict import predict_folder

    try:
        summary = predict_folder(args.checkpoint, args.images, args.out, alpha=args.alpha,
                                 sliding_window=args.sliding_window)
    except ValueError as e:  # a bad --alpha: the message names it
        print(f"blindseg predict: {e}", file=sys.stderr)
        return 2
    return 1 if summary["skipped"] else 0  # unreadable images were skipped and listed


def cmd_browse(args) -> int:
    from .config import load_config
    from .tools.browse import browse

    cfg = load_config(args.config, list(args.overrides))
    try:
        records = browse(cfg, args.num, args.out, rank=args.rank, world_size=args.world_size, tile=args.tile)
    except ValueError as e:  # a bad --num / --tile / --rank: the message names it
        print(f"blindseg browse: {e}", file=sys.stderr)
        return 2
    n_cls = sum(r["class"] is not None for r in records)
    print(f"browse: {len(records)} samples of {cfg.data.train} ({n_cls} class-uniform, "
          f"{len(records) - n_cls} uniform; rank {args.rank} of {args.world_size}) -> "
          f"{Path(args.out) / 'grid.png'}, {Path(args.out) / 'samples.jsonl'}")
    return 0


def cmd_report(args) -> int:
    from .tools.report import write_report

    try:
        write_report(args.run_dirs, args.out, flops_size=None if args.no_flops else args.flops_size)
    except ValueError as e:  # a result file that is not an eval.json / report.json
        print(f"blindseg report: {e}", file=sys.stderr)
        return 2
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


def cmd_import_checkpoint(args) -> int:
    from .engine.interop import InteropError, import_checkpoint

    try:
        import_checkpoint(args.file, args.config, args.out, allow_missing=args.allow_missing or ())
    except InteropError as e:  # keys that do not map: the message lists them
        print(f"blindseg import-checkpoint: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_export_checkpoint(args) -> int:
    from .engine.interop import InteropError, export_checkpoint

    try:
        export_checkpoint(args.checkpoint, args.out, module_prefix=not args.no_module_prefix)
    except InteropError as e:
        print(f"blindseg export-checkpoint: {e}", file=sys.stderr)
        return 2
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
    s.add_argument("dataset", choices=["gta5", "cityscapes", "bdd100k", "mapillary", "synthia", "acdc", "hf"],
                   help="hf: a local Hugging Face datasets folder (save_to_disk or parquet files)")
    s.add_argument("root")
    s.add_argument("--out", required=True)
    s.add_argument("--split", default=None, help="split name (train/val/test/all) or a file listing frames")
    s.add_argument("--condition", default=None, choices=["fog", "night", "rain", "snow", "all"],
                   help="acdc: the adverse condition (default all: the four in one set)")
    s.add_argument("--samples-per-shard", type=int, default=64)
    s.add_argument("--image-format", choices=["png", "jpg"], default="png")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--centroid-tile", type=int, default=1024,
                   help="tile of the class-uniform centroids (whole tiles only; default 1024 as released)")
    s.add_argument("--shuffle-seed", type=int, default=0, help="seed of the sample order across shards")
    s.add_argument("--no-shuffle", action="store_true", help="keep key order in the shards (consecutive frames)")
    s.add_argument("--label-map", default=None,
                   help="mapillary: robustnet (default) or openseg; hf: trainids (default), cityscapes_ids, ...")
    s.add_argument("--image-column", default="image", help="hf: the image column (default image)")
    s.add_argument("--label-column", default="label", help="hf: the label column of ids (default label)")
    s.add_argument("--key-column", default=None, help="hf: a column of unique sample names (default: row number)")
    s.add_argument("--upload-to", default=None, metavar="URL",
                   help="print the command that uploads the shards there (s3://, gs://, HOST:PATH) and the data.train to use")
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("train", help="train (launch with accelerate for several processes)")
    s.add_argument("--config", required=True,
                   help="a YAML file, or a shipped config by name (demo, blindnet_r50_gta5, scaling/resnet50, ...)")
    s.add_argument("--output-dir", default=None,
                   help="run folder (default: run.output_dir, else runs/<config name>/<UTC timestamp>/)")
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue a run: alone, from the run folder's latest checkpoint (with no --output-dir: the "
                        "newest run of this config); PATH: a checkpoint folder or a run folder")
    s.add_argument("--allow-changed", nargs="+", default=None, metavar="KEY",
                   help="let --resume change these: world_size data.batch_size optim.grad_accum optim.lr "
                        "optim.poly_power optim.max_steps (refused otherwise)")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=0.02")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="evaluate a checkpoint on target datasets")
    s.add_argument("--checkpoint", required=True,
                   help="a run folder (its best checkpoint, else its latest), RUN/checkpoints/<step>, or an "
                        "import-checkpoint folder")
    s.add_argument("--data", nargs="+", required=True, metavar="NAME=PATH",
                   help="PATH: shards (folder, pattern, URL), or a raw dataset folder as downloaded (format "
                        "detected from its layout, or named: NAME=cityscapes:/data/cityscapes; default split "
                        "of `blindseg shard`)")
    s.add_argument("--json", required=True)
    s.add_argument("--max-images", type=int, default=0, help="at most N images per target (0: all)")
    s.add_argument("--tb-dir", default=None, help="also log mIoU and per-class IoU to this TensorBoard folder")
    s.add_argument("--protocol", nargs="+", default=None, metavar="NAME=PROTOCOL",
                   help="per-target protocol: full | mapillary_1536 | mapillary_1024 | synthia | acdc "
                        "(default: from the run config, else inferred from the target's name / dataset)")
    s.add_argument("--sliding-window", type=_ints, default=None, metavar="CROP,STRIDE",
                   help="sliding-window inference: CROP,STRIDE or CROP_H,CROP_W,STRIDE_H,STRIDE_W px (default: whole image)")
    s.set_defaults(func=cmd_eval)

    from .corruptions import speed_table

    s = sub.add_parser(
        "corrupt", help="an evaluation set under the imagecorruptions corruptions: one shard set per corruption "
                        "and severity", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Apply imagecorruptions.corrupt to every image of an evaluation set and write one shard set "
                    "per (corruption, severity) into OUT/<corruption>-<severity>/ (labels and keys unchanged, "
                    "PNG images, a seed per image: a rerun writes the same bytes; complete sets are skipped). "
                    "Evaluate the family with `blindseg eval --data NAME=OUT`.",
        epilog="corruptions (`all` = the 15 standard ones) and CPU seconds per image at severity 3, one thread\n"
               "of a 2-core CPU, on a 192x384 and a 1024x2048 frame (python bench/corruption_speed.py):\n"
               + speed_table())
    s.add_argument("data", help="the evaluation set: shards (folder, pattern, URL) or a raw dataset folder "
                                "(DATASET:PATH or a detected layout), as `blindseg eval --data` takes it")
    s.add_argument("--out", required=True, help="output folder: one <corruption>-<severity>/ shard set each")
    s.add_argument("--corruptions", required=True, metavar="NAMES",
                   help="`all` (the 15 standard ones) or comma-separated names (table below)")
    s.add_argument("--severities", required=True, metavar="LIST", help="comma-separated severities 1..5, or all")
    s.add_argument("--workers", type=int, default=1, help="processes per set (default 1)")
    s.add_argument("--samples-per-shard", type=int, default=None,
                   help="default: the input's (from its manifest), else 64")
    s.set_defaults(func=cmd_corrupt)

    s = sub.add_parser("ablate", help="loss ablation: train + evaluate a grid of configs over seeds, mean ± std table")
    s.add_argument("--config", required=True, help="base training config (with eval.targets)")
    s.add_argument("--seeds", type=int, required=True, help="seeds per grid entry (run.seed = base seed + i)")
    s.add_argument("--grid", default="default", help="configs/ablation/<NAME>.yaml or a YAML path (default: default)")
    s.add_argument("--output-dir", default="ablation")
    s.add_argument("--processes", type=int, default=1, help="processes per training run (accelerate launch when > 1)")
    s.add_argument("--parallel", type=int, default=1,
                   help="runs trained at once (default 1; e.g. 2 one-thread runs on a 2-core CPU)")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    s.set_defaults(func=cmd_ablate)

    s = sub.add_parser("scale", help="backbone scaling study: train + evaluate configs over seeds, "
                                     "unseen-domain mIoU vs params / GFLOPs, images/s, peak memory")
    s.add_argument("--configs", nargs="+", required=True, help="training configs (paths or shipped names, "
                                                               "e.g. scaling/resnet50 scaling/vit_small)")
    s.add_argument("--seeds", type=int, required=True, help="seeds per config (run.seed = the config's seed + i)")
    s.add_argument("--output-dir", default="scaling")
    s.add_argument("--processes", type=int, default=1, help="processes per training run (accelerate launch when > 1)")
    s.add_argument("--flops-size", default="512x1024", help="HxW of the fvcore GFLOPs count (default 512x1024)")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    s.set_defaults(func=cmd_scale)

    s = sub.add_parser("predict", help="colour-coded masks and overlays for a folder of images")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--images", required=True, help="folder of .png/.jpg images (searched recursively)")
    s.add_argument("--out", required=True)
    s.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the mask (default 0.5)")
    s.add_argument("--sliding-window", type=_ints, default=None, metavar="CROP,STRIDE",
                   help="sliding-window inference (default: whole image)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("report", help="compare runs: table (md/csv), bar chart, params and GFLOPs")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders with eval.json or report.json")
    s.add_argument("--out", default="report", help="output folder (default: ./report)")
    s.add_argument("--flops-size", type=_size, default=(512, 1024), help="HxW of the FLOPs count (default 512x1024)")
    s.add_argument("--no-flops", action="store_true", help="skip the fvcore count")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("demo", help="synth -> shard -> 2-process training -> eval on unseen domains")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.yaml)")
    s.add_argument("--output-dir", default="demo_output")
    s.add_argument("--processes", type=int, default=2)
    s.add_argument("--images-per-domain", type=int, default=None)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("browse", help="what the training loader feeds: a PNG grid and samples.jsonl")
    s.add_argument("--config", required=True)
    s.add_argument("--num", type=int, default=16, help="number of training samples (default 16)")
    s.add_argument("--out", required=True, help="output folder: grid.png, samples.jsonl")
    s.add_argument("--rank", type=int, default=0, help="the rank whose stream to show (default 0)")
    s.add_argument("--world-size", type=int, default=1, help="processes of the launch (default 1)")
    s.add_argument("--tile", type=int, default=256, help="pixel size of each view in the grid (default 256)")
    s.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. data.train=DIR)")
    s.set_defaults(func=cmd_browse)

    s = sub.add_parser("flops", help="fvcore FLOPs and parameters of a config and its baseline")
    s.add_argument("--config", required=True)
    s.add_argument("--size", type=_size, default=(1024, 2048))
    s.add_argument("--json", default=None)
    s.set_defaults(func=cmd_flops)

    s = sub.add_parser("import-checkpoint",
                       help="a released BlindNet/RobustNet checkpoint (.pth) -> a folder for eval/predict/model.init_from")
    s.add_argument("file", help="released checkpoint: {'state_dict': ...} (keys may start with 'module.') or a state dict")
    s.add_argument("--config", required=True, help="config of the network it holds (backbone, classes, heads)")
    s.add_argument("--out", required=True, help="output folder: model.safetensors, config.yaml, import.json")
    s.add_argument("--allow-missing", nargs="+", default=None, metavar="PATTERN",
                   help="accept these unknown or missing keys (fnmatch on released or our names, e.g. 'dsn.*')")
    s.set_defaults(func=cmd_import_checkpoint)

    s = sub.add_parser("export-checkpoint", help="our checkpoint -> the released format (.pth with released key names)")
    s.add_argument("checkpoint", help="RUN/checkpoints/<step>, an import-checkpoint folder or a model.safetensors")
    s.add_argument("--out", required=True, help="output .pth for the released valid.py / train.py --snapshot")
    s.add_argument("--no-module-prefix", action="store_true",
                   help="write keys without 'module.' (the released loader expects it: it wraps the net in DDP)")
    s.set_defaults(func=cmd_export_checkpoint)
    return p


def _library_logging() -> None:
    """Show the library's INFO/WARNING messages (e.g. which pretrained file was loaded) on stderr,
    once per launch: records from ranks other than 0 are dropped."""
    import logging

    log = logging.getLogger("blindseg_dist")
    if any(getattr(h, "_blindseg", False) for h in log.handlers):
        return

    def rank0(record: logging.LogRecord) -> bool:
        from . import dist

        return dist.rank() == 0

    class _Stderr(logging.StreamHandler):  # the current sys.stderr at each record (as logging.lastResort)
        stream = property(lambda self: sys.stderr, lambda self, value: None)

    handler = _Stderr()
    handler._blindseg = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    handler.addFilter(rank0)
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that key=value overrides may stand anywhere on the command line
    (`train --config C --resume --output-dir X optim.lr=0.02 --max-steps 9 run.threads=1`):
    argparse alone takes the positional overrides once and rejects later ones."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        loose = [e for e in extra if "=" in e and not e.startswith("-")]
        if hasattr(args, "overrides") and len(loose) == len(extra):
            args.overrides = [*args.overrides, *loose]
        else:
            parser.error("unrecognized arguments: " + " ".join(extra))
    return args


def main(argv: list[str] | None = None) -> int:
    runtime_env.apply_defaults()  # before anything imports torch (blindseg_dist/runtime_env.py)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = _parse(build_parser(), argv)
    _library_logging()
    try:
        rc = int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is one of the exit-2 errors
        code = exit_code(e)
        if code != EXIT_CONFIG:
            raise
        what = "config error: " if isinstance(e, ConfigError) else ""
        print(f"blindseg {args.command}: {what}{e}", file=sys.stderr)
        return code
    close_process_group()
    return rc


def close_process_group() -> None:
    """Destroy the process group of a command's ranks once it has returned normally. Left to the
    interpreter's exit, gloo's worker threads can abort a rank that finished its work (SIGABRT,
    "terminate called without an active exception", pytorch/pytorch#190489), and the launcher then
    reports the whole run as failed. Not on errors: the ranks may be stuck in a collective there."""
    tdist = sys.modules.get("torch.distributed")  # only if the command imported it (--help stays light)
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
