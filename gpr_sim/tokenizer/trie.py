"""Prefix trie over semantic-ID paths, as dense per-level tensors for batched constrained decoding.

Layout (no Python objects per node): items are sorted lexicographically by path, so the items under
any node form one contiguous range of the sorted order. A node at depth d (a prefix of length d) is
an integer id in ``[0, num_nodes[d])``, numbered in sorted-path order; depth 0 has only the root, 0.

| tensor | shape | meaning |
|---|---|---|
| ``children[d]`` | (num_nodes[d], K_d) int32 | child node id at depth d+1 for each next code, -1 if illegal |
| ``child_keys[d]`` | (num_nodes[d+1],) int64 | ``parent * K_d + code`` of every depth-(d+1) node: increasing |
| ``node_start[d]`` | (num_nodes[d] + 1,) int64 | node j at depth d covers sorted items [node_start[d][j], node_start[d][j+1]) |
| ``child_start[d]`` | (num_nodes[d] + 1,) int64 or None | node j's children are depth-(d+1) nodes [child_start[d][j], child_start[d][j+1]) |
| ``first_code[d]`` | (num_nodes[d],) int64 or None | code of node j's first child, where every node's child codes are consecutive |
| ``order`` | (N,) int64 | sorted position -> original item index |

A legal-next-code mask is one row gather of a kept bool table ``children[d] >= 0`` (+25% of the int32
table's memory). A level whose dense table would pass ``dense_table_limit`` entries (e.g. a wide
disambiguation level over millions of nodes) keeps ``children[d] = None`` and reads its children from the
CSR offsets ``child_start[d]`` instead: nodes are numbered in sorted-path order, so the children of one
node are one contiguous id range, in code order. When every node's child codes are consecutive (the
disambiguation level: an ad group's digits are its ranks in the [organic; ads] collision group, c0,
c0+1, ...), code c of node j is legal iff ``first_code <= c < first_code + count`` and its child is
``child_start + c - first_code``: the mask is the xor of two rows of a (K+1, K) bool table ``codes < j``,
no search. Otherwise the children of a row are scattered into its (B, K) row from a slot table padded
to the level's largest fan-out. On the large world's ad trie (1M ads, K_dis = 949) one pre-training
minibatch's masks (4,096 paths, every level) went from 116 ms to about 1 ms on one CPU thread. With an
item-eligibility mask (e.g.
ads whose advertiser still has budget), a code is legal only if its child's item range contains an
eligible item; that is a segment "any", done with a cumulative sum over the sorted items and two
gathers at the range ends, so the cost is O(B * N) with no loop over rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def lexsort_rows(paths: Tensor, level_sizes: Sequence[int] | None = None) -> Tensor:
    """Permutation that sorts the (N, L) rows lexicographically (stable: ties keep item order).

    With ``level_sizes`` (digit d in [0, level_sizes[d])) whose product fits in int64, one stable sort of
    the rows' mixed-radix keys (the same order: the key increases with the path); otherwise L stable
    column sorts, least significant first.
    """
    if level_sizes is not None and math.prod(int(k) for k in level_sizes) < 2**63:
        key = torch.zeros(paths.shape[0], dtype=torch.int64, device=paths.device)
        for d, k in enumerate(level_sizes):
            key = key * int(k) + paths[:, d]
        return torch.sort(key, stable=True).indices
    order = torch.arange(paths.shape[0], device=paths.device)
    for col in reversed(range(paths.shape[1])):  # least significant column first, stable sorts
        order = order[torch.sort(paths[order, col], stable=True).indices]
    return order


class PrefixTrie:
    """Trie of item paths with batched next-code masks and node transitions.

    Args:
        paths: (N, depth) int64 item paths (e.g. ``SemanticIdTable.ad_paths``); items may share a path.
        level_sizes: codes per level (length ``depth``), or one int for every level.
        dense_table_limit: a level with more (node, code) entries than this keeps CSR child offsets
            (``child_start``) instead of a dense int32 child table (bounds memory, e.g. 2^26 = 256 MB); a
            consecutive-code level keeps its (K+1, K) bool step table only within it too.
        eligibility_block: max (rows x items) entries of the int32 prefix-count block built per row
            chunk of a (B, N) eligibility mask.
    """

    def __init__(
        self,
        paths: Tensor,
        level_sizes: Sequence[int] | int,
        *,
        dense_table_limit: int = 1 << 26,
        eligibility_block: int = 1 << 26,
    ) -> None:
        self.dense_table_limit = dense_table_limit
        self.eligibility_block = eligibility_block
        if paths.dim() != 2 or paths.shape[0] == 0 or paths.shape[1] == 0 or paths.dtype != torch.int64:
            raise ValueError(
                f"paths must be a non-empty (N, depth) int64 tensor, got {tuple(paths.shape)} {paths.dtype}"
            )
        n, depth = paths.shape
        sizes = [level_sizes] * depth if isinstance(level_sizes, int) else list(level_sizes)
        if len(sizes) != depth or any(int(k) < 1 for k in sizes):
            raise ValueError(f"level_sizes must be {depth} positive ints, got {level_sizes!r}")
        bound = torch.tensor(sizes, device=paths.device)
        if bool(((paths < 0) | (paths >= bound)).any()):
            raise ValueError(f"paths must lie in [0, level_sizes[d]) at every level d, sizes {sizes}")
        self.level_sizes = tuple(int(k) for k in sizes)
        self.depth = depth
        self.num_items = n

        self.order = lexsort_rows(paths, self.level_sizes)  # (N,)
        sp = paths[self.order]  # (N, depth) sorted paths
        # changed[i, d]: sorted item i+1 differs from item i somewhere in its first d+1 digits
        changed = torch.cumsum((sp[1:] != sp[:-1]).int(), 1) > 0  # (N-1, depth)
        first_row = torch.ones(1, dtype=torch.bool, device=paths.device)
        self.children: list[Tensor | None] = []
        self.child_keys: list[Tensor] = []
        self.child_start: list[Tensor | None] = []  # CSR offsets of the levels without a dense table
        self.first_code: list[Tensor | None] = []  # where those levels' child codes are consecutive
        self._fanout: list[int] = []  # most children of one node, on the levels padded to it (else 0)
        # plain masks without compares: (num_nodes[d] + 1, K) bool ``children >= 0`` of the dense levels with
        # an all-False last row for off-trie nodes, and (K+1, K) bool ``codes < j`` of the consecutive ones
        self._legal: list[Tensor | None] = []
        self._below: list[Tensor | None] = []
        self.node_start: list[Tensor] = [torch.tensor([0, n], device=paths.device)]
        self.num_nodes = [1]
        parent = torch.zeros(n, dtype=torch.int64, device=paths.device)  # every item hangs under the root
        for d in range(depth):
            k = self.level_sizes[d]
            starts = torch.cat([first_row, changed[:, d]])  # (N,) item opens a new depth-(d+1) node
            node = torch.cumsum(starts, 0) - 1  # (N,) depth-(d+1) node of each sorted item
            first = torch.nonzero(starts).squeeze(1)  # (M,) first sorted item of each new node
            owner, code = parent[first], sp[first, d]  # (M,) parent node and code of each new node
            self.child_keys.append(owner * k + code)  # (M,) increasing
            table = start = code0 = legal = below = None
            fanout = 0
            if self.num_nodes[d] * k <= self.dense_table_limit:
                table = torch.full((self.num_nodes[d], k), -1, dtype=torch.int32, device=paths.device)
                table[owner, code] = torch.arange(first.numel(), dtype=torch.int32, device=paths.device)
                legal = torch.zeros((self.num_nodes[d] + 1, k), dtype=torch.bool, device=paths.device)
                legal[owner, code] = True
            else:
                # owners are sorted: node j's children start at the first child whose owner is >= j; every
                # node below the leaves has at least one child, so start[:-1] indexes a real child
                nodes = torch.arange(self.num_nodes[d] + 1, device=paths.device)
                start = torch.searchsorted(owner, nodes)  # (num_nodes[d] + 1,)
                code0 = code[start[:-1]]  # (num_nodes[d],)
                rank = torch.arange(first.numel(), device=paths.device) - start[owner]  # (M,) child rank
                if not bool((code - code0[owner] == rank).all()):
                    code0, fanout = None, int((start[1:] - start[:-1]).max())
                elif (k + 1) * k <= self.dense_table_limit:
                    codes = torch.arange(k, device=paths.device)
                    below = torch.arange(k + 1, device=paths.device)[:, None] > codes  # (K+1, K)
            self.children.append(table)
            self._legal.append(legal)
            self._below.append(below)
            self.child_start.append(start)
            self.first_code.append(code0)
            self._fanout.append(fanout)
            self.node_start.append(torch.cat([first, first.new_tensor([n])]))
            self.num_nodes.append(first.numel())
            parent = node

    # ------------------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> PrefixTrie:
        """Move every table to ``device`` (in place); returns self."""
        self.order = self.order.to(device)
        self.children = [None if t is None else t.to(device) for t in self.children]
        self.child_keys = [t.to(device) for t in self.child_keys]
        self.child_start = [None if t is None else t.to(device) for t in self.child_start]
        self.first_code = [None if t is None else t.to(device) for t in self.first_code]
        self._legal = [None if t is None else t.to(device) for t in self._legal]
        self._below = [None if t is None else t.to(device) for t in self._below]
        self.node_start = [t.to(device) for t in self.node_start]
        return self

    @property
    def device(self) -> torch.device:
        """Where the tables live."""
        return self.order.device

    def root(self, batch_size: int) -> Tensor:
        """(B,) int64 root node ids (all 0): the start state of decoding."""
        return torch.zeros(batch_size, dtype=torch.int64, device=self.device)

    def _check_depth(self, depth: int) -> None:
        if not 0 <= depth < self.depth:
            raise ValueError(f"depth={depth} is out of range: expected an int in [0, {self.depth - 1}]")

    def next_node(self, node_ids: Tensor, codes: Tensor, depth: int) -> Tensor:
        """Follow one code from depth-``depth`` nodes.

        Args:
            node_ids: (B,) int64 node ids at ``depth`` (-1 = already off the trie).
            codes: (B,) int64 codes for level ``depth``.
            depth: current depth, in [0, self.depth).

        Returns:
            (B,) int64 node ids at depth+1, -1 where the code is illegal or the row was off the trie.
        """
        self._check_depth(depth)
        k = self.level_sizes[depth]
        valid = (node_ids >= 0) & (codes >= 0) & (codes < k)
        child = self._lookup(node_ids.clamp_min(0), codes.clamp(0, k - 1), depth)
        return torch.where(valid, child, -1)

    def _lookup(self, nodes: Tensor, codes: Tensor, depth: int) -> Tensor:
        """Child id (or -1) of in-range ``nodes`` and ``codes`` of any equal shape, int64."""
        table = self.children[depth]
        if table is not None:
            return table[nodes, codes].long()
        start, code0 = self.child_start[depth], self.first_code[depth]
        if code0 is not None:  # consecutive child codes: the child is an offset from the first one
            lo = start[nodes]
            off = codes - code0[nodes]
            return torch.where((off >= 0) & (off < start[nodes + 1] - lo), lo + off, -1)
        keys = self.child_keys[depth]
        query = nodes * self.level_sizes[depth] + codes
        pos = torch.searchsorted(keys, query).clamp_max(keys.numel() - 1)
        return torch.where(keys[pos] == query, pos, -1)

    def _child_slots(self, node_ids: Tensor, depth: int) -> tuple[Tensor, Tensor]:
        """(B,) node ids (-1 = off the trie: no children) of a level without a dense table -> (B, F) child
        ids padded to the level's largest fan-out F with -1, and (B, F) each slot's code (K_depth on padding
        slots: one past the last code)."""
        start, keys, k = self.child_start[depth], self.child_keys[depth], self.level_sizes[depth]
        nodes = node_ids.clamp_min(0)
        lo = start[nodes]
        hi = torch.where(node_ids >= 0, start[nodes + 1], lo)
        slot = lo[:, None] + torch.arange(self._fanout[depth], device=nodes.device)  # (B, F)
        real = slot < hi[:, None]
        slot = torch.where(real, slot, -1)
        code = torch.where(real, keys[slot.clamp_min(0)] - nodes[:, None] * k, k)  # key = parent * K + code
        return slot, code

    def _children_under(self, nodes: Tensor, depth: int) -> Tensor:
        """(B,) in-range node ids -> (B, K_depth) node ids at depth+1: the child where the code has one (where
        ``_child_mask`` is True), some valid node id elsewhere (to be read only under that mask)."""
        table = self.children[depth]
        if table is not None:
            return table.index_select(0, nodes).clamp_min_(0)  # one row gather; int32, half int64's bytes
        k, start, code0 = self.level_sizes[depth], self.child_start[depth], self.first_code[depth]
        if code0 is not None:  # the child of code c is start + c - first_code
            base = start[nodes] - code0[nodes]  # (B,)
            return (base[:, None] + torch.arange(k, device=nodes.device)).clamp_(
                0, self.num_nodes[depth + 1] - 1
            )
        slot, code = self._child_slots(nodes, depth)
        out = torch.zeros((nodes.shape[0], k + 1), dtype=torch.int64, device=nodes.device)
        return out.scatter_(1, code, slot.clamp_min(0))[:, :k]  # padding slots all land in the spare column

    def _child_mask(self, node_ids: Tensor, depth: int) -> Tensor:
        """(B,) node ids (-1 = off the trie) -> (B, K_depth) bool: the code has a child.

        Built from bool row gathers and no (B, K) op with a broadcast (B, 1) operand: on the CPU such an op
        costs more than the gathers themselves.
        """
        live = node_ids >= 0
        legal = self._legal[depth]
        if legal is not None:  # off-trie rows read the all-False last row
            return legal.index_select(0, torch.where(live, node_ids, legal.shape[0] - 1))
        k, start, code0 = self.level_sizes[depth], self.child_start[depth], self.first_code[depth]
        if code0 is not None:  # legal codes are [lo, hi): empty for off-trie rows
            nodes = node_ids.clamp_min(0)
            lo = code0[nodes]  # (B,)
            hi = lo + torch.where(live, start[nodes + 1] - start[nodes], 0)  # (B,)
            below = self._below[depth]
            if below is not None:  # (c < hi) xor (c < lo) = lo <= c < hi
                return below.index_select(0, hi).bitwise_xor_(below.index_select(0, lo))
            codes = torch.arange(k, device=nodes.device)
            return (codes >= lo[:, None]) & (codes < hi[:, None])
        _, code = self._child_slots(node_ids, depth)
        out = torch.zeros((node_ids.shape[0], k + 1), dtype=torch.bool, device=node_ids.device)
        return out.scatter_(1, code, True)[:, :k].contiguous()

    def node_of_prefix(self, prefixes: Tensor) -> Tensor:
        """(B, l) int64 prefixes -> (B,) int64 node ids at depth l (-1 if no item has that prefix)."""
        if prefixes.dim() != 2 or prefixes.shape[1] > self.depth:
            raise ValueError(f"prefixes must be (B, l) with l <= {self.depth}, got {tuple(prefixes.shape)}")
        node = self.root(prefixes.shape[0])
        for d in range(prefixes.shape[1]):
            node = self.next_node(node, prefixes[:, d], d)
        return node

    def legal_mask(self, node_ids: Tensor, depth: int, eligible: Tensor | None = None) -> Tensor:
        """Mask of legal next codes.

        Args:
            node_ids: (B,) int64 node ids at ``depth`` (-1 rows get an all-False mask).
            depth: current depth, in [0, self.depth).
            eligible: optional bool item mask, (N,) shared by all rows or (B, N) per row, in the original
                item order; a code is then legal only if at least one eligible item lies below it.

        Returns:
            (B, K_depth) bool.
        """
        self._check_depth(depth)
        mask = self._child_mask(node_ids, depth)  # (B, K)
        if eligible is None:
            return mask
        child = self._children_under(node_ids.clamp_min(0), depth)  # (B, K), read only where mask is True
        return mask & self._has_eligible(child, depth + 1, eligible)

    def prefix_mask(self, prefixes: Tensor, eligible: Tensor | None = None) -> Tensor:
        """(B, l) prefixes -> (B, K_l) bool mask of legal next codes (see ``legal_mask``)."""
        return self.legal_mask(self.node_of_prefix(prefixes), prefixes.shape[1], eligible)

    def _has_eligible(self, nodes: Tensor, depth: int, eligible: Tensor) -> Tensor:
        """(B, K) depth-``depth`` node ids -> (B, K) bool: does the node's item range hold an eligible item."""
        if (
            eligible.dtype != torch.bool
            or eligible.shape[-1] != self.num_items
            or eligible.dim() not in (1, 2)
        ):
            raise ValueError(
                f"eligible must be bool (N,) or (B, N) with N={self.num_items}, got {tuple(eligible.shape)}"
            )
        if eligible.dim() == 2 and eligible.shape[0] != nodes.shape[0]:
            raise ValueError(f"eligible has {eligible.shape[0]} rows, expected B={nodes.shape[0]}")
        starts = self.node_start[depth]  # (M+1,)
        if eligible.dim() == 1:  # one row for everyone: decide per node once, then one gather
            counts = torch.zeros(self.num_items + 1, dtype=torch.int32, device=self.device)  # (N+1,)
            counts[1:] = torch.cumsum(eligible[self.order], 0, dtype=torch.int32)
            node_ok = counts[starts[1:]] > counts[starts[:-1]]  # (M,)
            return node_ok[nodes]
        lo = starts[nodes]  # (B, K) int64 sorted-item range [lo, hi) of each child
        hi = starts[nodes + 1]
        out = torch.empty(nodes.shape, dtype=torch.bool, device=self.device)
        rows = max(1, self.eligibility_block // (self.num_items + 1))
        for s in range(0, nodes.shape[0], rows):
            el = eligible[s : s + rows].index_select(1, self.order)  # (b, N) in sorted item order
            counts = torch.zeros(el.shape[0], self.num_items + 1, dtype=torch.int32, device=self.device)
            counts[:, 1:] = torch.cumsum(el, 1, dtype=torch.int32)  # counts[:, j] = eligible among first j
            out[s : s + rows] = counts.gather(1, hi[s : s + rows]) > counts.gather(1, lo[s : s + rows])
        return out

    def leaf_item(self, node_ids: Tensor) -> Tensor:
        """(B,) leaf node ids (depth ``self.depth``) -> (B,) original index of the first item there, -1 for -1.

        With unique paths (``SemanticIdTable``) a leaf holds exactly one item, so this inverts decoding.
        """
        first = self.order[self.node_start[self.depth][node_ids.clamp_min(0)]]
        return torch.where(node_ids >= 0, first, -1)
