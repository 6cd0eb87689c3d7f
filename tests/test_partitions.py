"""Partition tables inside guest disks (MBR with an EBR chain, GPT) held against sfdisk.

The oracle: raw disks partitioned with ``sfdisk`` (MBR: primaries, a bootable flag, an
extended partition with several logicals, odd types, an empty slot) and ``sgdisk`` (GPT
with names, attributes, several types), with known bytes written into each partition
by plain file writes; then ``qemu-img convert -O qcow2 / vmdk / vdi / vpc`` of each.
Every image is opened with ``imgscope.open``; ``partition_table().to_sfdisk()`` must
equal ``sfdisk --json`` of the raw disk and each ``partition(n).open()`` must hold the
bytes written.  Damaged disks (bad GPT CRC, EBR loop, partitions past the end, no table,
lying counts, mutated sectors) give findings or ImageError only, in bounded time.  A GPT
with 4096-byte sectors, which sgdisk cannot make on a file, is built from the schema.
"""
from __future__ import annotations

import hashlib
import json
import sys
import os
import random
import shutil
import struct
import subprocess
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.errors import ImageError, ParseError
from imgscope.guest.partitions import FRAME_COLUMNS, read_partition_table
from imgscope.io.reader import PositionalReader
from imgscope.schemas import mbr_gpt as S

import oracle

MiB = oracle.MiB
FORMATS = ("qcow2", "vmdk", "vdi", "vpc")
SFDISK = shutil.which("sfdisk") or "/usr/sbin/sfdisk"
SGDISK = shutil.which("sgdisk") or "/usr/sbin/sgdisk"

MBR_SCRIPT = """label: dos
label-id: 0x5eed1234
unit: sectors

start=2048, size=8192, type=83, bootable
start=10240, size=40000, type=5
start=50240, size=4096, type=7
start=54336, size=2048, type=a5
start=12288, size=4096, type=82
start=18432, size=2048, type=8e
start=22528, size=1000, type=c
"""
#: extended type 0x0F (LBA) in slot 2, slot 3 left empty, a hidden type in slot 4
MBR_LBA_EXT_SCRIPT = """label: dos
label-id: 0x0badcafe
unit: sectors

1 : start=2048, size=4096, type=ef
2 : start=6144, size=16384, type=f
4 : start=22528, size=8192, type=1c, bootable
5 : start=8192, size=4096, type=fd
6 : start=14336, size=6144, type=83
"""
DISK_GUID = "0D1E2F30-4152-4637-8899-AABBCCDDEEFF"
GPT_ARGS = [  # sgdisk: names (one not ASCII), attribute bits 0, 2, 48, 62, 63, several types
    "-n", "1:2048:+4M", "-t", "1:ef00", "-c", "1:EFI System", "-u", "1:11111111-0000-4000-8000-000000000001",
    "-n", "2:0:+8M", "-t", "2:8300", "-c", "2:root fs \u00e9\u2603", "-A", "2:set:2",
    "-u", "2:11111111-0000-4000-8000-000000000002",
    "-n", "3:0:+2M", "-t", "3:8200", "-u", "3:11111111-0000-4000-8000-000000000003",
    "-n", "4:0:+4M", "-t", "4:0700", "-c", "4:data", "-A", "4:set:0", "-A", "4:set:62", "-A", "4:set:63",
    "-u", "4:11111111-0000-4000-8000-000000000004",
    "-n", "5:0:+2M", "-t", "5:8e00", "-c", "5:lvm", "-A", "5:set:48",
    "-u", "5:11111111-0000-4000-8000-000000000005",
    "-n", "7:0:+1M", "-t", "7:ef02", "-c", "7:bios", "-u", "7:11111111-0000-4000-8000-000000000007",
]


@dataclass
class Disk:
    name: str
    raw: Path
    sfdisk: dict                                  # sfdisk --json of the raw disk
    expected: dict = field(default_factory=dict)  # partition number -> sha256 of its bytes
    images: dict = field(default_factory=dict)    # format -> converted image


# --------------------------------------------------------------------------- building disks


def require_partition_tools() -> None:
    missing = [p for p in (SFDISK, SGDISK) if not os.access(p, os.X_OK)]
    if missing:
        raise RuntimeError(f"these tests need sfdisk and sgdisk (Debian: fdisk, gdisk): missing {missing}")


def sfdisk_json(path: Path) -> dict:
    return json.loads(oracle.run(SFDISK, "--json", path).stdout)


