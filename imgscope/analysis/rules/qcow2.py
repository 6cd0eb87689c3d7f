"""qcow2 rules: `qemu-img check`'s consistency checks, counted exactly as QEMU counts.

QEMU 7.2 (block/qcow2-refcount.c, qcow2_check_refcounts) rebuilds every
refcount from the references: the header, every L1 table (active and each
snapshot's) with every L2 table and data or compressed cluster it reaches,
the snapshot table, the refcount table and blocks, the LUKS header area and
the bitmap directory, tables and data.  It then compares the rebuilt counts
with the stored ones cluster by cluster (stored < computed: a corruption,
stored > computed: a leak), and last checks the COPIED flags of the active
tables against the stored refcounts.  This module follows that order and
counts (`corruptions`, `leaks`, `check-errors`, `image-end-offset`, the
allocated / fragmented / compressed clusters of the active L1 only), so its
summary equals `qemu-img check --output=json`.

All of it is vectorised: references are (offset, length) arrays expanded to
cluster indices and counted with np.bincount; an L2 table is read once however
many L1 entries point at it, its findings and references weighted by that
number.  Reads follow QEMU's: bytes past the end of the file read as zeros.
Findings of the driver for the same problem keep their code (and are not
listed twice); the driver's findings themselves are not counted
(`counts_parse_findings = False`): this module counts the QEMU way.
"""
from __future__ import annotations

import construct as cs
import numpy as np

from ...errors import ImageError
from ...formats.base import FINDINGS_PER_CALL
from ...formats.qcow2.clusters import parse_l2_tables, read_l2_tables, read_table
from ...formats.qcow2.refcounts import refcounts
from ...schemas import qcow2 as S

counts_parse_findings = False   # the rules below count every problem once, as QEMU does
counts_generic = False          # overlaps show up as refcount errors; listed, not counted again
shares_host_data = True         # snapshots legally share clusters (refcount > 1)
uses_layout = False              # refcounts rebuilt from every reference cover the layout rules

U64 = np.uint64
INT_MAX = (1 << 31) - 1
MAX_SNAPSHOT_TABLE = 64 << 20           # QCOW_MAX_SNAPSHOTS_SIZE
MAX_SNAPSHOT_L1_ENTRIES = S.MAX_L1_BYTES // 8
CHUNK_ENTRIES = 1 << 21                 # L2 entries examined per numpy pass
# bitmap directory entry constraints of QEMU (qcow2-bitmap.c)
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_GRANULARITY_BITS = (9, 31)
BME_MAX_NAME_SIZE = 1023
BME_RESERVED_FLAGS = 0xFFFFFFFC
BME_DIRECTORY_MAX = 1024 * 65535
# QEMU refuses I/O requests ending beyond this offset (BDRV_MAX_LENGTH): they fail
_REQUEST_MAX = ((1 << 31) - 1) >> 9 << 9
BDRV_MAX_LENGTH = ((1 << 63) - 1) // _REQUEST_MAX * _REQUEST_MAX
# the fixed part of a snapshot table entry: the schema's first fields
SNAPSHOT_HEAD = cs.Struct(*S.snapshot_entry.subcons[:9])
SNAPSHOT_HEAD_SIZE = 40


class CheckAborted(Exception):
    """QEMU gives up here (its check function returns an error): nothing more is counted."""


def check(ctx) -> None:
    """Every qcow2 consistency rule of `qemu-img check`, counted the QEMU way."""
    try:
        Qcow2Check(ctx).run()
    except CheckAborted:
        pass
    except ImageError as exc:
        ctx.check_error("check_incomplete", f"the check could not complete: {exc.message}",
                        structure=exc.structure or "", host_offset=exc.offset)


