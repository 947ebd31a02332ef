"""What CWCL and SDCL share once the pixels are chosen: the embedding rows at the chosen pixels
(a dense map or PixelRows), the InfoNCE term, the connected zero, the math dtype and the argument
checks (docs/METHOD.md, "Losses")."""

from __future__ import annotations

import torch

def check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is not one of {allowed}")



class PixelRows:
    """An embedding map given only at some pixels: the (P, D) rows at the sorted flat indices
    ``pix`` into B*h*w of a (B, D, h, w) map (an index may repeat; its first row is read). The
    losses accept it wherever they accept the dense map, and read only the pixels their plan chose
    (cwcl_pixels / sdcl_pixels), so no zero-filled dense map, and no dense zero gradient, is built (docs/METHOD.md, "Sparse
    projection heads")."""

    def __init__(self, rows: torch.Tensor, pix: torch.Tensor, shape: tuple[int, int, int, int]):
        if rows.dim() != 2 or pix.dim() != 1 or rows.shape[0] != pix.shape[0]:
            raise ValueError(f"PixelRows: rows must be (P, D) and pix (P,), got {tuple(rows.shape)} "
                             f"and {tuple(pix.shape)}")
        self.rows, self.pix = rows, pix
        self.shape = torch.Size(shape)
        if self.shape[1] != rows.shape[1]:
            raise ValueError(f"PixelRows: rows have D={rows.shape[1]}, the map shape says {tuple(shape)}")

    def dim(self) -> int:
        return 4

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def requires_grad(self) -> bool:
        return self.rows.requires_grad

    def detach(self) -> "PixelRows":
        return PixelRows(self.rows.detach(), self.pix, tuple(self.shape))

    def sum(self) -> torch.Tensor:
        return self.rows.sum()

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows at the flat pixel indices ``flat`` (any shape) -> flat.shape + (D,). Every index
        must be one of ``pix`` (the plan's pixels): checked by tests, not per step (a host sync)."""
        return self.rows[torch.searchsorted(self.pix, flat)]


def rows_at(emb, flat: torch.Tensor) -> torch.Tensor:
    """Rows at flat pixel indices into B*h*w -> flat.shape + (C,). ``emb``: a dense (B, C, h, w)
    map (read without a permuted copy) or PixelRows."""
    if isinstance(emb, PixelRows):
        return emb.take(flat)
    n = emb.shape[-2] * emb.shape[-1]
    return emb.flatten(2)[flat // n, :, flat % n]


def take(emb, flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return rows_at(emb, flat).to(dtype)



def info_nce(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-anchor CE with target 0 over the logits [pos, neg...], ALREADY divided by tau (the
    callers scale the (A, D) anchors by 1/tau, not the (A, K) similarities): pos (A,), neg (A, K).
    logsumexp([pos, neg]) = logaddexp(pos, logsumexp(neg)), so no (A, 1 + K) concatenation is
    built; a row of neg that is all -inf (every key masked) gives 0."""
    return torch.logaddexp(pos, torch.logsumexp(neg, dim=1)) - pos


def connected_zero(emb_aug: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """A 0 that keeps both embeddings (so every parameter) in the graph: DDP needs no
    find_unused_parameters even when a rank has no anchors."""
    zero = emb_aug.sum() * 0.0  # (a PixelRows sums its rows)
    if emb.requires_grad:
        zero = zero + emb.sum() * 0.0
    return zero


def math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def check_embeddings(emb_aug, emb, name: str) -> None:
    if emb_aug.dim() != 4 or emb_aug.shape != emb.shape:
        raise ValueError(f"{name}: emb_aug and emb must be (B, D, h, w) of the same shape, got "
                         f"{tuple(emb_aug.shape)} and {tuple(emb.shape)}")
