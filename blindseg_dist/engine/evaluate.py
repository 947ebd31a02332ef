"""Evaluation (docs/METHOD.md, "Evaluation protocol"): single scale, full resolution, logits bilinearly upsampled to the
label size (align_corners=True, as the model), one int64 confusion matrix per target summed across
ranks with each image counted exactly once, IoU = TP / (TP + FP + FN), mIoU = nanmean.

Protocols (``eval.protocols``, per target): ``full`` (the image as stored), ``mapillary_1536`` /
``mapillary_1024`` (resize to that height, centre crop, pad with ignore; applied by the dataset),
``synthia`` (mIoU over 19 classes, and over 16 without terrain, truck, train as ``miou16``), ``acdc``
(the 1920x1080 frame as stored, sliding windows of ACDC_WINDOW as Rein evaluates ACDC, unless
eval.sliding_window sets one for every target).
A target without an entry gets its protocol from its name or its shard manifest's dataset.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import dist
from ..config import EVAL_PROTOCOLS as PROTOCOLS
from ..corruptions import EXTRA, STANDARD
from ..data.evalset import EvalDataset, shard_indices
from ..data.labels import CLASS_NAMES, IGNORE, NUM_CLASSES
from ..data.location import (RemoteOptions, has_braces, holds_shards, is_remote, load_location_manifest,
                             local_manifest)
from ..data.sources import OPENERS, SampleError, detect_dataset, get_source
from .figures import confusion_figure

ACDC_WINDOW = (1024, 683)  # crop, stride (px) of the acdc protocol's sliding window (Rein's ACDC test_cfg)
SYNTHIA_MISSING = (9, 14, 16)  # terrain, truck, train: absent from SYNTHIA, excluded from mIoU16
SYNTHIA16 = tuple(c for c in range(NUM_CLASSES) if c not in SYNTHIA_MISSING)


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(num_classes, num_classes) int64, rows = ground truth, columns = prediction; ignore pixels dropped."""
    valid = label != IGNORE
    if bool(((label[valid] < 0) | (label[valid] >= num_classes)).any()):
        bad = torch.unique(label[valid & ((label < 0) | (label >= num_classes))]).tolist()
        raise ValueError(f"labels hold ids {bad} outside 0..{num_classes - 1} and not {IGNORE}")
    idx = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray | torch.Tensor) -> tuple[np.ndarray, float]:
    """Per-class IoU (NaN where a class never occurs in ground truth nor prediction) and their nanmean."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return iou, miou


def pixel_metrics(cm, iou: np.ndarray | None = None) -> dict[str, float]:
    """aAcc (pixel accuracy: trace / all pixels), mAcc (nanmean over classes of the per-class
    recall TP / ground-truth pixels; classes absent from the ground truth excluded) and fwIoU
    (IoU weighted by each class's share of the ground-truth pixels), as mmsegmentation defines them."""
    cm = np.asarray(cm, dtype=np.float64)
    total, gt = cm.sum(), cm.sum(1)
    if iou is None:
        iou = iou_from_confusion(cm)[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(gt > 0, np.diag(cm) / gt, np.nan)
    if total == 0:
        return {"aacc": float("nan"), "macc": float("nan"), "fwiou": float("nan")}
    freq = gt / total
    return {"aacc": float(np.trace(cm) / total), "macc": _nanmean(acc),
            "fwiou": float(np.sum(freq[gt > 0] * np.nan_to_num(iou[gt > 0])))}


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


@torch.no_grad()
def predict_logits(net: nn.Module, image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Eval-mode logits of one (1, 3, H, W) image, bilinearly upsampled to the label ``size``."""
    logits = net(image)
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
    return logits


def _window_starts(n: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of ``crop`` px every ``stride`` px; the last one ends at ``n``."""
    starts = list(range(0, n - crop + 1, stride))
    if starts[-1] != n - crop:
        starts.append(n - crop)
    return starts


@torch.no_grad()
def sliding_window_logits(net: nn.Module, image: torch.Tensor, size: Sequence[int], *,
                          crop: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Logits of one (1, 3, H, W) image from windows of ``crop`` (h, w) every ``stride`` (h, w) px.

    Each window's logits (the model's own output size = the window) are summed into place and
    divided by the number of windows covering each pixel. A side shorter than the crop is taken
    whole; the last window of a row/column is shifted to end at the border. With a window as large
    as the image this is exactly ``predict_logits`` (tests/engine/test_eval_protocols.py).
    """
    _, _, h, w = image.shape
    ch, cw = min(int(crop[0]), h), min(int(crop[1]), w)
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, h, w, dtype=image.dtype, device=image.device)
    for y in _window_starts(h, ch, int(stride[0])):
        for x in _window_starts(w, cw, int(stride[1])):
            out = net(image[..., y:y + ch, x:x + cw])  # (1, C, ch, cw)
            if tuple(out.shape[-2:]) != (ch, cw):
                out = F.interpolate(out, size=(ch, cw), mode="bilinear", align_corners=True)
            if total is None:
                total = out.new_zeros(1, out.shape[1], h, w)
            total[..., y:y + ch, x:x + cw] += out
            count[..., y:y + ch, x:x + cw] += 1
    logits = total / count
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
    return logits


def make_predictor(sliding_window: Sequence[int] | None) -> Callable:
    """``predict_logits``, or sliding-window inference for eval.sliding_window = [crop, stride] or
    [crop_h, crop_w, stride_h, stride_w]."""
    sw = list(sliding_window or [])
    if not sw:
        return predict_logits
    if len(sw) == 2:
        sw = [sw[0], sw[0], sw[1], sw[1]]
    if len(sw) != 4:
        raise ValueError(f"sliding_window {sliding_window!r}: give [crop, stride] or [crop_h, crop_w, stride_h, stride_w]")
    return functools.partial(sliding_window_logits, crop=sw[:2], stride=sw[2:])


@torch.no_grad()
def evaluate_dataset(
    net: nn.Module,
    dataset,
    *,
    device: torch.device | str = "cpu",
    num_classes: int = NUM_CLASSES,
    max_images: int = 0,
    desc: str = "eval",
    predict: Callable | None = None,
) -> torch.Tensor:
    """Confusion matrix of ``dataset`` summed over all ranks; each rank runs its own contiguous slice.

    The split (``shard_indices``) neither pads nor drops, so the W-rank matrix equals the 1-rank one
    (tests/engine/test_eval_multiprocess.py).
    """
    n = len(dataset) if not max_images else min(len(dataset), max_images)
    indices = shard_indices(n, dist.rank(), dist.world_size())
    was_training = net.training
    net.eval()
    predict = predict or predict_logits
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in tqdm(indices, desc=desc, disable=dist.rank() != 0, leave=False):
        item = dataset[i]
        image = item["image"][None].to(device)
        label = item["label"]
        logits = predict(net, image, label.shape[-2:])
        cm += confusion_matrix(logits.argmax(1)[0].cpu(), label, num_classes)
    net.train(was_training)
    return dist.all_reduce_sum(cm, tag="eval")


def target_result(cm: torch.Tensor, class_names: Sequence[str] = CLASS_NAMES, protocol: str = "full") -> dict:
    """The JSON record of one target: miou, per_class_iou (name -> IoU or null), confusion_matrix,
    protocol; with protocol ``synthia`` also miou16 (nanmean without terrain, truck, train)."""
    iou, miou = iou_from_confusion(cm)
    res = {
        "miou": miou,
        **pixel_metrics(cm, iou),
        "protocol": protocol,
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, iou)},
        "confusion_matrix": cm.tolist(),
        "num_pixels": int(cm.sum()),
    }
    if protocol == "synthia":
        res["miou16"] = _nanmean(iou[list(SYNTHIA16)])
    return res


def raw_target(spec: str | Path) -> tuple[str, str] | None:
    """(dataset, root) when an evaluation target is a raw dataset folder: ``DATASET:PATH`` with a
    dataset of data.sources (e.g. ``cityscapes:/data/cityscapes``), or a local folder without shards
    whose layout is a dataset's (data.sources.detect_dataset); None for shards and remote locations."""
    s = str(spec)
    head, sep, rest = s.partition(":")
    if sep and head in OPENERS:  # dataset names are no URL schemes
        return head, rest
    if is_remote(s) or has_braces(s):
        return None
    p = Path(s)
    if p.is_dir() and not holds_shards(p):
        ds = detect_dataset(s)
        return (ds, s) if ds else None
    return None


class StrictSource:
    """A dataset reader for evaluation: the pairs the sharder would write, decoded as the sharder
    decodes them (data/shards.py), so a raw folder evaluates exactly as its shards. A pair the sharder
    would skip (label ids outside the table, an unreadable file) is an error: evaluation never skips."""

    def __init__(self, source):
        self.source, self.items = source, source.items

    def load_pair(self, item):
        try:
            image, label, unknown = self.source.decode(item)
        except SampleError as e:
            raise ValueError(f"{self.source.name} {item.key}: {e} (evaluation never skips a frame)") from None
        if unknown:
            raise ValueError(f"{self.source.name} {item.key}: label ids outside the {self.source.label_map_name} "
                             f"table {unknown[:10]} in {item.label_path} (the sharder skips such frames; "
                             "evaluation never skips one)")
        return image, label


def _manifest_dataset(path: str | Path) -> str:
    raw = raw_target(path)
    if raw is not None:
        return raw[0]
    return str((load_location_manifest(str(path)) or {}).get("dataset", ""))


def target_protocol(name: str, path: str | Path, protocols: dict[str, str] | None = None) -> str:
    """The protocol name of target ``name``: eval.protocols[name], else from the target's name or
    its shard manifest's dataset (synthia -> synthia, mapillary -> mapillary_1536, acdc -> acdc), else full.
    (data.evalset.resolve_protocol then turns such a name into the frame transform.)"""
    if protocols and name in protocols:
        proto = protocols[name]
        if proto not in PROTOCOLS:
            raise ValueError(f"eval.protocols.{name}: {proto!r} is not a protocol; choose one of {list(PROTOCOLS)}")
        return proto
    hint = f"{name} {_manifest_dataset(path)}".lower()
    if "synthia" in hint:
        return "synthia"
    if "mapillary" in hint:
        return "mapillary_1536"
    if "acdc" in hint:
        return "acdc"
    return "full"


def target_window(protocol: str, sliding_window: Sequence[int] | None) -> list[int]:
    """The sliding window of a target: eval.sliding_window when set (every target), else the protocol's
    own (acdc: ACDC_WINDOW), else [] (the whole image)."""
    if sliding_window:
        return list(sliding_window)
    return list(ACDC_WINDOW) if protocol == "acdc" else []


resolve_protocol = target_protocol  # the former name of target_protocol, kept for importers


def build_eval_dataset(path: str | Path, protocol: str, remote=None):
    """The EvalDataset of a target; Mapillary protocols resize/crop/pad inside the dataset.
    ``remote``: data.location.RemoteOptions for URL targets (retries, timeout, cache)."""
    proto = protocol if protocol.startswith("mapillary") else None
    raw = raw_target(path)
    if raw is not None:  # the readers of `blindseg shard`, with its default split
        return EvalDataset(source=StrictSource(get_source(*raw)), protocol=proto)
    return EvalDataset(path, protocol=proto, remote=remote)


def origin_id(spec: str | Path) -> str:
    """One spelling of an evaluation set's location, to tell whether a target is the clean set a corrupted
    family was made from: ``DATASET:/abs/root`` for a raw folder, the absolute path of a local shard
    folder, the location itself for a URL or pattern."""
    raw = raw_target(spec)
    if raw is not None:
        return f"{raw[0]}:{Path(raw[1]).resolve()}"
    if is_remote(str(spec)) or has_braces(str(spec)):
        return str(spec)
    return str(Path(spec).resolve())


def corruption_family(path: str | Path) -> list[dict] | None:
    """The sets of a `blindseg corrupt` output folder ([{corruption, severity, path, corrupted_from}], in the
    package's order of corruptions, then by severity), or None when ``path`` is not such a folder (a local
    folder without shards of its own whose sub-folders hold shard sets whose manifests name a corruption)."""
    s = str(path)
    if is_remote(s) or has_braces(s) or raw_target(s) is not None:
        return None
    p = Path(s)
    if not p.is_dir() or holds_shards(p):
        return None
    sets = []
    for sub in sorted(q for q in p.iterdir() if (q / "manifest.json").is_file()):
        m = local_manifest(sub)
        if m is not None and "corruption" in m and "severity" in m:
            sets.append({"corruption": str(m["corruption"]), "severity": int(m["severity"]), "path": str(sub),
                         "corrupted_from": m.get("corrupted_from")})
    if not sets:
        return None
    order = {n: i for i, n in enumerate(STANDARD + EXTRA)}
    return sorted(sets, key=lambda r: (order.get(r["corruption"], len(order)), r["corruption"], r["severity"]))


def member_name(family: str, corruption: str, severity: int) -> str:
    """The target name of one set of a corrupted family: ``<family>/<corruption>-<severity>``."""
    return f"{family}/{corruption}-{severity}"


def expand_targets(targets: dict[str, str]) -> tuple[dict[str, str], dict[str, dict]]:
    """(targets with every corrupted family replaced by its sets, {family: {path, corrupted_from, clean,
    members: {target name: {corruption, severity}}}}). ``clean``: the other target that is the set the
    family was made from (same location), else None."""
    flat: dict[str, str] = {}
    families: dict[str, dict] = {}
    for name, path in targets.items():
        sets = corruption_family(path)
        if sets is None:
            flat[name] = path
            continue
        members = {}
        for r in sets:
            flat[member_name(name, r["corruption"], r["severity"])] = r["path"]
            members[member_name(name, r["corruption"], r["severity"])] = {"corruption": r["corruption"],
                                                                           "severity": r["severity"]}
        origins = sorted({str(r["corrupted_from"]) for r in sets if r["corrupted_from"]})
        families[name] = {"path": str(path), "corrupted_from": origins[0] if len(origins) == 1 else origins,
                          "clean": None, "members": members}
    for fam in families.values():
        for name, path in targets.items():
            if name not in families and isinstance(fam["corrupted_from"], str) and \
                    origin_id(path) == fam["corrupted_from"]:
                fam["clean"] = name
                break
    return flat, families


def corruption_groups(results: dict[str, dict], families: dict[str, dict]) -> dict[str, dict]:
    """Per corrupted family: mIoU per corruption and severity, the mean per corruption, mPC (the mean
    over corruptions of those means: the mean over all sets when every corruption has the same
    severities) and, when the clean set was evaluated too, its mIoU and the relative robustness
    mPC / clean mIoU."""
    out = {}
    for fam, info in families.items():
        per: dict[str, dict[str, float]] = {}
        for tname, m in info["members"].items():
            if tname in results:
                per.setdefault(m["corruption"], {})[str(m["severity"])] = results[tname]["miou"]
        corr = {c: {"miou": v, "mean": _nanmean(np.array(list(v.values()), dtype=np.float64))} for c, v in per.items()}
        mpc = _nanmean(np.array([r["mean"] for r in corr.values()], dtype=np.float64)) if corr else float("nan")
        clean = info.get("clean")
        clean_miou = results[clean]["miou"] if clean in results else None
        out[fam] = {"path": info["path"], "corrupted_from": info["corrupted_from"], "clean": clean,
                    "clean_miou": clean_miou, "severities": sorted({int(s) for v in per.values() for s in v}),
                    "corruptions": corr, "mpc": mpc,
                    "relative_robustness": (mpc / clean_miou) if clean_miou else None}
    return out


def format_corruption_table(groups: dict[str, dict], fmt: str = "text") -> str:
    """mIoU (%) per corruption (rows) and severity (columns) with the mean per corruption, then mPC, the
    clean mIoU and the relative robustness; one table per family (fmt: text or markdown)."""
    blocks = []
    for fam, g in groups.items():
        sev = g["severities"]
        head = ["corruption", *[f"s{s}" for s in sev], "mean"]
        rows = [[c, *[r["miou"].get(str(s)) for s in sev], r["mean"]] for c, r in g["corruptions"].items()]
        rows.append(["mPC", *[None] * len(sev), g["mpc"]])
        pct = lambda v: "-" if v is None or v != v else f"{100 * v:.2f}"
        tail = (f"clean ({g['clean']}): {pct(g['clean_miou'])}, relative robustness mPC / clean: "
                f"{pct(g['relative_robustness'])} %" if g["clean"] else
                "clean set not evaluated (add it as a target to get the relative robustness)")
        if fmt == "markdown":
            lines = [f"**{fam}** (corrupted from {g['corrupted_from']}): mIoU (%)", "",
                     "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
            lines += ["| " + " | ".join([r[0], *map(pct, r[1:])]) + " |" for r in rows]
            blocks.append("\n".join(lines + ["", tail]))
            continue
        width = max(12, *(len(r[0]) + 2 for r in rows))
        lines = [f"{fam}: mIoU (%) per corruption and severity",
                 f"{'corruption':<{width}}" + "".join(f"{h:>8}" for h in head[1:]), "-" * (width + 8 * (len(head) - 1))]
        for r in rows:
            if r[0] == "mPC":
                lines.append("-" * (width + 8 * (len(head) - 1)))
            lines.append(f"{r[0]:<{width}}" + "".join(f"{pct(v) if v is not None else '':>8}" for v in r[1:]))
        blocks.append("\n".join(lines + [tail]))
    return "\n\n".join(blocks)


def corruption_report(targets: dict[str, str], results: dict[str, dict]) -> dict[str, dict]:
    """corruption_groups of the corrupted families among ``targets`` ({} when there is none)."""
    return corruption_groups(results, expand_targets(targets)[1])


def log_corruption_groups(logger, groups: dict[str, dict], step: int) -> None:
    """TensorBoard: mpc/<family>, relative_robustness/<family>, corruption/<family>/<corruption> (mean over
    severities) and corruption/<family>/<corruption>/s<severity>, and the grouped table as text."""
    if not groups:
        return
    scalars = {}
    for fam, g in groups.items():
        scalars[f"mpc/{fam}"] = g["mpc"]
        if g["relative_robustness"] is not None:
            scalars[f"relative_robustness/{fam}"] = g["relative_robustness"]
        for c, r in g["corruptions"].items():
            scalars[f"corruption/{fam}/{c}"] = r["mean"]
            scalars.update({f"corruption/{fam}/{c}/s{s}": v for s, v in r["miou"].items()})
    logger.scalars({k: v for k, v in scalars.items() if v == v}, step)
    logger.text("eval/corruptions", format_corruption_table(groups, "markdown"), step)


def evaluate_targets(net: nn.Module, eval_cfg, device, logger=None, step: int = 0, data_cfg=None) -> dict[str, dict]:
    """Evaluate every target of ``eval_cfg`` (an EvalConfig) with its protocol; returns
    {name: target_result}. Logs miou/<t>, miou16/<t> and iou/<t>/<class> scalars and a per-class
    text table to ``logger`` (a RunLogger) when given. ``data_cfg`` (a DataConfig): how URL targets
    are read (data.remote_retries, remote_timeout, cache_dir, cache_gb).

    A target that is a `blindseg corrupt` output folder (a corrupted family) is evaluated set by set, as
    targets ``<name>/<corruption>-<severity>`` with the family's protocol; corruption_report groups them
    (logged here too)."""
    remote = RemoteOptions.from_config(data_cfg)
    targets, families = expand_targets(dict(eval_cfg.targets))
    protocols = dict(eval_cfg.protocols)
    for fam, info in families.items():
        if fam in protocols:
            protocols.update({m: protocols[fam] for m in info["members"]})
    results = {}
    for name, path in targets.items():
        protocol = target_protocol(name, path, protocols)
        ds = build_eval_dataset(path, protocol, remote)
        predict = make_predictor(target_window(protocol, eval_cfg.sliding_window))
        cm = evaluate_dataset(net, ds, device=device, max_images=eval_cfg.max_images, desc=f"eval {name}",
                              predict=predict)
        results[name] = target_result(cm, protocol=protocol)
    if logger is not None:
        log_results(logger, results, step)
        log_corruption_groups(logger, corruption_groups(results, families), step)
    return results


def log_results(logger, results: dict[str, dict], step: int) -> None:
    """mIoU (and mIoU16) per target, IoU per class, and a per-class markdown table to TensorBoard."""
    for name, res in results.items():
        scalars = {f"miou/{name}": res["miou"]}
        scalars.update({f"{k}/{name}": res[k] for k in ("aacc", "macc", "fwiou") if k in res and res[k] == res[k]})
        if "confusion_matrix" in res and hasattr(logger, "figure"):
            import matplotlib.pyplot as plt

            fig = confusion_figure(res["confusion_matrix"], f"{name}: confusion matrix (row-normalized), step {step}")
            logger.figure(f"confusion/{name}", fig, step)
            plt.close(fig)
        if "miou16" in res:
            scalars[f"miou16/{name}"] = res["miou16"]
        scalars.update({f"iou/{name}/{c}": v for c, v in res["per_class_iou"].items() if v is not None})
        logger.scalars(scalars, step)
    if results:
        logger.text("eval/per_class_iou", per_class_markdown(results), step)


def per_class_markdown(results: dict[str, dict]) -> str:
    """IoU (%) per class (rows) and target (columns) as a markdown table; '-' where never seen."""
    names = list(results)
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for c in CLASS_NAMES:
        vals = [results[n]["per_class_iou"].get(c) for n in names]
        lines.append(f"| {c} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in vals) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"{100 * results[n]['miou']:.1f}" for n in names) + " |")
    if any("miou16" in results[n] for n in names):
        lines.append("| **mIoU16** | " + " | ".join(
            f"{100 * results[n]['miou16']:.1f}" if "miou16" in results[n] else "-" for n in names) + " |")
    return "\n".join(lines)


def format_table(targets: dict[str, dict], title: str = "mIoU (%)") -> str:
    """A plain-text table: one row per target with mIoU (and mIoU16 for SYNTHIA), aAcc, mAcc and
    fwIoU (when the results have them), and the mean over targets (of mIoU)."""
    if not targets:
        return "(no targets)"
    width = max(12, max(len(k) for k in targets) + 2)
    has16 = any("miou16" in r for r in targets.values())
    pix = [k for k in ("aacc", "macc", "fwiou") if all(k in r for r in targets.values())]
    names = {"aacc": "aAcc", "macc": "mAcc", "fwiou": "fwIoU"}
    extra = (f"{'mIoU16':>8}" if has16 else "") + "".join(f"{names[k]:>8}" for k in pix)
    lines = [title, f"{'target':<{width}}{'mIoU':>8}{extra}", "-" * (width + 8 + len(extra))]
    for name, res in targets.items():
        m16 = (f"{100 * res['miou16']:>8.2f}" if "miou16" in res else f"{'':>8}") if has16 else ""
        px = "".join(f"{100 * res[k]:>8.2f}" for k in pix)
        lines.append(f"{name:<{width}}{100 * res['miou']:>8.2f}{m16}{px}")
    mean = float(np.nanmean([res["miou"] for res in targets.values()]))
    lines += ["-" * (width + 8 + len(extra)), f"{'mean':<{width}}{100 * mean:>8.2f}"]
    return "\n".join(lines)


def source_targets(targets: dict[str, str], train: str | Path) -> list[str]:
    """The evaluation targets that are held-out splits of the training source: named ``source``,
    or whose shard manifest names the same dataset as the training shards' (and that are not the
    training shards themselves)."""
    train_ds = _manifest_dataset(train)
    out = []
    for name, path in targets.items():
        same = bool(train_ds) and _manifest_dataset(path) == train_ds and str(path) != str(train)
        if name == "source" or same:
            out.append(name)
    return out


def selection_target(eval_cfg, train: str | Path) -> tuple[str | None, bool]:
    """(target that selects the best checkpoint, whether it is an unseen target): eval.selection,
    else the first held-out source target; (None, False) when there is none."""
    sources = source_targets(eval_cfg.targets, train)
    if eval_cfg.selection is not None:
        return eval_cfg.selection, eval_cfg.selection not in sources
    return (sources[0], False) if sources else (None, False)