class Qcow2Check:
    """One run of the checks over one image (state shared by the passes)."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.image = img = ctx.image
        self.v = img.header.values
        self.geo = img.geometry
        self.cb = self.v["cluster_bits"]
        self.cs = 1 << self.cb
        self.src = img.source
        self.size = self.src.size
        # QEMU measures the file in 512-byte sectors (bdrv_getlength rounds up)
        self.file_len = -(-self.size // 512) * 512
        self.nb_file = -(-self.file_len // self.cs)
        self.order = self.v["refcount_order"]
        # the largest refcount an entry holds (kept within int64 for 64-bit refcounts)
        self.refcount_max = min((1 << (1 << min(self.order, 6))) - 1, (1 << 62) - 1)
        self.noted = {(f.code, f.host_offset) for f in img._findings if f.host_offset is not None}
        self.raw = None                 # references per cluster (before QEMU's overflow cap)
        self.copied = []                # COPIED mismatches, reported after the comparison
        self.stored = None

    # ---- reporting --------------------------------------------------------------------
    def problem(self, kind: str, code: str, message: str, count: int = 1, **where) -> None:
        """Count `count` problems of one kind; list the finding unless the driver already
        listed the same code at the same place."""
        if count <= 0:
            return
        key = (code, where.get("host_offset"))
        if key[1] is not None and key in self.noted:
            c = self.ctx.counts
            if kind == "corruption":
                c.corruptions += count
            elif kind == "leak":
                c.leaks += count
            else:
                c.check_errors += count
            self.ctx.counted_codes.add(code)
            return
        if key[1] is not None:
            self.noted.add(key)
        if kind == "check_error":
            self.ctx.check_error(code, message, **where)
            self.ctx.counts.check_errors += count - 1
        else:
            getattr(self.ctx, kind)(code, message, count=count, **where)

    def problems(self, kind: str, code: str, weights: np.ndarray, describe, what: str,
                 structure: str = "") -> None:
        """Many problems of one code: the first few listed one by one, then one summary.

        `weights[k]` is how often QEMU counts problem k (an L2 table read through
        several L1 entries is checked once per entry); `describe(k)` -> (message, where)."""
        weights = np.asarray(weights, np.int64)
        if not weights.size:
            return
        shown = min(weights.size, FINDINGS_PER_CALL)
        for k in range(shown):
            message, where = describe(k)
            self.problem(kind, code, message, int(weights[k]), **where)
        rest = int(weights[shown:].sum())
        if rest:
            self.problem(kind, code, f"{weights.size - shown} more {what} ({code})", rest,
                         structure=structure)

    def abort(self, code: str, message: str, **where) -> None:
        """QEMU's check stops here with an error: a check error, and nothing more."""
        self.problem("check_error", code, message, **where)
        raise CheckAborted

    # ---- reading as QEMU reads ---------------------------------------------------------
    def read_padded(self, offset: int, nbytes: int, structure: str) -> bytes:
        """`nbytes` at `offset`; what lies past the end of the file reads as zeros."""
        if nbytes > self.image.limits.max_table_bytes:
            self.abort("check_too_large", f"{structure} of {nbytes} bytes exceeds the limit of "
                       f"{self.image.limits.max_table_bytes} bytes", structure=structure,
                       host_offset=offset)
        data = self.src.read_upto(offset, nbytes) if offset < self.size else b""
        return data + bytes(nbytes - len(data))

    def read_u64(self, offset: int, count: int, structure: str) -> np.ndarray:
        """A u64 table (native order) read as QEMU reads it."""
        if offset % self.cs == 0 and offset + 8 * count <= self.size:
            t = read_table(self.image, offset, count, structure, self.cs)
            if t is not None:
                return t
        return S.u64_table(count).parse(self.read_padded(offset, 8 * count, structure)).astype(U64)

    # ---- references -------------------------------------------------------------------
    def add_clusters(self, idx: np.ndarray, weight) -> None:
        """Add `weight` (a number, or one per index) references to clusters `idx` (int64)."""
        if not idx.size:
            return
        lo, hi = int(idx.min()), int(idx.max())
        if hi - lo + 1 == idx.size and idx[0] == lo and bool((idx[1:] > idx[:-1]).all()):
            self.raw[lo:hi + 1] += weight       # one run of consecutive clusters (the usual)
            return
        if idx.size * 8 < hi - lo:       # few and scattered
            np.add.at(self.raw, idx, weight)
            return
        w = weight if np.ndim(weight) else None
        counts = np.bincount(idx - lo, weights=w, minlength=hi - lo + 1)
        if w is not None:
            counts = np.rint(counts).astype(np.int64)
        elif weight != 1:
            counts *= int(weight)
        self.raw[lo:hi + 1] += counts

    def beyond_eof(self, code, weight, bad, start, end, what, where) -> None:
        """Report references reaching a whole cluster or more past the end of the file."""
        w = np.broadcast_to(np.asarray(weight, np.int64), start.shape)[bad]
        self.problems("corruption", code, w, lambda k: (
            f"{what(int(bad[k]))}: {int(start[bad[k]]):#x} (+{int(end[bad[k]] - start[bad[k]])}) "
            f"reaches {int(end[bad[k]]) - self.file_len} bytes past the end of the file "
            f"({self.file_len} bytes): what it holds is lost; the reference is not counted",
            where(int(bad[k]))), "references past the end of the file")

    def reference_clusters(self, start: np.ndarray, weight, code: str, what, where):
        """References one cluster long (L2 tables, data clusters): the fast case of
        `reference`; an unaligned one touches two clusters, as in QEMU.  Returns the
        first cluster of every range (int64) when none lies past the end, else None."""
        start = np.asarray(start, U64)
        if not start.size:
            return None
        whole = True
        if int(start.max()) >= self.file_len:
            whole = False
            beyond = start >= U64(self.file_len)
            bad = np.flatnonzero(beyond)
            self.beyond_eof(code, weight, bad, start, start + U64(self.cs), what, where)
            ok = np.flatnonzero(~beyond)
            start = start[ok]
            if np.ndim(weight):
                weight = weight[ok]
        first = (start >> U64(self.cb)).view(np.int64)
        self.add_clusters(first, weight)
        if int(np.bitwise_or.reduce(start)) & (self.cs - 1):
            split = np.flatnonzero(start & U64(self.cs - 1))
            self.add_clusters(first[split] + 1, weight[split] if np.ndim(weight) else weight)
        return first if whole else None

    def reference(self, start, length, weight, code: str, what, where) -> None:
        """QEMU's qcow2_inc_refcounts_imrt for arrays of ranges.

        A range reaching a whole cluster or more past the end of the file is a
        corruption and is not counted (the last cluster may be partly there);
        `what(k)` names range k, `where(k)` its finding's place."""
        start = np.atleast_1d(np.asarray(start, U64))
        length = np.broadcast_to(np.asarray(length, U64), start.shape)
        weight = np.broadcast_to(np.asarray(weight, np.int64), start.shape)
        negative = np.flatnonzero((start >= U64(1 << 63)) & (length > 0))
        if negative.size:       # QEMU's signed offset: its refcount array cannot grow there
            k = int(negative[0])
            self.abort("check_incomplete", f"{what(k)} at {int(start[k]):#x} lies beyond any "
                       "possible file: QEMU's check fails here", **where(k))
        live = length > 0
        if not live.all():
            keep = np.flatnonzero(live)
            start, length, weight = start[keep], length[keep], weight[keep]
            what_, where_ = what, where
            what, where = (lambda k: what_(int(keep[k]))), (lambda k: where_(int(keep[k])))
        if not start.size:
            return
        far = start >= U64(1 << 62)                     # no file is that long: no wrap-around
        end = np.where(far, U64(1 << 62), start) + length
        beyond = far | (end >= U64(self.file_len + self.cs))
        if beyond.any():
            self.beyond_eof(code, weight, np.flatnonzero(beyond), start, end, what, where)
            ok = np.flatnonzero(~beyond)
            start, end, weight = start[ok], end[ok], weight[ok]
        first = (start >> U64(self.cb)).view(np.int64)
        n = ((end - U64(1)) >> U64(self.cb)).view(np.int64) - first + 1
        if (n == 1).all():
            self.add_clusters(first, weight)
            return
        step = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        self.add_clusters(np.repeat(first, n) + step, np.repeat(weight, n))

    def reference_one(self, start: int, length: int, code: str, what: str, **where) -> None:
        if length > 0:
            self.reference([start], [length], 1, code, lambda k: what, lambda k: where)

    # ---- the passes, in QEMU's order ---------------------------------------------------
    def run(self) -> None:
        ctx, v = self.ctx, self.v
        self.header_notices()
        if self.order > 6:
            self.abort("refcount_order_invalid", f"refcount_order {self.order} is larger than 6: "
                       "refcounts cannot be read (QEMU refuses to open the image)",
                       structure="header.refcount_order", host_offset=96)
        if self.nb_file > INT_MAX:
            self.abort("check_too_large", f"the file has {self.nb_file} clusters; QEMU checks "
                       f"at most {INT_MAX}", structure="file")
        if self.nb_file * 32 > self.image.limits.max_metadata_bytes:
            self.abort("check_too_large", f"counting {self.nb_file} clusters exceeds the "
                       "metadata limit (raise Limits.max_metadata_bytes)", structure="file")
        self.open_time_checks()
        snapshots = self.snapshot_table()
        ctx.counts.total_clusters = -(-(v["size"] // 512 * 512) // self.cs)
        self.raw = np.zeros(self.nb_file + 1, np.int64)
        reftable = self.reftable()
        self.stored = StoredRefcounts(self, reftable)
        self.stored.load(self.nb_file + 1)
        self.reference_one(0, self.cs, "table_beyond_eof", "header", structure="header",
                           host_offset=0)
        passes = [self.l1_pass(v["l1_table_offset"], v["l1_size"], "L1 table", active=True)]
        if self.geo.data_file and snapshots:
            self.problem("corruption", "snapshots_with_data_file",
                         f"{len(snapshots)} internal snapshots in an image with an external data "
                         "file (QEMU allows none)", structure="header.nb_snapshots",
                         host_offset=60)
        for snap in snapshots:
            passes.append(self.snapshot_l1(snap))
        self.l2_pass([p for p in passes if p is not None])
        if snapshots:
            end = snapshots[-1]["end"]
            self.reference_one(v["snapshots_offset"], end - v["snapshots_offset"],
                               "table_beyond_eof", "snapshot table", structure="snapshot table",
                               host_offset=v["snapshots_offset"])
        self.reference_one(v["refcount_table_offset"], reftable.size * 8, "table_beyond_eof",
                           "refcount table", structure="refcount table",
                           host_offset=v["refcount_table_offset"])
        crypto = self.image.header.crypto_ext
        if crypto and v["crypt_method"] == 2:
            self.reference_one(crypto["offset"], crypto["length"], "table_beyond_eof",
                               "LUKS header area", structure="LUKS header",
                               host_offset=crypto["offset"])
        self.bitmaps()
        self.refblocks(reftable)
        self.compare()
        for kind, code, weights, describe, what, structure in self.copied:
            self.problems(kind, code, weights, describe, what, structure)

    def open_time_checks(self) -> None:
        """What makes QEMU refuse to open the image at all (qemu-img check then exits 1):
        a check error here too, with the driver's code where it has one."""
        v, cs = self.v, self.cs
        int64_max = (1 << 63) - 1
        l1_bytes = v["l1_size"] * 8
        if l1_bytes > S.MAX_L1_BYTES:
            self.abort("l1_table_too_large", f"active L1 table of {l1_bytes} bytes exceeds "
                       "QEMU's 32 MiB limit", structure="header.l1_size", host_offset=36)
        if v["l1_size"] < self.geo.l1_needed:
            self.abort("l1_table_too_small", f"L1 table has {v['l1_size']} entries, "
                       f"{self.geo.l1_needed} needed for the virtual size",
                       structure="header.l1_size", host_offset=36)
        if v["l1_table_offset"] % cs or v["l1_table_offset"] > int64_max - l1_bytes:
            self.abort("l1_table_invalid", f"active L1 table offset {v['l1_table_offset']:#x} "
                       "is not cluster aligned or out of range",
                       structure="header.l1_table_offset", host_offset=40)
        rt_bytes = v["refcount_table_clusters"] * cs
        if rt_bytes > S.MAX_REFTABLE_BYTES:
            self.abort("refcount_table_too_large", f"refcount table of {rt_bytes} bytes exceeds "
                       "QEMU's 8 MiB limit", structure="header.refcount_table_clusters",
                       host_offset=56)
        if v["refcount_table_offset"] % cs or v["refcount_table_offset"] > int64_max - rt_bytes:
            self.abort("refcount_table_invalid", "refcount table offset "
                       f"{v['refcount_table_offset']:#x} is not cluster aligned or out of range",
                       structure="header.refcount_table_offset", host_offset=48)

    def header_notices(self) -> None:
        incompat = self.v["incompatible_features"]
        if incompat & S.INCOMPAT_CORRUPT:
            self.ctx.notice("warning", "corrupt_bit_set",
                            "the corrupt bit is set: QEMU met an inconsistency while writing and "
                            "refuses to open the image for writing until `qemu-img check -r all` "
                            "repairs it and clears the bit; reading and this check still work",
                            structure="header.incompatible_features", host_offset=72)
        if incompat & S.INCOMPAT_DIRTY:
            lazy = self.v["compatible_features"] & S.COMPAT_LAZY
            self.ctx.notice("warning", "dirty_bit_set",
                            "the dirty bit is set: " + (
                                "with lazy refcounts the stored refcounts may legitimately be "
                                "stale (the image was not closed cleanly); QEMU rebuilds them on "
                                "the next read-write open, so refcount errors below are expected"
                                if lazy else "refcounts may be stale although lazy refcounts are "
                                "off; QEMU repairs them on the next read-write open"),
                            structure="header.incompatible_features", host_offset=72)

    # ---- snapshot table (qcow2_check_read_snapshot_table) --------------------------------
    def snapshot_table(self) -> list[dict]:
        v = self.v
        n, off = v["nb_snapshots"], v["snapshots_offset"]
        if n > S.MAX_SNAPSHOTS:
            self.abort("too_many_snapshots", f"{n} snapshots exceed QEMU's limit of "
                       f"{S.MAX_SNAPSHOTS}: the snapshot table cannot be checked",
                       structure="header.nb_snapshots", host_offset=60)
        if off % self.cs or off + 40 * n > (1 << 63) - 1:
            self.abort("snapshot_table_invalid", f"snapshot table offset {off:#x} is not cluster "
                       "aligned: the snapshot table cannot be read",
                       structure="header.snapshots_offset", host_offset=64)
        if n > self.image.limits.max_snapshots:
            self.abort("snapshot_limit", f"{n} snapshots exceed Limits.max_snapshots "
                       f"({self.image.limits.max_snapshots}): not checked",
                       structure="header.nb_snapshots", host_offset=60)
        reader = _PaddedReader(self, off)
        out, pos = [], off
        for i in range(n):
            pos = -(-pos // 8) * 8
            head = SNAPSHOT_HEAD.parse(reader.get(pos, SNAPSHOT_HEAD_SIZE))
            extra = head.extra_data_size
            if extra > S.MAX_SNAPSHOT_EXTRA:
                self.abort("snapshot_extra_too_large", f"snapshot table entry {i} has {extra} "
                           f"bytes of extra data (QEMU reads at most {S.MAX_SNAPSHOT_EXTRA}): the "
                           "snapshot table cannot be read", structure=f"snapshot[{i}]", index=i,
                           host_offset=pos + 36)
            body = pos + SNAPSHOT_HEAD_SIZE + extra
            names = reader.get(body, head.id_str_size + head.name_size)
            end = body + head.id_str_size + head.name_size
            if end - off > MAX_SNAPSHOT_TABLE:
                self.abort("snapshot_table_too_large", f"the snapshot table is larger than "
                           f"{MAX_SNAPSHOT_TABLE} bytes at entry {i}", structure="snapshot table",
                           host_offset=off)
            out.append({"index": i, "offset": pos, "end": end, "extra_data_size": extra,
                        "l1_table_offset": head.l1_table_offset, "l1_size": head.l1_size,
                        "id_str": names[:head.id_str_size].decode("utf-8", "replace"),
                        "name": names[head.id_str_size:].decode("utf-8", "replace")})
            pos = end
        if v["version"] >= 3:
            for s in out:
                if s["extra_data_size"] < 16:
                    self.problem("corruption", "snapshot_entry_incomplete",
                                 f"snapshot table entry {s['index']} ({s['name']!r}) has "
                                 f"{s['extra_data_size']} bytes of extra data; version 3 needs at "
                                 "least 16 (VM state size and disk size)",
                                 structure=f"snapshot[{s['index']}]", index=s["index"],
                                 host_offset=s["offset"])
        return out

    # ---- L1 / L2 (check_refcounts_l1 / _l2, check_oflag_copied) --------------------------
    def l1_pass(self, offset: int, size: int, structure: str, active: bool):
        """Count one L1 table and check its entries; returns what the L2 pass needs."""
        if size == 0:
            return None
        if size * 8 > self.image.limits.max_table_bytes:
            self.abort("check_too_large", f"{structure} of {size} entries exceeds the table "
                       "limit", structure=structure, host_offset=offset)
        self.reference_one(offset, size * 8, "table_beyond_eof", structure,
                           structure=structure, host_offset=offset)
        if offset + size * 8 > BDRV_MAX_LENGTH:
            self.abort("check_incomplete", f"{structure} at {offset:#x} cannot be read (the "
                       "offset is out of range): QEMU's check fails here", structure=structure,
                       host_offset=offset)
        l1 = self.read_u64(offset, size, structure)
        used = np.flatnonzero(l1)
        entries = l1[used]
        entry_at = lambda k: offset + 8 * int(used[k])
        reserved = np.flatnonzero(entries & U64(S.L1E_RESERVED_MASK))
        self.problems("corruption", "l1_reserved_bits", np.ones(reserved.size), lambda k: (
            f"{structure} entry {int(used[reserved[k]])} has reserved bits set: "
            f"{int(entries[reserved[k]]):#x}",
            dict(structure=structure, index=int(used[reserved[k]]),
                 host_offset=entry_at(reserved[k]))), "L1 entries with reserved bits", structure)
        l2 = entries & U64(S.L1E_OFFSET_MASK)
        self.reference_clusters(l2, 1, "l2_table_beyond_eof",
                       lambda k: f"L2 table of {structure} entry {int(used[k])}",
                       lambda k: dict(structure=structure, index=int(used[k]),
                                      host_offset=entry_at(k)))
        misaligned = np.flatnonzero(l2 % U64(self.cs))
        self.problems("corruption", "l2_table_misaligned", np.ones(misaligned.size), lambda k: (
            f"{structure} entry {int(used[misaligned[k]])} points at L2 table "
            f"{int(l2[misaligned[k]]):#x}, not cluster aligned (its entries are read from there)",
            dict(structure=structure, index=int(used[misaligned[k]]),
                 host_offset=entry_at(misaligned[k]))), "misaligned L2 tables", structure)
        oflag = None
        if active:
            oflag = self.l1_copied(l1, offset, structure)
        return {"l2": l2, "active": active, "oflag": oflag}

    def l1_copied(self, l1: np.ndarray, offset: int, structure: str) -> np.ndarray:
        """COPIED of the active L1 entries against the stored refcount of their L2 table;
        returns the L2 offsets whose entries QEMU goes on to check (one per L1 entry)."""
        idx = np.flatnonzero(l1 & U64(S.L1E_OFFSET_MASK))
        l2 = l1[idx] & U64(S.L1E_OFFSET_MASK)
        rc, err = self.stored.at(l2 >> U64(self.cb))
        if err is not None:
            keep = ~err
            idx, l2, rc = idx[keep], l2[keep], rc[keep]
        copied = (l1[idx] >> U64(63)) == 1
        bad = np.flatnonzero((rc == 1) != copied)
        if bad.size:
            self.copied.append(("corruption", "copied_flag_mismatch", np.ones(bad.size),
                                lambda k: (f"{structure} entry {int(idx[bad[k]])} "
                                           f"({int(l1[idx[bad[k]]]):#x}): COPIED is "
                                           f"{'set' if copied[bad[k]] else 'clear'} but the L2 "
                                           f"table's refcount is {int(rc[bad[k]])}"
                                           + _copied_risk(bool(copied[bad[k]]), int(rc[bad[k]])),
                                           dict(structure=structure, index=int(idx[bad[k]]),
                                                host_offset=offset + 8 * int(idx[bad[k]]))),
                                "L1 entries with a wrong COPIED flag", structure))
        return l2

    def snapshot_l1(self, snap: dict):
        structure = f"snapshot {snap['name']!r} L1 table"
        off, size = snap["l1_table_offset"], snap["l1_size"]
        if off % self.cs:
            self.problem("corruption", "table_misaligned",
                         f"snapshot {snap['id_str']} ({snap['name']!r}): L1 table at {off:#x} is "
                         "not cluster aligned; the snapshot table entry is corrupt and what the "
                         "snapshot references is not counted", structure=structure,
                         host_offset=off, size=size * 8)
            return None
        if size > MAX_SNAPSHOT_L1_ENTRIES:
            self.problem("corruption", "snapshot_l1_too_large",
                         f"snapshot {snap['id_str']} ({snap['name']!r}): L1 table of {size} "
                         f"entries exceeds QEMU's limit of {MAX_SNAPSHOT_L1_ENTRIES}; the snapshot "
                         "table entry is corrupt", structure=f"snapshot[{snap['index']}]",
                         index=snap["index"], host_offset=snap["offset"] + 8)
            return None
        return self.l1_pass(off, size, structure, active=False)

    def l2_pass(self, passes: list) -> None:
        """Every L2 table reached by any L1 entry, read once and weighted by the number of
        L1 entries (active: also for the allocation counters and COPIED) that reach it."""
        if not passes:
            return
        offsets = np.concatenate([p["l2"] for p in passes])
        active = np.concatenate([np.full(p["l2"].size, p["active"]) for p in passes])
        tables, inverse = np.unique(offsets, return_inverse=True)
        w_total = np.bincount(inverse, minlength=tables.size)
        w_active = np.bincount(inverse, weights=active, minlength=tables.size).astype(np.int64)
        oflag = [p["oflag"] for p in passes if p["oflag"] is not None]
        w_copied = np.zeros(tables.size, np.int64)
        if oflag and oflag[0].size:
            w_copied = np.bincount(np.searchsorted(tables, oflag[0]),
                                   minlength=tables.size).astype(np.int64)
        # tables wholly past the end of the file read as zeros: nothing in them
        inside = np.flatnonzero(tables < U64(self.size))
        if inside.size * self.cs > self.image.limits.max_metadata_bytes:
            self.abort("check_too_large", f"{inside.size} L2 tables exceed the metadata limit",
                       structure="L2 table")
        per_chunk = max(1, CHUNK_ENTRIES // self.geo.l2_entries)
        for c in range(0, inside.size, per_chunk):
            rows = inside[c:c + per_chunk]
            self.ctx.step("L2 tables", c, inside.size)
            entries = self.read_l2(tables[rows])
            self.l2_chunk(tables[rows], entries, w_total[rows], w_active[rows], w_copied[rows])
        self.ctx.step("L2 tables", inside.size, inside.size)

    def read_l2(self, offsets: np.ndarray) -> np.ndarray:
        """L2 tables at `offsets` (sorted, unique); misaligned or cut ones as QEMU reads them."""
        regular = ((offsets != 0) & (offsets % U64(self.cs) == 0)
                   & (offsets + U64(self.cs) <= U64(self.size)))
        parse = parse_l2_tables(self.geo)
        if regular.all():
            return read_l2_tables(self.image, self.geo, offsets)[1]
        parts = []
        if regular.any():
            parts.append((np.flatnonzero(regular),
                          read_l2_tables(self.image, self.geo, offsets[regular])[1]))
        odd = np.flatnonzero(~regular)
        for k in odd.tolist():
            data = self.read_padded(int(offsets[k]), self.cs, "L2 table")
            parts.append((np.array([k]), parse(data, 1)))
        first = parts[0][1]
        out = np.empty((offsets.size, self.geo.l2_entries), first.dtype)
        for where, t in parts:
            out[where] = t
        return out

    def l2_chunk(self, offsets, tables, w_total, w_active, w_copied) -> None:
        """check_refcounts_l2 (and the L2 half of check_oflag_copied) for a chunk of tables.

        Most entries are plain (no compressed, zero or reserved bit) and are only split
        into allocated and unallocated; the few others are classified on their own.
        When every entry of the chunk is allocated and plain (preallocated or full
        images) no position array is built at all."""
        geo, cs = self.geo, U64(self.cs)
        n, l2e = tables.shape
        esize = 16 if geo.extended_l2 else 8
        if geo.extended_l2:
            e = np.ascontiguousarray(tables["entry"]).reshape(-1)
            bm = np.ascontiguousarray(tables["bitmap"]).reshape(-1)
        else:
            e, bm = tables.reshape(-1), None
        chunk = _Chunk(offsets, l2e, esize)
        special_mask = S.OFLAG_COMPRESSED | S.L2E_STD_RESERVED_MASK
        if not geo.extended_l2:
            special_mask |= S.OFLAG_ZERO
        sp = np.flatnonzero(e & U64(special_mask))
        off = e & U64(S.L2E_OFFSET_MASK)
        hosted = off != 0
        if geo.data_file:
            hosted |= e >= U64(S.OFLAG_COPIED)
        full = not sp.size and bool(hosted.all())
        if full:
            apos = None                                 # every entry: positions are indices
            aoff = off
        else:
            plain = hosted.copy()
            plain[sp] = False
            apos = np.flatnonzero(plain)                # NORMAL entries without odd bits
        if sp.size:
            es = e[sp]
            comp = (es & U64(S.OFLAG_COMPRESSED)) != 0
            reserved = np.flatnonzero(~comp & ((es & U64(S.L2E_STD_RESERVED_MASK)) != 0))
            self.problems("corruption", "l2_reserved_bits", chunk.wa(sp[reserved], w_total),
                          lambda k: (f"L2 entry at {chunk.at(sp[reserved[k]]):#x} has reserved "
                                     f"bits set: {int(e[sp[reserved[k]]]):#x}",
                                     chunk.where(sp[reserved[k]])),
                          "L2 entries with reserved bits", "L2 table")
            if comp.any():
                self.compressed(sp[comp], e, bm, chunk, w_total, w_active)
            # NORMAL with reserved bits, ZERO_ALLOC (the zero flag keeps the allocation)
            odd_alloc = sp[~comp & hosted[sp]]
            if odd_alloc.size:
                apos = np.sort(np.concatenate([apos, odd_alloc]))
        if not full:
            aoff = off[apos]
        pos = (lambda k: k) if full else (lambda k: apos[k])
        if not aoff.size:
            if bm is not None:
                self.subcluster_bitmaps(apos, hosted, bm, e, chunk, w_total)
            return
        if bm is not None:
            self.subcluster_bitmaps(np.arange(e.size) if full else apos, hosted, bm, e, chunk,
                                    w_total)
        if int(np.bitwise_or.reduce(aoff)) & (self.cs - 1):
            mis = np.flatnonzero(aoff & (cs - U64(1)))

            def describe(k):
                p = pos(mis[k])
                holds = (bm[p] & U64(0xFFFFFFFF)) != 0 if bm is not None else not e[p] & U64(1)
                kind = "data cluster" if holds else "preallocated zero cluster"
                return (f"L2 entry at {chunk.at(p):#x} points at {int(off[p]):#x}: {kind} not "
                        "cluster aligned", chunk.where(p))
            self.problems("corruption", "data_cluster_misaligned", chunk.wa(pos(mis), w_total),
                          describe, "misaligned data clusters", "L2 table")
        # allocation counters of the active L1: allocated, and fragmented (a cluster
        # that does not follow the previous one of the same table)
        if w_active.any():
            if full:
                per_row = np.full(n, l2e, np.int64)
                o2 = aoff.reshape(n, l2e)
                jumps = np.count_nonzero(o2[:, 1:] != o2[:, :-1] + cs, axis=1)
            else:
                rows = apos // l2e
                per_row = np.bincount(rows, minlength=n)
                jump = (rows[1:] == rows[:-1]) & (aoff[1:] != aoff[:-1] + cs)
                jumps = np.bincount(rows[1:][jump], minlength=n)
            counts = self.ctx.counts
            counts.allocated_clusters += int((per_row * w_active).sum())
            counts.fragmented_clusters += int((jumps * w_active).sum())
        first = None
        if not geo.data_file:
            first = self.reference_clusters(
                aoff, chunk.w(apos, w_total), "cluster_beyond_eof",
                lambda k: f"data cluster of the L2 entry at {chunk.at(pos(k)):#x}",
                lambda k: dict(structure="L2 table", host_offset=int(aoff[k])))
        if w_copied.any():
            self.l2_copied(apos, aoff, first, e, chunk, chunk.w(apos, w_copied))

    def subcluster_bitmaps(self, apos, hosted, bm, e, chunk, w_total) -> None:
        """Extended L2: allocated clusters whose subclusters are both allocated and zero,
        unallocated clusters with allocation bits."""
        b = bm[apos]
        overlap = np.flatnonzero(((b >> U64(32)) & b) != 0)
        self.problems("corruption", "subcluster_bitmap_invalid",
                      chunk.wa(apos[overlap], w_total), lambda k: (
                          f"L2 entry at {chunk.at(apos[overlap[k]]):#x}: allocated cluster with "
                          "subclusters both allocated and zero in its bitmap "
                          f"{int(bm[apos[overlap[k]]]):#018x}", chunk.where(apos[overlap[k]])),
                      "allocated clusters with a corrupt subcluster bitmap", "L2 table")
        comp = (e & U64(S.OFLAG_COMPRESSED)) != 0
        upos = np.flatnonzero(~comp & ~hosted & ((bm & U64(0xFFFFFFFF)) != 0))
        self.problems("corruption", "subcluster_bitmap_invalid", chunk.wa(upos, w_total),
                      lambda k: (f"L2 entry at {chunk.at(upos[k]):#x}: unallocated cluster with "
                                 f"subcluster allocation bits {int(bm[upos[k]]):#018x}",
                                 chunk.where(upos[k])),
                      "unallocated clusters with allocation bits", "L2 table")

    def compressed(self, cpos, e, bm, chunk, w_total, w_active) -> None:
        geo = self.geo
        x = U64(geo.csize_shift)
        coff = e[cpos] & U64((1 << int(x)) - 1)
        bad = np.flatnonzero(e[cpos] >= U64(S.OFLAG_COPIED))
        self.problems("corruption", "compressed_copied", chunk.wa(cpos[bad], w_total), lambda k: (
            f"compressed L2 entry at {chunk.at(cpos[bad[k]]):#x} (data at {int(coff[bad[k]]):#x}) "
            "has the COPIED flag, which must never be set for compressed clusters",
            chunk.where(cpos[bad[k]])), "compressed entries with COPIED", "L2 table")
        if geo.data_file:
            self.problems("corruption", "compressed_with_data_file", chunk.wa(cpos, w_total),
                          lambda k: (f"compressed L2 entry at {chunk.at(cpos[k]):#x} in an image "
                                     "with an external data file (which cannot hold compressed "
                                     "data)", chunk.where(cpos[k])),
                          "compressed entries with a data file", "L2 table")
            return
        if bm is not None:
            flagged = np.flatnonzero(bm[cpos] != 0)
            self.problems("corruption", "compressed_subcluster_bitmap",
                          chunk.wa(cpos[flagged], w_total), lambda k: (
                              f"compressed L2 entry at {chunk.at(cpos[flagged[k]]):#x} has a "
                              f"non-zero subcluster bitmap {int(bm[cpos[flagged[k]]]):#018x}",
                              chunk.where(cpos[flagged[k]])),
                          "compressed entries with a subcluster bitmap", "L2 table")
            keep = np.flatnonzero(bm[cpos] == 0)
            cpos, coff = cpos[keep], coff[keep]
        if not cpos.size:
            return
        nsec = ((e[cpos] >> x) & U64((1 << (geo.cluster_bits - 8)) - 1)) + U64(1)
        csize = nsec * U64(512) - (coff & U64(511))
        self.reference(coff, csize, chunk.w(cpos, w_total), "cluster_beyond_eof",
                       lambda k: f"compressed data of the L2 entry at {chunk.at(cpos[k]):#x}",
                       lambda k: dict(structure="L2 table", host_offset=int(coff[k])))
        active = int(chunk.wa(cpos, w_active).sum())
        c = self.ctx.counts
        c.allocated_clusters += active
        c.compressed_clusters += active
        c.fragmented_clusters += active     # QEMU: compressed clusters are fragmented by nature

    def l2_copied(self, apos, aoff, first, e, chunk, weights) -> None:
        """COPIED of active data clusters against their stored refcount (held until after
        the refcount comparison, where QEMU checks it).  `apos` None: every entry."""
        ea = e if apos is None else e[apos]
        if np.ndim(weights):
            live = np.flatnonzero(weights > 0)
            apos = live if apos is None else apos[live]
            aoff, ea, weights = aoff[live], ea[live], weights[live]
            first = None if first is None else first[live]
        copied = ea >= U64(S.OFLAG_COPIED)
        if self.geo.data_file:
            wrong = ~copied
            rc = np.ones(aoff.size, U64)
        else:
            clusters = aoff >> U64(self.cb) if first is None else first.view(U64)
            one, err = self.stored.is_one(clusters)
            wrong = one != copied
            if err is not None:
                wrong &= ~err
        if not wrong.any():
            return
        bad = np.flatnonzero(wrong)
        pos = bad if apos is None else apos[bad]
        if not self.geo.data_file:
            rc = self.stored.at(clusters[bad])[0]
            bad_rc = rc
        else:
            bad_rc = rc[bad]
        rcb, cb_ = bad_rc, copied[bad]
        w = weights[bad] if np.ndim(weights) else np.full(bad.size, int(weights))
        self.copied.append(("corruption", "copied_flag_mismatch", w, lambda k: (
            f"L2 entry at {chunk.at(pos[k]):#x} ({int(e[pos[k]]):#x}): COPIED is "
            f"{'set' if cb_[k] else 'clear'} but the data cluster's refcount is {int(rcb[k])}"
            + _copied_risk(bool(cb_[k]), int(rcb[k])), chunk.where(pos[k])),
            "L2 entries with a wrong COPIED flag", "L2 table"))

    # ---- refcount structures -------------------------------------------------------------
    def reftable(self) -> np.ndarray:
        v = self.v
        nbytes = v["refcount_table_clusters"] * self.cs
        t = self.image._reftable()
        if t.size * 8 == nbytes:
            return t
        return self.read_u64(v["refcount_table_offset"], nbytes // 8, "refcount table")

    def refblocks(self, reftable: np.ndarray) -> None:
        """check_refblocks: each refcount block must be valid and referenced exactly once."""
        base = self.v["refcount_table_offset"]
        cs, cb = self.cs, self.cb
        entry_where = lambda i: dict(structure="refcount table", index=int(i),
                                     host_offset=base + 8 * int(i))
        reserved = np.flatnonzero(reftable & U64(S.REFT_RESERVED_MASK))
        self.problems("corruption", "reftable_reserved_bits", np.ones(reserved.size), lambda k: (
            f"refcount table entry {int(reserved[k])} has reserved bits set: "
            f"{int(reftable[reserved[k]]):#x}", entry_where(reserved[k])),
            "refcount table entries with reserved bits", "refcount table")
        off = reftable & U64(S.REFT_OFFSET_MASK)
        clean = (reftable & U64(S.REFT_RESERVED_MASK)) == 0
        misaligned = np.flatnonzero(clean & (off % U64(cs) != 0))
        self.problems("corruption", "refblock_invalid", np.ones(misaligned.size), lambda k: (
            f"refcount block {int(misaligned[k])} at {int(off[misaligned[k]]):#x} is not cluster "
            "aligned; the refcount table entry is corrupt", entry_where(misaligned[k])),
            "misaligned refcount blocks", "refcount table")
        nb = self.nb_clusters()
        aligned = clean & (off % U64(cs) == 0)
        outside = np.flatnonzero(aligned & ((off >> U64(cb)) >= U64(nb)))
        self.problems("corruption", "refblock_invalid", np.ones(outside.size), lambda k: (
            f"refcount block {int(outside[k])} at {int(off[outside[k]]):#x} lies outside the "
            f"image ({self.file_len} bytes): the refcounts it should hold read as zero",
            entry_where(outside[k])), "refcount blocks outside the image", "refcount table")
        blocks = np.flatnonzero(aligned & (off != 0) & ((off >> U64(cb)) < U64(nb)))
        if not blocks.size:
            return
        cluster = (off[blocks] >> U64(cb)).astype(np.int64)
        # QEMU counts the blocks one by one after every other reference and wants each
        # block's refcount to be exactly 1 right after its own increment
        order = np.argsort(cluster, kind="stable")
        sc = cluster[order]
        group_start = np.flatnonzero(np.concatenate([[True], sc[1:] != sc[:-1]]))
        rank = np.empty(sc.size, np.int64)
        rank[order] = np.arange(sc.size) - np.repeat(group_start, np.diff(
            np.append(group_start, sc.size)))
        before = np.minimum(self.raw[cluster], self.refcount_max)
        value = np.minimum(before + rank + 1, self.refcount_max)
        shared = np.flatnonzero(value != 1)
        self.problems("corruption", "refblock_shared", np.ones(shared.size), lambda k: (
            f"refcount block {int(blocks[shared[k]])} at {int(off[blocks[shared[k]]]):#x} has "
            f"refcount {int(value[shared[k]])} once everything is counted: something else uses "
            "its cluster, and writing either would destroy the other",
            entry_where(blocks[shared[k]])), "shared refcount blocks", "refcount table")
        self.add_clusters(cluster, 1)

    def nb_clusters(self) -> int:
        """Clusters QEMU compares: the file's, plus one when a reference overhangs the end."""
        return self.nb_file + (1 if self.raw[self.nb_file] else 0)

    def compare(self) -> None:
        """compare_refcounts: stored against computed, for every cluster of the file."""
        nb = self.nb_clusters()
        raw = self.raw[:nb]
        cs = self.cs
        if nb and int(raw.max()) > self.refcount_max:
            over = np.flatnonzero(raw > self.refcount_max)
            self.problems("corruption", "refcount_overflow", raw[over] - self.refcount_max,
                          lambda k: (f"cluster {int(over[k])} (host {int(over[k]) * cs:#x}) is "
                                     f"referenced {int(raw[over[k]])} times, more than "
                                     f"{1 << self.order}-bit refcounts can count",
                                     dict(structure="refcount block",
                                          host_offset=int(over[k]) * cs)),
                          "clusters whose refcount overflows", "refcount block")
            raw = np.minimum(raw, self.refcount_max)
        computed = raw.view(U64)
        stored, err = self.stored.dense(nb)
        self.ctx.step("refcounts", 0, 1)
        if err is not None:
            unreadable = np.flatnonzero(err)
            self.problem("check_error", "refcount_block_unreadable",
                         f"the stored refcounts of {unreadable.size} clusters (from cluster "
                         f"{int(unreadable[0])}) cannot be read: their refcount block is not "
                         "cluster aligned or out of range", unreadable.size,
                         structure="refcount table",
                         host_offset=self.v["refcount_table_offset"])
        highest = _last_used(stored, computed, err)
        self.ctx.counts.image_end_offset = (highest + 1) * cs
        differ = stored != computed
        if err is not None:
            differ &= ~err
        diff = np.flatnonzero(differ)
        low = diff[stored[diff] < computed[diff]]
        high = diff[stored[diff] > computed[diff]]
        self.problems("corruption", "refcount_too_low", np.ones(low.size), lambda k: (
            f"cluster {int(low[k])} (host {int(low[k]) * cs:#x}): stored refcount "
            f"{int(stored[low[k]])} but {int(computed[low[k]])} references; "
            + ("the cluster counts as free and a later write may overwrite what uses it"
               if stored[low[k]] == 0 else "a write through one reference would change the "
               "others (copy-on-write is skipped)"),
            dict(structure="refcount block", host_offset=int(low[k]) * cs)),
            "clusters with a refcount lower than their references", "refcount block")
        self.problems("leak", "cluster_leaked", np.ones(high.size), lambda k: (
            f"cluster {int(high[k])} (host {int(high[k]) * cs:#x}): stored refcount "
            f"{int(stored[high[k]])} but {int(computed[high[k]])} references: leaked space, "
            "no data at risk", dict(structure="refcount block", host_offset=int(high[k]) * cs)),
            "leaked clusters", "refcount block")
        self.ctx.step("refcounts", 1, 1)

    # ---- bitmaps (qcow2_check_bitmaps_refcounts) -------------------------------------------
    def bitmaps(self) -> None:
        ext = self.image.header.bitmaps_ext
        if not ext or not self.v["autoclear_features"] & S.AUTOCLEAR_BITMAPS:
            return      # QEMU ignores the extension: its clusters show up as leaks
        d_off, d_size, n = (ext["bitmap_directory_offset"], ext["bitmap_directory_size"],
                            ext["nb_bitmaps"])
        if not n:
            return
        self.reference_one(d_off, d_size, "table_beyond_eof", "bitmap directory",
                           structure="bitmap directory", host_offset=d_off)
        entries = self.image.bitmaps or []
        reason = self.bitmap_directory_problem(entries, n, d_size)
        if reason:
            self.problem("corruption", "bitmap_directory_invalid",
                         f"bitmap directory at {d_off:#x}: {reason}", structure="bitmap directory",
                         host_offset=d_off)
            self.abort("bitmap_directory_invalid", f"the bitmap directory cannot be loaded "
                       f"({reason}): the check stops here, as QEMU's does",
                       structure="bitmap directory")
        cs = self.cs
        for bm in entries:
            t_off, t_size = bm["bitmap_table_offset"], bm["bitmap_table_size"]
            structure = f"bitmap {bm['name']!r} table"
            self.reference_one(t_off, t_size * 8, "table_beyond_eof", structure,
                               structure=structure, host_offset=t_off)
            table = self.read_u64(t_off, t_size, structure)
            data = table & U64(S.BME_TABLE_OFFSET_MASK)
            invalid = np.flatnonzero(((table & U64(S.BME_TABLE_RESERVED_MASK)) != 0)
                                     | ((data != 0) & (((table & U64(1)) != 0)
                                                       | (data % U64(cs) != 0))))
            if invalid.size:
                k = int(invalid[0])
                code = ("bitmap_table_reserved_bits" if table[k] & U64(S.BME_TABLE_RESERVED_MASK)
                        else "bitmap_table_entry_invalid")
                self.problem("corruption", code, f"{structure} entry {k} is invalid: "
                             f"{int(table[k]):#x}", structure=structure, index=k,
                             host_offset=t_off + 8 * k)
                self.abort(code, f"{structure} cannot be loaded: the check stops here, as "
                           "QEMU's does", structure=structure)
            used = np.flatnonzero(data)
            self.reference(data[used], cs, 1, "cluster_beyond_eof",
                           lambda k, used=used, name=structure: f"data cluster {int(used[k])} "
                           f"of {name}",
                           lambda k, used=used, name=structure, base=t_off: dict(
                               structure=name, index=int(used[k]),
                               host_offset=base + 8 * int(used[k])))

    def bitmap_directory_problem(self, entries: list, n: int, size: int) -> str | None:
        """Why QEMU's bitmap_list_load would refuse the directory (None: it loads)."""
        if not size or size > BME_DIRECTORY_MAX:
            return f"directory size {size} is zero or too large"
        if len(entries) != n:
            return f"{len(entries)} readable entries, the header extension says {n}"
        total = 0
        virtual = self.v["size"] // 512 * 512
        for bm in entries:
            total += -(-(24 + bm["name_size"] + bm["extra_data_size"]) // 8) * 8
            name = bm["name"]
            if bm["extra_data_size"]:
                return f"bitmap {name!r} has extra data (not supported by QEMU)"
            phys = bm["bitmap_table_size"] * self.cs
            g = bm["granularity_bits"]
            if (not bm["bitmap_table_size"] or not bm["bitmap_table_offset"]
                    or bm["bitmap_table_offset"] % self.cs
                    or bm["bitmap_table_size"] > BME_MAX_TABLE_SIZE
                    or not BME_GRANULARITY_BITS[0] <= g <= BME_GRANULARITY_BITS[1]
                    or bm["flags"] & BME_RESERVED_FLAGS or bm["name_size"] > BME_MAX_NAME_SIZE
                    or bm["type"] != 1 or phys > BME_MAX_PHYS_SIZE
                    or (not bm["flags"] & 1 and virtual > (phys * 8) << g)):
                return f"bitmap {name!r} does not satisfy QEMU's constraints"
        if total != size:
            return f"entries take {total} bytes, the header extension says {size}"
        return None


def _last_used(stored: np.ndarray, computed: np.ndarray, err) -> int:
    """Highest cluster with a stored or computed refcount (0 when none): QEMU's
    highest_cluster, found from the end a block at a time."""
    step = 1 << 16
    for end in range(stored.size, 0, -step):
        a = max(0, end - step)
        used = (stored[a:end] != 0) | (computed[a:end] != 0)
        if err is not None:
            used &= ~err[a:end]
        hit = np.flatnonzero(used)
        if hit.size:
            return a + int(hit[-1])
    return 0


def _copied_risk(copied: bool, refcount: int) -> str:
    """What a wrong COPIED flag does to the next write."""
    if not copied:
        return "; writes copy it needlessly (space and speed only)"
    if refcount == 0:
        return "; the cluster counts as free although it is in use"
    return "; a write would change it in place although it is shared (snapshots would change)"


class _Chunk:
    """Where the entries of a chunk of L2 tables lie, and their per-table weights."""

    def __init__(self, offsets: np.ndarray, l2e: int, esize: int) -> None:
        self.offsets, self.l2e, self.esize = offsets, l2e, esize

    def at(self, pos) -> int:
        """File offset of entry `pos` of the chunk."""
        pos = int(pos)
        return int(self.offsets[pos // self.l2e]) + self.esize * (pos % self.l2e)

    def where(self, pos) -> dict:
        return dict(structure="L2 table", host_offset=self.at(pos))

    def wa(self, pos: np.ndarray, per_table: np.ndarray) -> np.ndarray:
        """The weight of each entry `pos`, as an array."""
        return per_table[np.asarray(pos) // self.l2e]

    def w(self, pos, per_table: np.ndarray):
        """The weight of each entry `pos` (None: every entry of the chunk): a number when
        every table weighs the same."""
        if per_table.size and per_table.min() == per_table.max():
            return int(per_table[0])
        if pos is None:
            return np.repeat(per_table, self.l2e)
        return per_table[pos // self.l2e]


class _PaddedReader:
    """Bytes of a region read as QEMU reads them (zeros past the end), in growing pieces."""

    def __init__(self, check: Qcow2Check, base: int) -> None:
        self.check, self.base, self.buf = check, base, b""

    def get(self, offset: int, n: int) -> bytes:
        rel = offset - self.base
        need = rel + n
        if need > len(self.buf):
            more = max(need - len(self.buf), 64 << 10)
            self.buf += self.check.read_padded(self.base + len(self.buf), more, "snapshot table")
        return self.buf[rel:rel + n]


class StoredRefcounts:
    """On-disk refcounts as QEMU's qcow2_get_refcount reads them.

    A cluster beyond the refcount table or under a zero entry has refcount 0; a
    block past the end of the file reads as zeros; a block that is not cluster
    aligned cannot be read (an error for each of its clusters)."""

    def __init__(self, check: Qcow2Check, reftable: np.ndarray) -> None:
        self.check = check
        self.image = check.image
        self.cs = check.cs
        self.order = check.order
        self.bits = check.cb + 3 - self.order          # clusters per block = 1 << bits
        self.offsets = reftable & U64(S.REFT_OFFSET_MASK)
        # blocks QEMU cannot read: not cluster aligned, or out of the range of any request
        self.misaligned = (((self.offsets % U64(self.cs)) != 0)
                           | (self.offsets > U64(BDRV_MAX_LENGTH - self.cs)))
        self.values = np.zeros(0, U64)                 # clusters [0, len) of the blocks read
        self.dense_misaligned = False                  # a block among those is unreadable
        self.ones = None                               # values == 1, made on first use
        self.cache: dict[int, np.ndarray | None] = {}

    def dense(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored refcounts of clusters [0, n), and which could not be read (None: all
        could)."""
        self.load(n)
        if self.values.size >= n:
            values = self.values[:n]
        else:
            values = np.zeros(n, U64)
            values[:self.values.size] = self.values
        blocks = min(self.offsets.size, -(-n >> self.bits) if n else 0)
        bad = np.flatnonzero(self.misaligned[:blocks])
        if not bad.size:
            return values, None
        err = np.zeros(n, bool)
        for b in bad.tolist():
            err[b << self.bits:(b + 1) << self.bits] = True
        return values, err

    def load(self, n: int) -> None:
        """Read the blocks covering clusters [0, n) once: refcounts.py's reader when every
        block is where a reader expects it, else block by block as QEMU reads them."""
        if self.values.size >= n:
            return
        per = 1 << self.bits
        blocks = min(self.offsets.size, -(-n // per))
        offs = self.offsets[:blocks]
        self.dense_misaligned = bool(self.misaligned[:blocks].any())
        sane = (self.image._reftable().size == self.offsets.size
                and not (self.misaligned[:blocks].any()
                         or ((offs != 0) & (offs + U64(self.cs) > U64(self.check.size))).any()))
        if sane:
            try:
                _, values = refcounts(self.image)
                self.values = values[:blocks * per]
                if self.values.size < n:
                    self.values = np.concatenate([self.values,
                                                  np.zeros(n - self.values.size, U64)])
                return
            except ImageError:
                pass
        values = np.zeros(blocks * per, U64)
        for b in np.flatnonzero((offs != 0) & ~self.misaligned[:blocks]).tolist():
            block = self.block(b)
            if block is not None:
                values[b * per:(b + 1) * per] = block
        self.values = values

    def block(self, b: int) -> np.ndarray | None:
        """Refcounts of block `b` (None: unreadable); zeros for absent blocks."""
        if b in self.cache:
            return self.cache[b]
        off = int(self.offsets[b])
        if self.misaligned[b]:
            out = None
        elif off == 0 or off >= self.check.size:
            out = np.zeros(1 << self.bits, U64)
        else:
            data = self.check.read_padded(off, self.cs, "refcount block")
            out = S.decode_refcounts(data, self.order)
        self.cache[b] = out
        return out

    def is_one(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Whether the stored refcount of each cluster is 1 (what COPIED must say)."""
        clusters = np.asarray(clusters, U64)
        if (clusters.size and int(clusters.max()) < self.values.size
                and not self.dense_misaligned):
            if self.ones is None:
                self.ones = self.values == 1
            return self.ones[clusters.view(np.int64)], None
        values, err = self.at(clusters)
        return values == 1, err

    def at(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored refcounts of arbitrary cluster indices, and which could not be read."""
        clusters = np.asarray(clusters, U64)
        if not clusters.size:
            return np.zeros(0, U64), None
        if int(clusters.max()) < self.values.size and not self.dense_misaligned:
            return self.values[clusters.view(np.int64)], None
        values = np.zeros(clusters.size, U64)
        err = np.zeros(clusters.size, bool)
        block = clusters >> U64(self.bits)
        known = block < U64(self.offsets.size)
        idx = np.flatnonzero(known)
        if not idx.size:
            return values, err
        b = block[idx].astype(np.int64)
        off = self.offsets[b]
        present = np.flatnonzero(off != 0)
        idx, b = idx[present], b[present]
        bad = self.misaligned[b]
        err[idx[bad]] = True
        idx, b = idx[~bad], b[~bad]
        inner = (clusters[idx] & U64((1 << self.bits) - 1)).astype(np.int64)
        flat = clusters[idx]
        in_dense = flat < U64(self.values.size)
        values[idx[in_dense]] = self.values[flat[in_dense].astype(np.int64)]
        rest = np.flatnonzero(~in_dense)
        if rest.size:
            for blk in np.unique(b[rest]).tolist():
                sel = rest[b[rest] == blk]
                data = self.block(blk)
                if data is None:
                    err[idx[sel]] = True
                else:
                    values[idx[sel]] = data[inner[sel]]
        return values, err