def patches(tag: str, size: int) -> list[tuple[int, bytes]]:
    """Known bytes at the start, across the middle and at the very end of a partition."""
    rnd = random.Random(tag)
    out = [(0, rnd.randbytes(min(65536, size)))]
    if size >= 256 * 1024:
        out += [(size // 2 + 123, rnd.randbytes(1000)), (size - 4096, rnd.randbytes(4096))]
    return out


def fill_partitions(disk: Disk) -> None:
    """Write known bytes into every data partition; the expected SHA-256 of each partition."""
    table = disk.sfdisk["partitiontable"]
    ss = table["sectorsize"]
    with open(disk.raw, "r+b") as f:
        for p in table["partitions"]:
            number = int(p["node"][len(str(disk.raw)):].lstrip("p"))
            start, size = p["start"] * ss, p["size"] * ss
            if table["label"] == "dos" and p["type"] in ("5", "f", "85"):
                continue                           # the extended partition: EBRs live there
            content = bytearray(size)
            for off, data in patches(f"{disk.name}:{number}", size):
                f.seek(start + off)
                f.write(data)
                content[off:off + len(data)] = data
            disk.expected[number] = hashlib.sha256(content).hexdigest()
    for p in table["partitions"]:                  # extended: whatever the disk holds there
        number = int(p["node"][len(str(disk.raw)):].lstrip("p"))
        if number not in disk.expected:
            with open(disk.raw, "rb") as f:
                f.seek(p["start"] * ss)
                disk.expected[number] = hashlib.sha256(f.read(p["size"] * ss)).hexdigest()


def make_mbr(root: Path, name: str, script: str, size: int) -> Disk:
    raw = root / f"{name}.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    oracle.run(SFDISK, "-q", "--no-reread", "--no-tell-kernel", raw, input=script)
    return Disk(name, raw, sfdisk_json(raw))


def make_gpt(root: Path, name: str, size: int) -> Disk:
    raw = root / f"{name}.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    oracle.run(SGDISK, "-o", "-U", DISK_GUID, *GPT_ARGS, raw)
    return Disk(name, raw, sfdisk_json(raw))


@pytest.fixture(scope="module")
def disks(tmp_path_factory) -> dict[str, Disk]:
    oracle.require_tools()
    require_partition_tools()
    root = tmp_path_factory.mktemp("partitions")
    out = {d.name: d for d in (make_mbr(root, "mbr", MBR_SCRIPT, 32 * MiB),
                               make_mbr(root, "mbr_lba_ext", MBR_LBA_EXT_SCRIPT, 16 * MiB),
                               make_gpt(root, "gpt", 32 * MiB))}
    for disk in out.values():
        fill_partitions(disk)
        for fmt in FORMATS:
            path = root / f"{disk.name}.{fmt}"
            oracle.run(oracle.QEMU_IMG, "convert", "-q", "-f", "raw", "-O", fmt, disk.raw, path)
            disk.images[fmt] = path
    return out


def partition_sha(part) -> str:
    h = hashlib.sha256()
    with part.open() as f:
        while data := f.read(4 * MiB):
            h.update(data)
    return h.hexdigest()


def all_images(disks):
    for disk in disks.values():
        yield disk, "raw", disk.raw
        for fmt, path in disk.images.items():
            yield disk, fmt, path


# =========================================================================== the oracle


def test_corpus_is_what_it_claims(disks):
    mbr = disks["mbr"].sfdisk["partitiontable"]
    assert mbr["label"] == "dos" and [p["type"] for p in mbr["partitions"]] == \
        ["83", "5", "7", "a5", "82", "8e", "c"]
    assert mbr["partitions"][0].get("bootable") is True
    lba_ext = disks["mbr_lba_ext"].sfdisk["partitiontable"]
    assert [p["node"][-1] for p in lba_ext["partitions"]] == ["1", "2", "4", "5", "6"]
    gpt = disks["gpt"].sfdisk["partitiontable"]
    assert gpt["label"] == "gpt" and gpt["id"] == DISK_GUID
    assert {"LegacyBIOSBootable", "RequiredPartition GUID:62,63", "GUID:48"} <= \
        {p.get("attrs") for p in gpt["partitions"]}
    assert any(not p.get("name") for p in gpt["partitions"])
    for disk in disks.values():
        for fmt, path in disk.images.items():
            assert oracle.qemu_info(path)["format"] == fmt


def test_to_sfdisk_equals_sfdisk_json(disks):
    """Same keys, same value forms, for the raw disk and every converted image."""
    bad = []
    for disk, fmt, path in all_images(disks):
        with imgscope.open(path) as img:
            mine = img.partition_table().to_sfdisk(device=str(disk.raw))
        if mine != disk.sfdisk:
            bad.append(f"{disk.name}.{fmt}: {json.dumps(mine)} != {json.dumps(disk.sfdisk)}")
    assert not bad, "\n".join(bad)


def test_cli_json_equals_sfdisk_json(disks):
    """`imgscope partitions --output=json` prints sfdisk's JSON (device = the name given)."""
    for disk in disks.values():
        path = disk.images["qcow2"]
        proc = subprocess.run([sys.executable, "-m", "imgscope", "partitions", "--output=json",
                               path.name], cwd=path.parent, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        expected = json.loads(json.dumps(disk.sfdisk))
        table_ = expected["partitiontable"]
        table_["device"] = path.name
        for part in table_["partitions"]:      # sfdisk's rule: "p" when the name ends in a digit
            part["node"] = path.name + "p" + part["node"][len(str(disk.raw)):]
        assert json.loads(proc.stdout) == expected
        table = subprocess.run([sys.executable, "-m", "imgscope", "partitions", str(path)],
                               capture_output=True, text=True, check=True).stdout
        assert table.splitlines()[0].startswith(f"Disklabel type: {expected['partitiontable']['label'].replace('dos', 'mbr')}")
        assert len(table.splitlines()) == 2 + len(expected["partitiontable"]["partitions"])


def test_partition_bytes_match_what_was_written(disks):
    bad = []
    for disk, fmt, path in all_images(disks):
        with imgscope.open(path) as img:
            for number, want in disk.expected.items():
                part = img.partition(number)
                if part.clipped or partition_sha(part) != want:
                    bad.append(f"{disk.name}.{fmt}: partition {number}")
    assert not bad, bad


def test_findings_only_where_the_disk_grew(disks):
    """vpc rounds the disk up to its CHS geometry: the GPT then is not at the end of the
    disk (libfdisk says the same); no other image has findings."""
    grown = []
    for disk, fmt, path in all_images(disks):
        with imgscope.open(path) as img:
            table = img.partition_table()
            grew = img.virtual_size != disk.raw.stat().st_size
            grown += [(disk.name, fmt)] if grew else []
            want = {"pmbr_size_mismatch", "gpt_backup_not_at_end"} if grew and table.scheme == "gpt" \
                else set()
            assert set(table.findings.code) == want, (disk.name, fmt, table.findings.message.tolist())
            assert set(want) <= set(img.findings.code), (disk.name, fmt)   # forwarded to the image
    assert ("gpt", "vpc") in grown


def test_frame_columns_and_values(disks):
    for disk in disks.values():
        table = imgscope.open(disk.raw).partition_table()
        frame = table.frame
        assert list(frame.columns) == FRAME_COLUMNS
        theirs = disk.sfdisk["partitiontable"]
        ss = theirs["sectorsize"]
        assert table.sector_size == ss and table.disk_id == theirs["id"]
        assert table.scheme == {"dos": "mbr", "gpt": "gpt"}[theirs["label"]]
        assert frame.number.tolist() == [int(p["node"].rsplit(".raw", 1)[1].lstrip("p"))
                                         for p in theirs["partitions"]]
        assert (frame.start == frame.start_sector * ss).all() and (frame["size"] == frame.sectors * ss).all()
        assert (frame.end == frame.start + frame["size"]).all()
        assert (frame.end_sector == frame.start_sector + frame.sectors - 1).all()
        assert not frame.clipped.any()
        disk_bytes = disk.raw.read_bytes()
        for p, row in zip(theirs["partitions"], frame.itertuples()):
            assert row.bootable == p.get("bootable", False) or table.scheme == "gpt"
            assert row.type == p["type"] and row.name == p.get("name", "")
            assert row.uuid == p.get("uuid", "")
            # the defining entry really is at table_offset: its start field says so
            raw = disk_bytes[row.table_offset:row.table_offset + 48]
            if table.scheme == "gpt":
                assert struct.unpack_from("<Q", raw, 32)[0] == p["start"]
            else:
                ebr = (row.table_offset - S.MBR_ENTRIES_OFFSET) // 512 * (row.kind == "logical")
                assert ebr + struct.unpack_from("<I", raw, 8)[0] == p["start"]
        kinds = frame.set_index("number").kind
        if table.scheme == "mbr":
            assert (kinds[kinds.index >= 5] == "logical").all()
            assert set(kinds[kinds.index < 5]) <= {"primary", "extended"}


def test_mbr_tables_and_fields(disks):
    disk = disks["mbr"]
    table = imgscope.open(disk.raw).partition_table()
    raw = disk.raw.read_bytes()
    mbr = table.tables["mbr"]
    assert len(mbr) == 4 and mbr.offset.tolist() == [446, 462, 478, 494]
    assert mbr.partition_type.tolist() == list(raw[450:512:16])
    # CHS agrees with the LBA below cylinder 1023 (sfdisk writes a 255/63 geometry)
    small = mbr[mbr.start_cylinder < 1023]
    assert ((small.start_cylinder * 255 + small.start_head) * 63 + small.start_sector - 1
            == small.start_lba).all()
    ebrs = [name for name in table.tables if name.startswith("ebr[")]
    logical = table.frame[table.frame.kind == "logical"]
    assert len(ebrs) == len(logical)
    for name, row in zip(ebrs, logical.itertuples()):
        ebr = table.tables[name]
        assert len(ebr) == 4 and ebr.absolute_start_lba[0] == row.start_sector
        assert raw[int(ebr.ebr_lba[0]) * 512 + 510:int(ebr.ebr_lba[0]) * 512 + 512] == b"\x55\xaa"
    fields = table.fields.set_index("field")
    assert fields.loc["disk_signature", "value"] == struct.unpack_from("<I", raw, 440)[0]
    assert fields.loc["boot_signature", "raw"] == raw[510:512]
    assert (table.fields.offset + table.fields["size"]).max() == 512


def test_gpt_tables_and_fields(disks):
    disk = disks["gpt"]
    table = imgscope.open(disk.raw).partition_table()
    raw = disk.raw.read_bytes()
    head = table.tables["gpt_header"].set_index("field")
    assert head.loc["header_crc32", "raw"] == raw[528:532]
    assert head.loc["disk_guid", "value"] == DISK_GUID
    back = table.tables["gpt_backup_header"].set_index("field")
    assert back.loc["my_lba", "value"] == len(raw) // 512 - 1 == head.loc["alternate_lba", "value"]
    entries = table.tables["gpt_entries"]
    assert len(entries) == head.loc["num_partition_entries", "value"]
    assert entries.used.sum() == len(table.partitions)
    assert (entries.offset == 1024 + 128 * entries["index"]).all()
    used = entries[entries.used]
    sf = disk.sfdisk["partitiontable"]["partitions"]
    assert used.partition_type_guid.tolist() == [p["type"] for p in sf]
    assert used.unique_partition_guid.tolist() == [p["uuid"] for p in sf]
    assert used.legacy_bios_bootable.tolist() == ["LegacyBIOSBootable" in p.get("attrs", "") for p in sf]
    assert used.type_name.tolist()[:3] == ["EFI System", "Linux filesystem", "Linux swap"]


def test_missing_partition_number_names_the_existing_ones(disks):
    with imgscope.open(disks["mbr_lba_ext"].images["qcow2"]) as img:
        with pytest.raises(ImageError, match=r"partitions: 1, 2, 4, 5, 6"):
            img.partition(3)
        assert img.partitions().number.tolist() == [1, 2, 4, 5, 6]


def test_128_partitions_in_one_pass(tmp_path):
    """A full 128-entry GPT (sfdisk-made) decodes to what sfdisk reads back."""
    require_partition_tools()
    raw = tmp_path / "full.raw"
    with open(raw, "wb") as f:
        f.truncate(140 * MiB)
    lines = ["label: gpt", "unit: sectors", ""] + [
        f"start={2048 + i * 2048}, size=2048, type={'L' if i % 3 else 'S'}, name=\"p{i + 1}\""
        for i in range(128)]
    oracle.run(SFDISK, "-q", "--no-reread", "--no-tell-kernel", raw, input="\n".join(lines) + "\n")
    t0 = time.perf_counter()
    table = imgscope.open(raw).partition_table()
    frame = table.frame
    elapsed = time.perf_counter() - t0
    assert len(frame) == 128 and table.findings.empty
    assert table.to_sfdisk(device=str(raw)) == sfdisk_json(raw)
    assert elapsed < 60, elapsed    # a hang guard (milliseconds normally), not a benchmark


def test_short_entry_array_prints_table_length(tmp_path):
    """sfdisk adds "table-length" (a string) when the array has other than 128 entries."""
    require_partition_tools()
    raw = tmp_path / "short.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
    oracle.run(SGDISK, "-o", "-S", "64", "-n", "1:0:+1M", "-n", "64:0:+1M", "-t", "64:8e00", raw)
    table = imgscope.open(raw).partition_table()
    theirs = sfdisk_json(raw)
    assert "table-length" in theirs["partitiontable"]
    assert table.to_sfdisk(device=str(raw)) == theirs
    assert len(table.tables["gpt_entries"]) == 64 and table.frame.number.tolist() == [1, 64]


# =========================================================================== 4 KiB sectors (from the schema)


def build_gpt_4k(path: Path, n_sectors: int = 2048) -> dict[int, bytes]:
    """A GPT disk with 4096-byte logical sectors; returns partition number -> content."""
    ss = 4096
    n_entries, es = 128, 128
    array_sectors = n_entries * es // ss
    specs = [(1, 256, 511, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "four-k", 0),
             (3, 600, 999, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "esp", 1)]
    entries = np.zeros(n_entries, S.gpt_entry_dtype(es))
    content = {}
    for number, first, last, guid, name, attrs in specs:
        e = entries[number - 1]
        e["type_guid"] = np.void(uuid.UUID(guid).bytes_le)
        e["unique_guid"] = np.void(uuid.UUID(int=number).bytes_le)
        e["first_lba"], e["last_lba"], e["attributes"] = first, last, attrs
        units = np.frombuffer(name.encode("utf-16-le"), "<u2")
        e["name"][:units.size] = units
        content[number] = random.Random(f"4k:{number}").randbytes((last - first + 1) * ss)
    array = S.gpt_entries(n_entries, es).build(entries)

    def header(my, alt, entry_lba):
        h = dict(signature=S.GPT_SIGNATURE, revision=S.GPT_REVISION_1_0, header_size=92,
                 header_crc32=0, reserved=0, my_lba=my, alternate_lba=alt,
                 first_usable_lba=2 + array_sectors, last_usable_lba=n_sectors - 2 - array_sectors,
                 disk_guid=DISK_GUID, partition_entry_lba=entry_lba,
                 num_partition_entries=n_entries, sizeof_partition_entry=es,
                 partition_entry_array_crc32=zlib.crc32(array))
        data = S.gpt_header.build(h)
        h["header_crc32"] = zlib.crc32(data[:16] + bytes(4) + data[20:92])
        return S.gpt_header.build(h)

    pmbr = bytearray(512)
    pmbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, n_sectors - 1)
    pmbr[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.truncate(n_sectors * ss)
        for off, data in ((0, pmbr), (ss, header(1, n_sectors - 1, 2)), (2 * ss, array),
                          ((n_sectors - 1 - array_sectors) * ss, array),
                          ((n_sectors - 1) * ss, header(n_sectors - 1, 1, n_sectors - 1 - array_sectors))):
            f.seek(off)
            f.write(data)
        for (number, first, *_), data in zip(specs, content.values()):
            f.seek(first * ss)
            f.write(data)
    return content


def test_gpt_with_4096_byte_sectors(tmp_path):
    raw = tmp_path / "gpt4k.raw"
    content = build_gpt_4k(raw)
    qcow = tmp_path / "gpt4k.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", raw, qcow)
    for path in (raw, qcow):
        with imgscope.open(path) as img:
            table = img.partition_table()
            assert table.scheme == "gpt" and table.sector_size == 4096
            assert set(table.findings.code) == {"sector_size"}
            assert table.frame.number.tolist() == [1, 3]
            assert table.frame.name.tolist() == ["four-k", "esp"]
            assert table.frame.start.tolist() == [256 * 4096, 600 * 4096]
            assert table.to_sfdisk()["partitiontable"]["sectorsize"] == 4096
            for number, data in content.items():
                assert partition_sha(img.partition(number)) == hashlib.sha256(data).hexdigest()
    # the header is at byte 4096 and nothing at 512: the sector size comes from where it is
    with open(raw, "rb") as f:
        head = f.read(4104)
    assert head[512:520] != b"EFI PART" and head[4096:4104] == b"EFI PART"
    with imgscope.open(raw) as img:
        asked = read_partition_table(img.open_guest(), sector_size=4096)
        assert asked.sector_size == 4096 and asked.findings.empty


# =========================================================================== damaged disks


def damaged_copy(disk: Disk, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.raw"
    shutil.copyfile(disk.raw, path)
    return path


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def fix_gpt_crcs(path: Path) -> None:
    """Recompute both array and header CRCs of both GPT headers (plain struct/zlib)."""
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        for lba in (1, size // 512 - 1):
            f.seek(lba * 512)
            hdr = bytearray(f.read(92))
            entry_lba, count, esize = struct.unpack_from("<QII", hdr, 72)
            f.seek(entry_lba * 512)
            struct.pack_into("<I", hdr, 88, zlib.crc32(f.read(count * esize)))
            struct.pack_into("<I", hdr, 16, 0)
            struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr)))
            f.seek(lba * 512)
            f.write(hdr)


def fix_gpt_crcs_headers_only(path: Path) -> None:
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        for lba in (1, size // 512 - 1):
            f.seek(lba * 512)
            hdr = bytearray(f.read(92))
            struct.pack_into("<I", hdr, 16, 0)
            struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr)))
            f.seek(lba * 512)
            f.write(hdr)


