"""The checker: generic rules and each format's own rules over the common model.

`check_image(image)` never writes.  It makes the driver parse everything
(guest map of every layer it owns, snapshots, host layout), runs the generic
rules (structures overlapping, guest data sharing host bytes, pointers beyond
the end of the file, unreferenced space) and the format's rules from
`analysis/rules/<format>.py`, and returns a `CheckReport`: the findings as a
DataFrame plus the counters `qemu-img check --output=json` prints.

Counting follows qemu-img: a *corruption* may lose data, a *leak* only wastes
space, a *check error* means the check could not complete.  Formats whose
rules count the QEMU way (qcow2: refcounts rebuilt from every reference) set
`counts_parse_findings = False` so parse-time findings are listed but not
counted twice.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import ImageError
from ..model import Finding, KIND_DATA, KIND_ZERO, NO_HOST

# formats `qemu-img check` can check (the others exit 63 there; imgscope checks them all)
QEMU_CHECKS = ("qcow2", "vmdk", "vdi", "vhdx", "qed", "parallels")
# severities of parse-time findings that count as corruptions
CORRUPTING = ("error", "critical")
# qemu-img check --output=json keys, in the QAPI ImageCheck order
JSON_KEYS = ("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
             "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
             "fragmented-clusters", "compressed-clusters")

Progress = Callable[[str, int, int], None]


@dataclass
class CheckCounts:
    """The numbers `qemu-img check` reports (optional keys are printed when non-zero)."""

    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


@dataclass
class CheckContext:
    """What a rule gets: the image, the counters and a way to report."""

    image: object
    counts: CheckCounts
    progress: Progress | None = None
    counted_codes: set = field(default_factory=set)
    rules: object = None            # the format's rule module (its flags tune the generic rules)

    def corruption(self, code: str, message: str, *, count: int = 1, fixable: bool = False,
                   severity: str = "error", **where) -> None:
        """A problem that can lose data: counted as `count` corruptions."""
        self.counts.corruptions += count
        self.counted_codes.add(code)
        self._note(severity, code, message, fixable, where)

    def leak(self, code: str, message: str, *, count: int = 1, fixable: bool = True,
             **where) -> None:
        """Space referenced by nothing but still marked in use: counted as leaks."""
        self.counts.leaks += count
        self.counted_codes.add(code)
        self._note("warning", code, message, fixable, where)

    def check_error(self, code: str, message: str, **where) -> None:
        """Something the check could not read: it is incomplete."""
        self.counts.check_errors += 1
        self.counted_codes.add(code)
        self._note("error", code, message, False, where)

    def notice(self, severity: str, code: str, message: str, *, fixable: bool = False,
               **where) -> None:
        """Worth knowing, not counted (unreferenced space, odd but valid values)."""
        self._note(severity, code, message, fixable, where)

    def step(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def _note(self, severity, code, message, fixable, where) -> None:
        self.image.note(severity, code, message, raise_in_strict=False, fixable=fixable, **where)


@dataclass
class CheckReport:
    """Findings and counters of one check; `to_json()` is qemu-img check's JSON + findings."""

    filename: str
    format: str
    counts: CheckCounts
    findings: list[Finding]

    @property
    def qemu_checks_format(self) -> bool:
        """Whether `qemu-img check` can check this format at all (others exit 63 there)."""
        return self.format in QEMU_CHECKS

    @property
    def verdict(self) -> str:
        c = self.counts
        if c.check_errors:
            return "incomplete"
        if c.corruptions:
            return "corruptions"
        return "leaks" if c.leaks else "clean"

    @property
    def exit_code(self) -> int:
        """As qemu-img check: 0 clean, 1 not completed, 2 corruptions, 3 leaks only."""
        return {"clean": 0, "incomplete": 1, "corruptions": 2, "leaks": 3}[self.verdict]

    @property
    def frame(self):
        from ..frames import findings_frame
        return findings_frame(self.findings)

    def qemu_dict(self) -> dict:
        """The keys and values `qemu-img check --output=json` prints (non-zero optionals)."""
        c = self.counts
        values = {"filename": self.filename, "format": self.format,
                  "check-errors": c.check_errors, "image-end-offset": c.image_end_offset,
                  "corruptions": c.corruptions, "leaks": c.leaks,
                  "corruptions-fixed": c.corruptions_fixed, "leaks-fixed": c.leaks_fixed,
                  "total-clusters": c.total_clusters,
                  "allocated-clusters": c.allocated_clusters,
                  "fragmented-clusters": c.fragmented_clusters,
                  "compressed-clusters": c.compressed_clusters}
        always = ("filename", "format", "check-errors")
        return {k: values[k] for k in JSON_KEYS if k in always or values[k]}

    def to_json(self) -> dict:
        from ..info import qemu_order
        out = qemu_order(self.qemu_dict())
        out["findings"] = [_finding_dict(f) for f in self.findings]
        return out

    def human(self) -> str:
        """qemu-img check's text, then one line per finding."""
        c = self.counts
        lines = []
        for f in self.findings:
            where = f" at {f.host_offset:#x}" if f.host_offset is not None else ""
            lines.append(f"{f.severity.upper()} {f.code}{where}: {f.message}")
        if lines:
            lines.append("")
        if self.verdict == "clean":
            lines.append("No errors were found on the image.")
        else:
            if c.corruptions:
                lines.append(f"{c.corruptions} errors were found on the image.\n"
                             "Data may be corrupted, or further writes to the image may "
                             "corrupt it.")
            if c.leaks:
                lines.append(f"{c.leaks} leaked clusters were found on the image.\n"
                             "This means waste of disk space, but no harm to data.")
            if c.check_errors:
                lines.append(f"{c.check_errors} internal errors have occurred during the "
                             "check.")
        if c.total_clusters and c.allocated_clusters:
            t = c.total_clusters
            lines.append(f"{c.allocated_clusters}/{t} = {c.allocated_clusters * 100 / t:.2f}% "
                         f"allocated, {c.fragmented_clusters * 100 / c.allocated_clusters:.2f}% "
                         f"fragmented, {c.compressed_clusters * 100 / c.allocated_clusters:.2f}% "
                         "compressed clusters")
        if c.image_end_offset:
            lines.append(f"Image end offset: {c.image_end_offset}")
        return "\n".join(lines)


