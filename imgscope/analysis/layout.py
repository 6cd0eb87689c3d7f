"""Host-file layout: regions that tile every file exactly once.

Drivers list the structures they know (file, offset, length, kind, owner).
Intervals of the same kind that touch or overlap are merged (shared data
clusters, compressed streams packed into one sector); what two different
kinds both claim becomes `overlap`; what nobody claims becomes
`unreferenced`; what lies past the end of the file becomes `beyond_eof`.
Everything is computed on arrays with one sweep over sorted boundaries.
"""
from __future__ import annotations

import numpy as np

from ..frames import regions_frame, REGION_KINDS

_MAX = (1 << 64) - 1


def tile_regions(structures: list, sources: list, slack_unit: int | None = None):
    """structures: (file_index, offset, length, kind, owner) tuples (offset/length may be
    arrays).  With `slack_unit`, unclaimed bytes between the end of a structure and
    the next multiple of the unit (a cluster, a sector) are `slack` of that structure,
    not `unreferenced` space."""
    out_files, out_off, out_len, out_kind, out_owner = [], [], [], [], []
    for fi, src in enumerate(sources):
        items = [s for s in structures if s[0] == fi and np.any(np.asarray(s[2]) > 0)]
        name = str(src.path)
        o, l, k, w = _tile_one(items, src.size, slack_unit)
        out_files += [name] * len(o)
        out_off.append(o)
        out_len.append(l)
        out_kind += k
        out_owner += w
    return regions_frame(out_files, np.concatenate(out_off) if out_off else [],
                         np.concatenate(out_len) if out_len else [], out_kind, out_owner)


def _tile_one(items: list, file_size: int, slack_unit: int | None = None):
    kinds_ix = {k: i for i, k in enumerate(REGION_KINDS)}
    starts, ends, kinds, owners = [], [], [], []
    for _, off, length, kind, owner in items:
        if isinstance(off, np.ndarray):
            off = off.astype(np.uint64)
            starts.append(off)
            # clip at 2^64 - 1: a hostile offset must not wrap around
            ends.append(off + np.minimum(np.asarray(length, np.uint64), np.uint64(_MAX) - off))
            kinds.append(np.full(off.size, kinds_ix[kind], np.int64))
            owners.append(np.full(off.size, owner, dtype=object))
        else:
            off = min(int(off), _MAX)
            starts.append(np.array([off], np.uint64))
            ends.append(np.array([min(off + int(length), _MAX)], np.uint64))
            kinds.append(np.array([kinds_ix[kind]], np.int64))
            owners.append(np.array([owner], dtype=object))
    if starts:
        s, e = np.concatenate(starts), np.concatenate(ends)
        k, w = np.concatenate(kinds), np.concatenate(owners)
        s, e, k, w = _merge_same_kind(s, e, k, w)
    else:
        s = e = np.zeros(0, np.uint64)
        k = np.zeros(0, np.int64)
        w = np.zeros(0, object)
    size = np.uint64(file_size)
    bounds = np.unique(np.concatenate([s, e, [np.uint64(0), size]]))
    # coverage count and (for count == 1) which interval, by event sums
    n = s.size
    idx = np.arange(n, dtype=np.int64)
    pos_s = np.searchsorted(bounds, s)
    pos_e = np.searchsorted(bounds, e)
    count = np.zeros(bounds.size, np.int64)
    who = np.zeros(bounds.size, np.int64)
    np.add.at(count, pos_s, 1)
    np.add.at(count, pos_e, -1)
    np.add.at(who, pos_s, idx)
    np.add.at(who, pos_e, -idx)
    count = np.cumsum(count)[:-1]
    who = np.cumsum(who)[:-1]
    seg_s, seg_e = bounds[:-1], bounds[1:]
    overlap_ix, unref_ix, eof_ix = (kinds_ix["overlap"], kinds_ix["unreferenced"],
                                    kinds_ix["beyond_eof"])
    seg_kind = np.where(count == 0, unref_ix, np.where(count == 1, k[np.clip(who, 0, max(n - 1, 0))] if n else unref_ix, overlap_ix))
    seg_owner = np.where(count == 1, w[np.clip(who, 0, max(n - 1, 0))] if n else "", "")
    seg_owner = np.where(count > 1, "several structures", seg_owner)
    past = seg_s >= size
    # beyond the end: claimed segments become beyond_eof, unclaimed ones vanish
    seg_owner = np.where(past & (count > 0), seg_owner, seg_owner)
    seg_kind = np.where(past & (count > 0), eof_ix, seg_kind)
    keep = ~(past & (count == 0))
    seg_s, seg_e, seg_kind, seg_owner = seg_s[keep], seg_e[keep], seg_kind[keep], seg_owner[keep]
    if slack_unit and seg_s.size > 1:
        seg_s, seg_e, seg_kind, seg_owner = _split_slack(seg_s, seg_e, seg_kind, seg_owner,
                                                          slack_unit, unref_ix, kinds_ix["slack"])
    # merge neighbours with the same kind and owner
    if seg_s.size:
        same = (seg_kind[1:] == seg_kind[:-1]) & (seg_owner[1:] == seg_owner[:-1])
        first = np.flatnonzero(np.concatenate([[True], ~same]))
        last = np.append(first[1:], seg_s.size) - 1
        seg_s, seg_e = seg_s[first], seg_e[last]
        seg_kind, seg_owner = seg_kind[first], seg_owner[first]
    return (seg_s, seg_e - seg_s, [REGION_KINDS[i] for i in seg_kind.tolist()],
            [str(o) for o in seg_owner.tolist()])