def codes(table) -> set:
    return set(table.findings.code)


@pytest.mark.parametrize("where", ["header", "entries"])
def test_bad_primary_gpt_crc_uses_backup(disks, tmp_path, where):
    disk = disks["gpt"]
    path = damaged_copy(disk, tmp_path, f"bad_{where}")
    poke(path, 512 + 60 if where == "header" else 1024 + 40, b"\x7f")   # disk GUID / an LBA
    qcow = tmp_path / f"bad_{where}.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", path, qcow)
    theirs = sfdisk_json(path)                    # libfdisk falls back to the backup too
    with imgscope.open(qcow) as img:
        table = img.partition_table()
        crc = "gpt_header_crc" if where == "header" else "gpt_entry_array_crc"
        assert {crc, "gpt_backup_used"} == codes(table)
        assert table.used_header == "backup"
        assert table.to_sfdisk(device=str(path)) == theirs
        assert table.frame.name.tolist() == [p.get("name", "") for p in
                                             disk.sfdisk["partitiontable"]["partitions"]]
        assert {crc, "gpt_backup_used"} <= set(img.findings.code)
        bad = table.findings.set_index("code").loc[crc]
        assert 512 <= bad.guest_offset < 1024 and bad.structure == "gpt_header"
    with pytest.raises(ParseError):
        imgscope.open(qcow, strict=True).partition_table()