def _finding_dict(f: Finding) -> dict:
    return {"severity": f.severity, "code": f.code, "structure": f.structure, "index": f.index,
            "file": f.file, "host-offset": f.host_offset, "guest-offset": f.guest_offset,
            "size": f.size, "message": f.message, "fixable": f.fixable}


def _format_rules(fmt: str):
    """The format's rule module (analysis/rules/<fmt>.py), or None."""
    try:
        return importlib.import_module(f"{__package__}.rules.{fmt}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.rules.{fmt}":
            raise
        return None


def check_image(image, *, progress: Progress | None = None) -> CheckReport:
    """Run every rule on `image` (read-only) and return the report."""
    counts = CheckCounts()
    rules = _format_rules(image.format)
    ctx = CheckContext(image, counts, progress, rules=rules)
    before = len(image._findings)
    ctx.step("parse", 0, 1)
    try:
        image._own_extents()
        regions = None
        if getattr(rules, "uses_layout", True):
            image.extent_table()
            regions = image.regions()
    except ImageError as exc:
        ctx.check_error("check_incomplete", f"the image could not be read: {exc.message}",
                        structure=exc.structure or "", host_offset=exc.offset)
        regions = None
    ctx.step("parse", 1, 1)
    if rules is not None:
        try:
            rules.check(ctx)
        except ImageError as exc:
            ctx.check_error("check_incomplete", f"the {image.format} rules could not complete: "
                            f"{exc.message}", structure=exc.structure or "",
                            host_offset=exc.offset)
    if regions is not None:
        generic_rules(ctx, regions, counting=getattr(rules, "counts_generic", True))
    if getattr(rules, "counts_parse_findings", True):
        for f in image._findings[:before]:
            if f.severity in CORRUPTING and f.code not in ctx.counted_codes:
                counts.corruptions += 1
    findings = image._all_findings()
    name = getattr(image, "given_name", None) or str(image.path)
    return CheckReport(name, image.format, counts, findings)


def check_path(path, format: str | None = None, *, progress: Progress | None = None,
               given_name: str | None = None, **open_args) -> CheckReport:
    """Open and check `path`; an image that cannot even be opened is a report with one
    `open_failed` finding and a check error (exit 1, as qemu-img check)."""
    import imgscope
    name = given_name or str(path)
    try:
        image = imgscope.open(path, format, **open_args)
    except ImageError as exc:
        f = Finding("critical", "open_failed", f"the image cannot be opened: {exc.message}",
                    structure=exc.structure or "", file=exc.path or str(path),
                    host_offset=exc.offset)
        return CheckReport(name, format or "", CheckCounts(check_errors=1), [f])
    with image:
        image.given_name = name
        return check_image(image, progress=progress)


def generic_rules(ctx: CheckContext, regions, counting: bool = True) -> None:
    """Rules that hold for every format, on the host layout and the guest map."""
    def report(code: str, message: str, **where) -> None:
        if counting:
            ctx.corruption(code, message, **where)
        else:
            ctx.notice("error", code, message, **where)

    kinds = regions.kind.astype(str).to_numpy()
    over = np.flatnonzero(kinds == "overlap")
    for i in over[:100].tolist():
        row = regions.iloc[i]
        report("structures_overlap", f"{row.owner}: {int(row.length)} bytes at "
               f"{int(row.offset):#x} belong to more than one structure",
               structure="layout", host_offset=int(row.offset), size=int(row.length),
               file=str(row.file))
    unref = np.flatnonzero(kinds == "unreferenced")
    if unref.size and getattr(ctx.rules, "unreferenced_is_suspect", False):
        total = int(regions.length.to_numpy()[unref].sum())
        first = regions.iloc[int(unref[0])]
        ctx.notice("info", "unreferenced_space", f"{total} bytes in {unref.size} ranges are "
                   "referenced by no structure (free, leaked or left over)",
                   structure="layout", host_offset=int(first.offset), size=total,
                   file=str(first.file))
    _shared_host_data(ctx)


def _shared_host_data(ctx: CheckContext) -> None:
    """Two guest ranges of this layer stored in the same host bytes (formats without
    copy-on-write sharing: every one but qcow2, whose refcount rule covers it).

    Not counted: the same bytes are already an `overlap` in the layout; this
    finding names the guest offsets involved."""
    if getattr(ctx.rules, "shares_host_data", False):
        return
    t = ctx.image._own_extents()
    hosted = np.flatnonzero(((t.kind == KIND_DATA) | (t.kind == KIND_ZERO)) & (t.host != NO_HOST)
                            & (t.file >= 0))
    if hosted.size < 2:
        return
    for f in np.unique(t.file[hosted]).tolist():        # a handful of files
        mine = hosted[t.file[hosted] == f]
        order = np.argsort(t.host[mine], kind="stable")
        host, guest = t.host[mine][order], t.guest[mine][order]
        end = host + t.length[mine][order]
        reach = np.maximum.accumulate(end)          # furthest end of the runs before
        clash = np.flatnonzero(host[1:] < reach[:-1])
        _note_shared(ctx, clash, host, guest, reach, str(t.files[f].path))


def _note_shared(ctx, clash, host, guest, reach, path) -> None:
    for k in clash[:100].tolist():
        ctx.notice("error", "host_data_shared",
                   f"guest {int(guest[k + 1]):#x} is stored in host bytes at {int(host[k + 1]):#x} "
                   "that an earlier guest range uses too", structure="guest map",
                   host_offset=int(host[k + 1]), guest_offset=int(guest[k + 1]),
                   size=int(reach[k] - host[k + 1]), file=path)
