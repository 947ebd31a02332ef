"""Result tables: the demo's report and `blindseg report` share this code."""
from __future__ import annotations

import numpy as np

from ..data.labels import CLASS_NAMES


def miou_table(targets: dict[str, dict], unseen: list[str] | None = None) -> str:
    """Per-target mIoU (%), and the mean over the unseen targets (all targets when not given)."""
    unseen = list(targets) if unseen is None else unseen
    width = max(14, max(len(k) for k in targets) + 2)
    rows = [f"{'target':<{width}}{'mIoU %':>8}  role", "-" * (width + 16)]
    for name, res in targets.items():
        role = "unseen" if name in unseen else "source (held out)"
        rows.append(f"{name:<{width}}{100 * res['miou']:>8.2f}  {role}")
    if unseen:
        mean = float(np.nanmean([targets[k]["miou"] for k in unseen]))
        rows += ["-" * (width + 16), f"{'mean unseen':<{width}}{100 * mean:>8.2f}"]
    return "\n".join(rows)


def per_class_table(targets: dict[str, dict]) -> str:
    """IoU (%) per class (rows) and target (columns); '-' where a class never occurs."""
    names = list(targets)
    head = f"{'class':<14}" + "".join(f"{n[:12]:>13}" for n in names)
    rows = [head]
    for c in CLASS_NAMES:
        vals = [targets[n]["per_class_iou"].get(c) for n in names]
        if all(v is None for v in vals):
            continue
        rows.append(f"{c:<14}" + "".join(f"{'-' if v is None else f'{100 * v:.1f}':>13}" for v in vals))
    return "\n".join(rows)


def print_report(report: dict) -> None:
    print()
    print(f"Results (world size {report['world_size']}, checkpoint {report['checkpoint']})")
    print(miou_table(report["targets"], report.get("unseen")))
    print()
    print(per_class_table(report["targets"]))
    if "timings" in report:
        t = report["timings"]
        print("\ntime: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items()))