def test_bad_backup_gpt_keeps_primary(disks, tmp_path):
    disk = disks["gpt"]
    path = damaged_copy(disk, tmp_path, "bad_backup")
    poke(path, path.stat().st_size - 512 + 60, b"\x7f")
    table = imgscope.open(path).partition_table()
    assert table.used_header == "primary" and len(table.partitions) == len(disk.expected)
    assert {"gpt_header_crc", "gpt_backup_invalid"} == codes(table)
    assert table.findings.set_index("code").loc["gpt_header_crc"].structure == "gpt_backup_header"


def test_both_gpt_headers_bad_reads_the_protective_mbr(disks, tmp_path):
    disk = disks["gpt"]
    path = damaged_copy(disk, tmp_path, "bad_both")
    poke(path, 512, b"XXX")
    poke(path, path.stat().st_size - 512, b"XXX")
    table = imgscope.open(path).partition_table()
    assert table.scheme == "mbr" and {"gpt_signature", "gpt_invalid"} <= codes(table)
    assert table.frame.type.tolist() == ["ee"]
    assert table.to_sfdisk(device=str(path)) == sfdisk_json(path)    # fdisk falls back to dos too


def test_ebr_loop(disks, tmp_path):
    disk = disks["mbr"]
    path = damaged_copy(disk, tmp_path, "loop")
    theirs = disk.sfdisk["partitiontable"]
    ext_start = next(p["start"] for p in theirs["partitions"] if p["type"] == "5")
    table = imgscope.open(disk.raw).partition_table()
    last_ebr = int(table.tables[[n for n in table.tables if n.startswith("ebr[")][-1]].ebr_lba[0])
    # the last EBR's link entry points back at the first EBR (relative 0)
    poke(path, last_ebr * 512 + 462, struct.pack("<B3sB3sII", 0, bytes(3), 5, bytes(3), 0, 2048))
    t0 = time.perf_counter()
    with imgscope.open(path) as img:
        table = img.partition_table()
        assert time.perf_counter() - t0 < 60   # a hang guard, not a benchmark
        assert codes(table) == {"ebr_loop"}
        loop = table.findings.set_index("code").loc["ebr_loop"]
        assert loop.guest_offset == ext_start * 512
        assert table.frame.number.tolist() == [1, 2, 3, 4, 5, 6, 7]   # every logical, once
        for number in (5, 6, 7):
            assert partition_sha(img.partition(number)) == disk.expected[number]


