"""ImageNet weights of the backbone: which file a recipe needs, and which file was loaded.

The published BlindNet numbers start from torchvision's ImageNet ResNet-50 **V1** file
``resnet50-19c8e357.pth`` (the released code loads it by URL); torchvision's V2 weights
(``resnet50-11ad3fa6.pth``, a newer training recipe) give different numbers. Nothing is ever
downloaded here: the user fetches the file once and points ``model.pretrained`` at it.

Recognition is by content, never by file name: torchvision names each file
``<arch>-<h>.pth`` where ``<h>`` is the first 8 hex digits of the file's sha256 (torch.hub checks
downloads against that prefix), so the sha256 of the bytes identifies a known file whatever it
is called locally. A file whose name carries a torchvision-style hash that its content does not
match is reported as damaged or modified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["KNOWN_WEIGHTS", "RECOMMENDED", "KnownWeights", "identify_weights", "check_pretrained",
           "weights_url"]

_URL = "https://download.pytorch.org/models/{file}"


@dataclass(frozen=True)
class KnownWeights:
    file: str
    """torchvision file name: <arch>-<first 8 hex digits of the sha256>.pth."""
    arch: str
    version: str
    """"V1" or "V2" (torchvision's IMAGENET1K_V1 / IMAGENET1K_V2)."""
    note: str

    @property
    def prefix(self) -> str:
        return self.file.rsplit("-", 1)[1].split(".")[0]


KNOWN_WEIGHTS: tuple[KnownWeights, ...] = (
    KnownWeights("resnet50-19c8e357.pth", "resnet50", "V1",
                 "torchvision's original ImageNet V1 file, the one the released BlindNet/RobustNet "
                 "code loads and the published numbers use"),
    KnownWeights("resnet50-0676ba61.pth", "resnet50", "V1",
                 "torchvision's current IMAGENET1K_V1 download (the V1 weights re-saved in the newer "
                 "serialization; the released code used resnet50-19c8e357.pth)"),
    KnownWeights("resnet50-11ad3fa6.pth", "resnet50", "V2",
                 "torchvision IMAGENET1K_V2 (newer training recipe): NOT the weights of the published "
                 "numbers, expect different results; the recipe uses resnet50-19c8e357.pth"),
    KnownWeights("resnet18-5c106cde.pth", "resnet18", "V1", "torchvision's original ImageNet V1 file"),
    KnownWeights("resnet18-f37072fd.pth", "resnet18", "V1", "torchvision's current IMAGENET1K_V1 download"),
    KnownWeights("resnet34-333f7ec4.pth", "resnet34", "V1", "torchvision's original ImageNet V1 file"),
    KnownWeights("resnet34-b627a593.pth", "resnet34", "V1", "torchvision's current IMAGENET1K_V1 download"),
    KnownWeights("resnet101-5d3b4d8f.pth", "resnet101", "V1", "torchvision's original ImageNet V1 file"),
    KnownWeights("resnet101-63fe2227.pth", "resnet101", "V1", "torchvision's current IMAGENET1K_V1 download"),
    KnownWeights("resnet101-cd907fc2.pth", "resnet101", "V2",
                 "torchvision IMAGENET1K_V2 (newer training recipe, not the V1 weights)"),
)
"""torchvision ResNet ImageNet files, recognised by the sha256 prefix in their names."""

RECOMMENDED: dict[str, str] = {
    "resnet18": "resnet18-5c106cde.pth",
    "resnet34": "resnet34-333f7ec4.pth",
    "resnet50": "resnet50-19c8e357.pth",
    "resnet101": "resnet101-5d3b4d8f.pth",
}
"""The V1 file each torchvision backbone's recipe expects (resnet50: the published numbers)."""

_TV_NAME = re.compile(r"^(resnet\d+)-([0-9a-f]{8,})\.pth$")


def weights_url(file: str) -> str:
    """torchvision's download address of a file in KNOWN_WEIGHTS (as text; nothing is fetched)."""
    return _URL.format(file=file)


def identify_weights(path: str | Path, backbone: str | None = None) -> dict[str, Any]:
    """What a weights file is, from the sha256 of its bytes.

    Returns {"file", "sha256", "known" (the KNOWN_WEIGHTS file name or None), "version" ("V1",
    "V2" or None), "note", "level" ("info" | "warning"), "message"}: a V1 file of this
    ``backbone`` is "info"; V2, a file of another architecture, an unknown file or a file whose
    torchvision-style name disagrees with its content is "warning".
    """
    from ..data.shards import _sha256  # the project's one file-digest helper (shard checksums)

    path = Path(path)
    digest = _sha256(path)
    known = next((k for k in KNOWN_WEIGHTS if digest.startswith(k.prefix)), None)
    out: dict[str, Any] = {"file": str(path), "sha256": digest, "known": known.file if known else None,
                           "version": known.version if known else None, "note": known.note if known else ""}
    name = _TV_NAME.match(path.name)
    if known is not None:
        level = "info" if known.version == "V1" and backbone in (None, known.arch) else "warning"
        msg = f"{path}: torchvision {known.arch} ImageNet {known.version} ({known.file}): {known.note}"
        if backbone is not None and backbone != known.arch:
            msg += f"; this run's backbone is {backbone}"
    elif name is not None and not digest.startswith(name.group(2)):
        level = "warning"
        msg = (f"{path}: the name carries torchvision hash {name.group(2)} but the content's sha256 starts "
               f"with {digest[:8]}: a truncated or modified download? Fetch it again")
    else:
        level = "warning"
        want = RECOMMENDED.get(backbone or "", "")
        msg = (f"{path}: unknown weights file (sha256 {digest[:16]}...), not a torchvision ImageNet file"
               + (f"; the recipe's numbers use {want}" if want else ""))
    out.update(level=level, message=msg)
    return out


def check_pretrained(model_cfg: Any) -> None:
    """Stop (ConfigError, exit 2) when a recipe requires ImageNet weights and none are set.

    ``model_cfg``: the config's ``model`` section. Passes when ``require_pretrained`` is off,
    when ``pretrained`` is a path or the explicit word "none" (random init on purpose), or when
    ``init_from`` provides every weight."""
    if not model_cfg.require_pretrained or model_cfg.pretrained is not None or model_cfg.init_from:
        return
    file = RECOMMENDED.get(model_cfg.backbone)
    if file is not None:
        what = (f"torchvision's ImageNet {model_cfg.backbone} V1 file {file}"
                + (" (the published numbers use it; V2 weights give different numbers)"
                   if model_cfg.backbone == "resnet50" else ""))
        fetch = (f"Download it yourself (blindseg never downloads) from {weights_url(file)}, put it for "
                 f"example at pretrained/{file}, and set model.pretrained=pretrained/{file}")
    else:
        what = f"ImageNet weights for backbone {model_cfg.backbone!r}"
        fetch = "Save them as a local .pth/.safetensors state dict and set model.pretrained=PATH"
    raise ConfigError(
        f"config key 'model.pretrained': not set, but this config requires {what} "
        f"(model.require_pretrained: true). {fetch} (in the YAML or as an override); "
        "or set model.pretrained=none to train from random weights on purpose."
    )
