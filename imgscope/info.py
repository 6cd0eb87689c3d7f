"""qemu-img info compatible summaries (JSON dict and human text)."""
from __future__ import annotations

import os

from .units import human_size


def _qdict_bucket(key: str) -> int:
    """QEMU's QDict bucket of a key (tdb_hash mod 512): its JSON key order."""
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, c in enumerate(key.encode()):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


def qemu_order(obj):
    """Dicts reordered the way qemu-img iterates its QDicts, recursively, so
    json.dumps(indent=4) prints the same text as `qemu-img info --output=json`."""
    if isinstance(obj, dict):
        return {k: qemu_order(obj[k]) for k in sorted(obj, key=_qdict_bucket)}
    if isinstance(obj, list):
        return [qemu_order(v) for v in obj]
    return obj


def _given_name(image) -> str:
    return getattr(image, "given_name", None) or str(image.path)


def image_info(image) -> dict:
    """The keys and values `qemu-img info --output=json` prints for this image."""
    out: dict = {"virtual-size": image.virtual_size, "filename": _given_name(image),
                 "format": image.format, "actual-size": image.actual_size()}
    if image.info_complete:
        out["dirty-flag"] = bool(image.dirty)
    if image.cluster_size:
        out["cluster-size"] = image.cluster_size
    fs = image.format_specific()
    if fs is not None:
        out["format-specific"] = fs
    if getattr(image, "encrypted", False) or (image.format == "qcow2"
                                              and image.header.values["crypt_method"]):
        out["encrypted"] = True
    if image.backing_name:
        out["backing-filename"] = image.backing_name
        out["full-backing-filename"] = full_backing_name(image)
        # only a format the image itself names (qemu-img info does not open parents)
        if image.backing_format:
            out["backing-filename-format"] = image.backing_format
    snaps = getattr(image, "snapshots", None)
    if snaps:
        out["snapshots"] = [snapshot_info(s) for s in snaps]
    return qemu_order(out)


def full_backing_name(image) -> str:
    name = image.backing_name
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(_given_name(image)), name)


def snapshot_info(s: dict) -> dict:
    out = {"id": s["id_str"], "name": s["name"], "vm-state-size": s["vm_state_size_large"],
           "date-sec": s["date_sec"], "date-nsec": s["date_nsec"],
           "vm-clock-sec": s["vm_clock_nsec"] // 10**9,
           "vm-clock-nsec": s["vm_clock_nsec"] % 10**9}
    if s["icount"] != -1:
        out["icount"] = s["icount"]
    return out


def _human_specific(data, indent: int) -> list[str]:
    lines = []
    pad = " " * indent
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for k, v in items:
        key = f"[{k}]" if isinstance(k, int) else str(k).replace("-", " ")
        if isinstance(v, (dict, list)):
            lines.append(f"{pad}{key}:")
            lines += _human_specific(v, indent + 4)
        else:
            val = str(v).lower() if isinstance(v, bool) else str(v)
            lines.append(f"{pad}{key}: {val}")
    return lines


def human_info(info: dict) -> str:
    """Text like `qemu-img info` prints."""
    import datetime as _dt
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {human_size(info['actual-size'])}"]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        bf = info["backing-filename"]
        full = info.get("full-backing-filename")
        lines.append(f"backing file: {bf}" + (f" (actual path: {full})" if full and full != bf else ""))
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<9} {'TAG':<17} {'VM SIZE':>7} {'DATE':>20} {'VM CLOCK':>12}     ICOUNT")
        for s in info["snapshots"]:
            date = _dt.datetime.fromtimestamp(s["date-sec"]).strftime("%Y-%m-%d %H:%M:%S")
            secs = s["vm-clock-sec"]
            clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{s['vm-clock-nsec'] // 10**6:03d}"
            icount = str(s["icount"]) if "icount" in s else ""
            lines.append(f"{s['id']:<9} {s['name']:<17} {human_size(s['vm-state-size']):>7} "
                         f"{date:>20} {clock:>12} {icount:>10}")
    fs = info.get("format-specific")
    if fs:
        lines.append("Format specific information:")
        lines += _human_specific(fs["data"], 4)
    return "\n".join(lines)