def test_ebr_self_loop_and_long_chain():
    """An EBR linking to itself; a chain of 150 links without data (Linux stops at 100)."""
    disk = bytearray(4 * MiB)
    disk[446:462] = struct.pack("<B3sB3sII", 0, bytes(3), 0x0F, bytes(3), 2048, 4000)
    disk[510:512] = b"\x55\xaa"
    for i in range(150):                          # EBR i at 2048 + i links to 2048 + i + 1
        off = (2048 + i) * 512
        disk[off + 462:off + 478] = struct.pack("<B3sB3sII", 0, bytes(3), 5, bytes(3), i + 1, 1)
        disk[off + 510:off + 512] = b"\x55\xaa"
    table = read_partition_table(MemoryDisk(disk), path="chain")
    assert codes(table) == {"ebr_chain_too_long"} and table.frame.number.tolist() == [1]
    off = 2048 * 512 + 462
    disk[off:off + 16] = struct.pack("<B3sB3sII", 0, bytes(3), 5, bytes(3), 0, 1)
    table = read_partition_table(MemoryDisk(disk), path="self")
    assert codes(table) == {"ebr_loop"}


def test_partition_beyond_the_disk_is_clipped(disks, tmp_path):
    disk = disks["mbr"]
    path = damaged_copy(disk, tmp_path, "beyond")
    size = path.stat().st_size
    p4 = disk.sfdisk["partitiontable"]["partitions"][3]
    poke(path, 494 + 12, struct.pack("<I", 0x00FFFFFF))      # partition 4 grows to 8 GiB
    qcow = tmp_path / "beyond.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", path, qcow)
    with imgscope.open(qcow) as img:
        table = img.partition_table()
        assert codes(table) == {"partition_beyond_disk"}
        assert table.findings.guest_offset.tolist() == [494]
        part = img.partition(4)
        assert part.clipped and part.size == 0x00FFFFFF * 512
        assert table.to_sfdisk(device=str(path)) == sfdisk_json(path)   # sfdisk lists it too
        with part.open() as f:
            assert f.seek(0, os.SEEK_END) == size - p4["start"] * 512 == part.readable
            f.seek(part.readable - 4096)
            with open(path, "rb") as raw:
                raw.seek(size - 4096)
                assert f.read(8192) == raw.read()           # the disk's last bytes, no more
    # GPT: an entry whose ending LBA is past the disk (CRCs recomputed, so only the entry lies)
    gpt = damaged_copy(disks["gpt"], tmp_path, "gpt_beyond")
    n_lba = gpt.stat().st_size // 512
    for entry_lba in (2, n_lba - 33):
        poke(gpt, entry_lba * 512 + 2 * 128 + 40, struct.pack("<Q", n_lba + 1000))   # partition 3
    fix_gpt_crcs(gpt)
    table = imgscope.open(gpt).partition_table()
    assert {"partition_beyond_disk", "gpt_entry_outside_usable", "partition_overlap"} == codes(table)
    assert table.frame.set_index("number").clipped.to_dict()[3] is True
    assert table.partition(3).open().seek(0, os.SEEK_END) == \
        gpt.stat().st_size - table.partition(3).start


