"""Unique, invertible semantic IDs: one (L+1)-digit path per item, and back.

A quantiser maps items to L-digit paths, and some items collide (share a path). The decoder needs
every path to name exactly one item, so we append a disambiguation digit (level L+1):

**Rule.** Items with the same L-digit path get digits 0, 1, 2, ... in ascending global item id; an item
whose path is unique gets 0. The extra level has ``K_dis = max group size`` codes: exactly as many as
the largest collision group needs (1 when nothing collides, i.e. a constant 0 digit, so every path
keeps length L+1 and the decoder's last step is trivial).

Organic items and ads share one space: the table is built over the concatenation [organic; ads], so
global item id ``i < num_organic`` is organic item ``i`` and ``i >= num_organic`` is ad
``i - num_organic``. ``split`` turns global ids back into (kind, local index).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpr_sim.tokenizer.metrics import group_paths
from gpr_sim.tokenizer.rq_kmeans import check_codes, check_int

ORGANIC = 0
"""item kind of organic content (short videos, articles)"""
AD = 1
"""item kind of ads"""


class SemanticIdTable:
    """Bijection between items and (L+1)-digit paths, with lookups in both directions.

    Attributes:
        item_to_path: (N, L+1) int64, row i = item i's path (L quantiser digits + 1 disambiguation digit).
        level_sizes: codes per level, ``(K,) * L + (K_dis,)``: what a trie over these paths needs.
        num_dis: K_dis, the size of the largest collision group.
        num_organic: items ``[0, num_organic)`` are organic, the rest are ads.
    """

    def __init__(self, codes: Tensor, codebook_size: int, num_organic: int | None = None) -> None:
        """Build from quantiser codes.

        Args:
            codes: (N, L) int64 codes of the items [organic; ads], values in [0, codebook_size).
            codebook_size: K.
            num_organic: how many leading rows are organic; None = all of them.
        """
        if codes.dim() != 2 or codes.shape[0] == 0:
            raise ValueError(f"codes must be a non-empty (N, L) int64 tensor, got {tuple(codes.shape)}")
        check_codes(codes, codes.shape[1], codebook_size)
        n, num_levels = codes.shape
        num_organic = n if num_organic is None else num_organic
        check_int("num_organic", num_organic, 0, n)
        self.codebook_size = codebook_size
        self.num_levels = num_levels
        self.num_organic = num_organic

        inverse, counts = group_paths(codes)
        order = torch.sort(inverse, stable=True).indices  # groups contiguous, ascending item id inside
        group_start = torch.cumsum(counts, 0) - counts  # (G,) first position of each group in `order`
        positions = torch.arange(n, device=codes.device)
        rank = torch.empty(n, dtype=torch.int64, device=codes.device)
        rank[order] = positions - group_start[inverse[order]]  # 0, 1, 2, ... within each group
        self.num_dis = int(counts.max())
        self.item_to_path = torch.cat([codes, rank[:, None]], 1)  # (N, L+1)
        self.level_sizes = (codebook_size,) * num_levels + (self.num_dis,)
        if codebook_size**num_levels * self.num_dis >= 2**63:
            raise ValueError(
                f"K^L * K_dis = {codebook_size}^{num_levels} * {self.num_dis} overflows int64 path keys"
            )

        # `order` already sorts the full paths: groups in lexicographic path order, then the disambiguation
        # digit (= rank in ascending item id) inside each; the keys are unique, so this is torch.sort(keys)
        self._sorted_keys, self._key_items = self._keys(self.item_to_path)[order], order

    # ------------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        """N = organic + ads."""
        return self.item_to_path.shape[0]

    @property
    def num_ads(self) -> int:
        """Items after the organic block."""
        return self.num_items - self.num_organic

    @property
    def path_len(self) -> int:
        """L + 1."""
        return self.num_levels + 1

    @property
    def ad_paths(self) -> Tensor:
        """(num_ads, L+1) paths of the ads, row j = ad j (what an ad-only trie is built from)."""
        return self.item_to_path[self.num_organic :]

    @property
    def organic_paths(self) -> Tensor:
        """(num_organic, L+1) paths of the organic items."""
        return self.item_to_path[: self.num_organic]

    def _keys(self, paths: Tensor) -> Tensor:
        """Mixed-radix int64 key of each (B, L+1) path; digits assumed in range."""
        key = torch.zeros(paths.shape[0], dtype=torch.int64, device=paths.device)
        for level, size in enumerate(self.level_sizes):
            key = key * size + paths[:, level]
        return key

    def path_to_item(self, paths: Tensor) -> Tensor:
        """Global item id of each path.

        Args:
            paths: (B, L+1) int64 full paths (any digits; out-of-range ones are just unknown).

        Returns:
            (B,) int64 global item ids, -1 where no item has that path.
        """
        if paths.dim() != 2 or paths.shape[1] != self.path_len:
            raise ValueError(f"paths must be (B, {self.path_len}), got {tuple(paths.shape)}")
        paths = paths.to(device=self._sorted_keys.device, dtype=torch.int64)
        sizes = torch.tensor(self.level_sizes, device=paths.device)  # (L+1,)
        in_range = ((paths >= 0) & (paths < sizes)).all(1)  # (B,)
        keys = self._keys(torch.where(in_range[:, None], paths, 0))
        pos = torch.searchsorted(self._sorted_keys, keys).clamp_max(self.num_items - 1)  # (B,)
        found = in_range & (self._sorted_keys[pos] == keys)
        return torch.where(found, self._key_items[pos], -1)

    def paths_of(self, item_ids: Tensor) -> Tensor:
        """(B,) global item ids -> (B, L+1) paths."""
        return self.item_to_path[item_ids]

    def split(self, item_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Global ids -> (kind, local index), each (B,) int64; -1 ids give kind -1 and local -1.

        kind is ``ORGANIC`` (local = organic index) or ``AD`` (local = ad index).
        """
        is_ad = item_ids >= self.num_organic
        kind = torch.where(item_ids < 0, -1, torch.where(is_ad, AD, ORGANIC))
        local = torch.where(item_ids < 0, -1, torch.where(is_ad, item_ids - self.num_organic, item_ids))
        return kind, local

    def organic_ids(self, local: Tensor) -> Tensor:
        """Organic local indices (B,) -> global item ids (B,)."""
        return local

    def ad_ids(self, local: Tensor) -> Tensor:
        """Ad local indices (B,) -> global item ids (B,)."""
        return local + self.num_organic

    def to(self, device: str | torch.device) -> SemanticIdTable:
        """Move the lookup tensors to ``device`` (in place); returns self."""
        self.item_to_path = self.item_to_path.to(device)
        self._sorted_keys = self._sorted_keys.to(device)
        self._key_items = self._key_items.to(device)
        return self

    @classmethod
    def from_parts(cls, organic_codes: Tensor, ad_codes: Tensor, codebook_size: int) -> SemanticIdTable:
        """Build over [organic; ads] from the two (N_o, L) and (N_a, L) code blocks."""
        return cls(torch.cat([organic_codes, ad_codes]), codebook_size, num_organic=organic_codes.shape[0])
