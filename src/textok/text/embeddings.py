"""``TextEmbeddings``: per-token text features and their padding mask, the currency of text conditioning."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import TextokError


@dataclasses.dataclass
class TextEmbeddings:
    """Per-token states ``(B, L, D)`` and a mask ``(B, L)`` (True = a real token, False = padding).

    ``dense``: True when no position is padding, so attention may skip the mask (a faster kernel, the same
    result). It is read from the mask while the mask is on the CPU (batches are built there) and carried along by
    :meth:`to`; for a mask made on a GPU it stays ``None`` (unknown: the mask is used) rather than cost a sync.
    """

    states: Tensor
    mask: Tensor
    dense: bool | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.states.dim() != 3:
            raise TextokError(f"text states must be (batch, tokens, dim), got shape {tuple(self.states.shape)}")
        if self.mask.shape != self.states.shape[:2]:
            raise TextokError(
                f"text mask shape {tuple(self.mask.shape)} does not match states {tuple(self.states.shape[:2])}"
            )
        self.mask = self.mask.bool()
        if self.dense is None and self.mask.device.type == "cpu":
            self.dense = bool(self.mask.all())

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def dim(self) -> int:
        return self.states.shape[-1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEmbeddings":
        return TextEmbeddings(self.states.to(device=device, dtype=dtype), self.mask.to(device=device), self.dense)

    def __getitem__(self, index: int | slice | Tensor) -> "TextEmbeddings":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextEmbeddings(self.states[index], self.mask[index])

    def pad_to(self, length: int) -> "TextEmbeddings":
        """Right-pad (never truncate) to ``length`` tokens; padded positions are masked out."""
        extra = length - self.states.shape[1]
        if extra <= 0:
            return self
        B, _, D = self.states.shape
        states = torch.cat([self.states, self.states.new_zeros(B, extra, D)], dim=1)
        mask = torch.cat([self.mask, self.mask.new_zeros(B, extra)], dim=1)
        return TextEmbeddings(states, mask)

    def trim(self) -> "TextEmbeddings":
        """Drop trailing columns that are padding in every row (shorter sequences, faster attention)."""
        used = int(self.mask.any(0).nonzero().max().item()) + 1 if self.mask.any() else 1
        return TextEmbeddings(self.states[:, :used], self.mask[:, :used])

    def pooled(self) -> "TextEmbeddings":
        """One token per caption: the masked mean of its states (a row without real tokens stays masked)."""
        w = self.mask[..., None].to(self.states.dtype)
        mean = (self.states * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        return TextEmbeddings(mean, self.mask.any(1, keepdim=True))

    def without(self, rows: Tensor) -> "TextEmbeddings":
        """The same captions with every token of the ``rows`` (B,) bool masked out: those images get no text."""
        return TextEmbeddings(self.states, self.mask & ~rows.to(self.mask.device)[:, None])

    @staticmethod
    def cat(items: list["TextEmbeddings"]) -> "TextEmbeddings":
        length = max(item.states.shape[1] for item in items)
        padded = [item.pad_to(length) for item in items]
        return TextEmbeddings(torch.cat([p.states for p in padded]), torch.cat([p.mask for p in padded]))