def test_no_partition_table(disks, tmp_path):
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(8 * MiB)
        f.write(random.Random(1).randbytes(4096))         # data, but no 55 AA
    qcow = tmp_path / "blank.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", blank, qcow)
    for path in (blank, qcow):
        with imgscope.open(path) as img:
            table = img.partition_table()
            assert table.scheme == "none" and table.frame.empty
            assert list(img.partitions().columns) == FRAME_COLUMNS
            assert codes(table) == {"no_partition_table"}
            with pytest.raises(ImageError, match="partitions: none"):
                img.partition(1)
            with pytest.raises(ImageError):
                table.to_sfdisk()
    assert subprocess.run([SFDISK, "--json", blank], capture_output=True).returncode != 0
    # a valid signature with a bad boot indicator is no table either (Linux: FAT boot sector?)
    path = damaged_copy(disks["mbr"], tmp_path, "bootflag")
    poke(path, 446, b"\x7f")
    table = imgscope.open(path).partition_table()
    assert table.scheme == "none" and codes(table) == {"mbr_boot_indicator"}


def test_lying_gpt_counts_are_refused(disks, tmp_path):
    path = damaged_copy(disks["gpt"], tmp_path, "huge")
    n_lba = path.stat().st_size // 512
    for lba in (1, n_lba - 1):
        poke(path, lba * 512 + 80, struct.pack("<I", 0xFFFFFFFF))      # num_partition_entries
    fix_gpt_crcs_headers_only(path)
    t0 = time.perf_counter()
    table = imgscope.open(path).partition_table()
    assert time.perf_counter() - t0 < 60   # a hang guard, not a benchmark
    assert {"gpt_entry_array_too_large", "gpt_invalid"} <= codes(table)
    assert table.scheme == "mbr"


