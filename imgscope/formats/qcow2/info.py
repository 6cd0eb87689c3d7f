"""qemu-img info's qcow2 `format-specific` block, from the parsed header."""
from __future__ import annotations

from ...schemas import qcow2 as S


def luks_info(luks: dict) -> dict:
    mode, _, ivgen = luks["cipher_mode"].partition("-")
    ivgen_alg, _, ivgen_hash = ivgen.partition(":")
    key_bits = luks["key_bytes"] * 8 // (2 if mode == "xts" else 1)
    out = {"format": "luks", "cipher-alg": f"{luks['cipher_name']}-{key_bits}",
           "cipher-mode": mode, "ivgen-alg": ivgen_alg or "plain",
           "hash-alg": luks["hash_spec"], "payload-offset": luks["payload_offset"] * 512,
           "master-key-iters": luks["mk_digest_iterations"], "uuid": luks["uuid"], "slots": []}
    if ivgen_hash:
        out["ivgen-hash-alg"] = ivgen_hash
    for slot in luks["key_slots"]:
        active = slot.active == S.LUKS_KEY_ENABLED
        s = {"active": active, "key-offset": slot.key_material_offset * 512}
        if active:
            s.update({"iters": slot.iterations, "stripes": slot.stripes})
        out["slots"].append(s)
    return out


def format_specific(img) -> dict:
    v = img.header.values
    data: dict = {"compat": "0.10" if v["version"] == 2 else "1.1",
                  "compression-type": S.COMPRESSION_TYPES.get(v["compression_type"], "zlib")}
    if v["version"] >= 3:
        data["lazy-refcounts"] = bool(v["compatible_features"] & S.COMPAT_LAZY)
        if img.bitmaps:
            data["bitmaps"] = [{"flags": [n for bit, n in ((0, "in-use"), (1, "auto"))
                                          if b["flags"] >> bit & 1],
                                "name": b["name"], "granularity": b["granularity"]}
                               for b in img.bitmaps]
    if v["refcount_order"] <= 6:
        data["refcount-bits"] = 1 << v["refcount_order"]
    if v["version"] >= 3:
        if v["incompatible_features"] & S.INCOMPAT_DATA_FILE:
            if img.data_file_name is not None:
                data["data-file"] = img.data_file_name
            data["data-file-raw"] = bool(v["autoclear_features"] & S.AUTOCLEAR_DATA_FILE_RAW)
        if img.luks:
            data["encrypt"] = luks_info(img.luks)
        data["corrupt"] = bool(v["incompatible_features"] & S.INCOMPAT_CORRUPT)
        data["extended-l2"] = bool(v["incompatible_features"] & S.INCOMPAT_EXTL2)
    elif img.luks:
        data["encrypt"] = luks_info(img.luks)
    return {"type": "qcow2", "data": data}