def _split_slack(s, e, k, w, unit, unref, slack):
    """Cut the head of each unreferenced segment that follows a structure, up to
    the next unit boundary, into a slack segment owned by that structure."""
    u = np.uint64(unit)
    prev_claimed = np.concatenate([[False], k[:-1] != unref])
    boundary = (s + u - np.uint64(1)) // u * u
    split = (k == unref) & prev_claimed & (s % u != 0)
    if not split.any():
        return s, e, k, w
    cut = np.minimum(boundary, e)
    idx = np.flatnonzero(split)
    # slack piece [s, cut) then the rest [cut, e) stays unreferenced (if any)
    rest = idx[cut[idx] < e[idx]]
    new_s = np.concatenate([s, cut[rest]])
    new_e = np.concatenate([np.where(split, cut, e), e[rest]])
    new_k = np.concatenate([np.where(split, slack, k), np.full(rest.size, unref)])
    prev_owner = np.concatenate([[""], w[:-1]]).astype(object)
    new_w = np.concatenate([np.where(split, prev_owner, w), np.full(rest.size, "", dtype=object)])
    order = np.argsort(new_s, kind="stable")
    return new_s[order], new_e[order], new_k[order], new_w[order]


def _merge_same_kind(s, e, k, w):
    """Union intervals of one kind that overlap or touch (owner of the first kept)."""
    order = np.lexsort((s, k))
    s, e, k, w = s[order], e[order], k[order], w[order]
    if s.size < 2:
        return s, e, k, w
    run_end = e.copy()
    # cumulative max of ends within each kind group
    group = np.concatenate([[0], np.cumsum(k[1:] != k[:-1])])
    for g in np.unique(group):
        sel = group == g
        run_end[sel] = np.maximum.accumulate(e[sel])
    touching_other = (s[1:] == run_end[:-1]) & (w[1:] != w[:-1])
    new = np.concatenate([[True], (k[1:] != k[:-1]) | (s[1:] > run_end[:-1]) | touching_other])
    first = np.flatnonzero(new)
    last = np.append(first[1:], s.size) - 1
    same_owner = w[first]
    return s[first], run_end[last], k[first], same_owner