# =========================================================================== mutation fuzz


class MemoryDisk(PositionalReader):
    """A guest disk in memory (bytes), for tables built or mutated by the tests."""

    def __init__(self, data) -> None:
        super().__init__()
        self.data = np.frombuffer(bytes(data), np.uint8)
        self.size = self.data.size

    def pread_into(self, offset: int, out: np.ndarray) -> None:
        assert 0 <= offset and offset + out.size <= self.size, "read outside the disk"
        out[:] = self.data[offset:offset + out.size]


class PatchedDisk(PositionalReader):
    """A raw disk file with a few mutated byte ranges laid over it (no copy of the disk)."""

    def __init__(self, path: Path, patches: dict[int, bytes]) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.patches = patches

    def pread_into(self, offset: int, out: np.ndarray) -> None:
        assert 0 <= offset and offset + out.size <= self.size, "read outside the disk"
        out[:] = np.frombuffer(os.pread(self.fd, out.size, offset), np.uint8)
        for at, data in self.patches.items():
            lo, hi = max(at, offset), min(at + len(data), offset + out.size)
            if lo < hi:
                out[lo - offset:hi - offset] = np.frombuffer(data[lo - at:hi - at], np.uint8)

    def close(self) -> None:
        os.close(self.fd)
        super().close()


def exercise(table) -> None:
    """Touch every member a consumer would."""
    table.frame, table.fields, table.findings
    for name in table.tables:
        table.tables[name]
    try:
        json.dumps(table.to_sfdisk())
    except ImageError:
        pass
    for part in table.partitions:
        with part.open() as f:
            f.read(4096)
            f.seek(max(0, part.readable - 4096))
            f.read(8192)


