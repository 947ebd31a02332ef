"""How hard does each BlindNet loss pull on the network? The gradient of every weighted loss term,
per parameter group, against the segmentation loss's (docs/BENCHMARKS.md, "Does the method beat the
baseline?": why the losses do not show).

For each given checkpoint (a run's checkpoint folder, or none: the config's initial weights), on the
first --batches training batches of the config's source shards (the trainer's loader and views,
every loss on at the config's weights), it takes the gradient of each weighted term separately
(`torch.autograd.grad`, the same graph) with respect to
  encoder  the backbone (where CML and CCL act, at its IN points),
  decoder  everything else: DeepLabV3+ decoder, auxiliary head, projection heads,
and reports, averaged over the batches:
  value      the weighted term (what it adds to the objective),
  |g| enc / dec   the norm of its gradient on each group,
  / seg      that norm over the norm of the segmentation part's gradient (0.5 CE + 0.5 CE_aug + aux),
  cos seg    the cosine between its encoder gradient and the segmentation part's encoder gradient
             (batches where the term has no gradient at all, e.g. SDCL without a wrong pixel, are
             counted in "batches_without_gradient" and left out of the cosine's mean; the
             other columns average them in as zeros).
A checkpoint of a run without CWCL/SDCL (baseline, two-view CE) has no projection heads: they start
fresh (seeded), as if the losses were switched on from there ("fresh_projection_heads" in the JSON).
A term whose gradient is a few percent of the segmentation's moves the weights a few percent of what
CE moves them (SGD: the update is the gradient); a cosine near 1 means it pushes where CE pushes anyway.

    python bench/loss_grads.py --config demo --set data.train=DIR/source-train data.crop_size=64 \\
        --checkpoint init --label "random start" --checkpoint RUN/checkpoints/1000 --label "all four, 1000 steps"

Repeat --checkpoint/--label pairs to compare runs in one table. Prints the table and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from blindseg_dist import atomic  # noqa: E402
from blindseg_dist.config import load_config, model_kwargs  # noqa: E402
from blindseg_dist.data.stream import train_loader_from_config  # noqa: E402
from blindseg_dist.engine.checkpoint import fit_weights, load_model_weights  # noqa: E402
from blindseg_dist.model import build_model  # noqa: E402
from blindseg_dist.model.objective import BlindNetObjective  # noqa: E402

SEG = ("ce", "ce_aug", "aux")
TERMS = ("seg", "cml", "ccl", "cwcl", "sdcl")
ALL_FOUR = ["loss.two_view=true", "loss.cml=0.2", "loss.ccl=0.2", "loss.cwcl=0.3", "loss.sdcl=0.3"]


def term_weights(loss) -> dict[str, float]:
    """The weight of every term in the objective (model/objective.py: BlindNetObjective)."""
    return {"ce": 0.5, "ce_aug": 0.5, "aux": loss.aux, "cml": loss.cml, "ccl": loss.ccl,
            "cwcl": loss.cwcl, "sdcl": loss.sdcl}


def _flat(grads, params) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def batch_gradients(objective: BlindNetObjective, batch: dict, step: int, groups: dict[str, list]) -> dict:
    """Weighted value and flat gradient per group of every term (the segmentation terms summed as "seg")."""
    out = objective(batch["image"], batch["label"], batch["image_aug"], step=step,
                    global_index=step * batch["image"].shape[0] + torch.arange(batch["image"].shape[0]))
    w = term_weights(objective.w)
    weighted = {"seg": sum(w[k] * out["terms"][k] for k in SEG if k in out["terms"])}
    for k in TERMS[1:]:
        if k in out["terms"]:
            weighted[k] = w[k] * out["terms"][k]
    params = [p for ps in groups.values() for p in ps]
    res = {}
    for name, v in weighted.items():
        grads = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
        flat, i = {}, 0
        for g_name, ps in groups.items():
            flat[g_name] = _flat(grads[i:i + len(ps)], ps)
            i += len(ps)
        res[name] = {"value": float(v.detach()), "grad": flat}
    return res


def measure(cfg, checkpoint: str, batches: int) -> dict:
    """Per term: mean weighted value, gradient norms per group, ratio to the segmentation part, cosine.
    ``checkpoint``: a checkpoint folder, "init" (the config's initial weights) or "init:FILE" (initial
    weights with the backbone from a weights file, as model.pretrained=FILE: a run's first step)."""
    torch.manual_seed(cfg.run.seed)
    kwargs = model_kwargs(cfg)
    if checkpoint.startswith("init:"):
        kwargs["pretrained"] = checkpoint[len("init:"):]
    net = build_model(**kwargs)
    fresh_heads = False
    if not checkpoint.startswith("init"):
        weights = load_model_weights(checkpoint)
        missing = [k for k in net.state_dict() if k not in weights]
        # a run without CWCL/SDCL has no projection heads: they start fresh (seeded) here, as they would
        # if the contrastive losses were switched on from that checkpoint
        fresh_heads = bool(missing) and all(k.startswith("proj_heads.") for k in missing)
        if fresh_heads:
            weights = {**{k: v for k, v in net.state_dict().items() if k in missing}, **weights}
        fit_weights(net, weights, checkpoint)
    net.train()
    objective = BlindNetObjective(net, cfg.loss, run_seed=cfg.run.seed)
    groups = {"encoder": [p for p in net.backbone.parameters() if p.requires_grad]}
    enc = {id(p) for p in groups["encoder"]}
    groups["decoder"] = [p for p in net.parameters() if p.requires_grad and id(p) not in enc]
    per: dict[str, dict[str, list[float]]] = {}
    for step, batch in enumerate(train_loader_from_config(cfg)):
        if step >= batches:
            break
        res = batch_gradients(objective, batch, step, groups)
        seg = res["seg"]["grad"]
        for name, r in res.items():
            s = per.setdefault(name, {})
            s.setdefault("value", []).append(r["value"])
            for g_name, g in r["grad"].items():
                norm, ref = float(g.norm()), float(seg[g_name].norm())
                s.setdefault(f"norm_{g_name}", []).append(norm)
                s.setdefault(f"ratio_{g_name}", []).append(norm / ref if ref > 0 else math.nan)
            e, ref = r["grad"]["encoder"].double(), seg["encoder"].double()
            den = float(e.norm() * ref.norm())
            # a batch where the term has no gradient (e.g. SDCL without a wrong pixel) has no direction
            s.setdefault("cos_encoder", []).append(float(e @ ref) / den if den > 0 else math.nan)
    return {name: {**{k: _nanmean(v) for k, v in s.items()}, "batches": len(s["value"]),
                   "batches_without_gradient": sum(math.isnan(c) for c in s["cos_encoder"]),
                   "fresh_projection_heads": fresh_heads}
            for name, s in per.items()}


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def table(rows: list[dict]) -> str:
    head = "| run | term | value | abs g enc | abs g dec | enc / seg | dec / seg | cos seg (enc) |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        for name in TERMS:
            m = r["terms"].get(name)
            if m is None:
                continue
            lines.append(f"| {r['label']} | {name} | {m['value']:.4f} | {m['norm_encoder']:.4f} | "
                         f"{m['norm_decoder']:.4f} | {m['ratio_encoder']:.3f} | {m['ratio_decoder']:.3f} | "
                         f"{m['cos_encoder']:+.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="demo", help="experiment config (the source shards: data.train)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="a checkpoint folder; 'init': the config's initial weights; 'init:FILE': the same with\n"
                         "the backbone from weights FILE (a run's first step with model.pretrained=FILE); repeatable")
    ap.add_argument("--label", action="append", default=[], help="a name per --checkpoint, in the same order")
    ap.add_argument("--batches", type=int, default=8, help="training batches averaged over")
    ap.add_argument("--out", default=str(ROOT / "bench/results/loss_grads.json"))
    args = ap.parse_args(argv)
    ckpts = args.checkpoint or ["init"]
    labels = args.label or ckpts
    if len(labels) != len(ckpts):
        ap.error(f"{len(ckpts)} --checkpoint but {len(labels)} --label: give one label per checkpoint")
    # every loss on, at the reported weights, and the loader in this process (no workers)
    cfg = load_config(args.config, [*args.set, *ALL_FOUR, "data.num_workers=0"])
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    rows = []
    for ck, label in zip(ckpts, labels):
        terms = measure(cfg, ck, args.batches)
        rows.append({"label": label, "checkpoint": ck, "terms": terms})
        print(f"[loss_grads] {label}: done", file=sys.stderr)
    text = table(rows)
    print(text)
    atomic.write_text(args.out, json.dumps({
        "what": "weighted loss terms and their gradient norms per parameter group (bench/loss_grads.py)",
        "command": "python bench/loss_grads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batches": args.batches, "crop": cfg.data.crop_size, "batch_size": cfg.data.batch_size,
        "backbone": cfg.model.backbone, "machine": platform.machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