def test_mutated_tables_give_findings_only(disks):
    """Random byte changes in the MBR, EBRs, GPT headers and entries (with and without
    fixed-up CRCs): only ImageError may leave, every read stays inside the disk."""
    rnd = random.Random(2024)
    mbr, gpt = disks["mbr"], disks["gpt"]
    mbr_table = imgscope.open(mbr.raw).partition_table()
    ebr_offsets = [int(mbr_table.tables[n].ebr_lba[0]) * 512 for n in mbr_table.tables if n.startswith("ebr[")]
    gpt_size = gpt.raw.stat().st_size
    targets = [(mbr, 446, 66)] + [(mbr, o + 446, 66) for o in ebr_offsets] + \
        [(gpt, 446, 66), (gpt, 512, 92), (gpt, 1024, 6 * 128), (gpt, gpt_size - 512, 92)]
    t0 = time.perf_counter()
    for i in range(400):
        disk, base, span = rnd.choice(targets)
        with open(disk.raw, "rb") as f:
            f.seek(base)
            region = bytearray(f.read(span))
        for _ in range(rnd.randint(1, 6)):
            k = rnd.randrange(span)
            region[k] = rnd.choice([0, 0xFF, 0x80, 0x05, 0x0F, 0xEE, rnd.randrange(256)])
        patch = {base: bytes(region)}
        if disk is gpt and rnd.random() < 0.5 and base in (512, gpt_size - 512):
            hdr = bytearray(region)                           # a lie with a valid CRC
            struct.pack_into("<I", hdr, 16, 0)
            struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr)))
            patch = {base: bytes(hdr)}
        reader = PatchedDisk(disk.raw, patch)
        try:
            exercise(read_partition_table(reader, path=f"mutation {i}"))
        except ImageError:
            pass
        finally:
            reader.close()
    assert time.perf_counter() - t0 < 120   # a hang guard, not a benchmark
