"""Tests for imgscope.formats.probe: hand-built headers, qemu-img images, robustness."""
from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest


def _load_probe():
    """Import the module normally; fall back to its file path if the package is broken."""
    try:
        return importlib.import_module("imgscope.formats.probe")
    except Exception:  # the rest of the package may be half-written
        path = Path(__file__).resolve().parents[1] / "imgscope" / "formats" / "probe.py"
        spec = importlib.util.spec_from_file_location("_imgscope_probe_under_test", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses need the module registered
        spec.loader.exec_module(mod)
        return mod


probe = _load_probe()
probe_bytes = probe.probe_bytes

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def run(data: bytes, name: str = "", size: int | None = None, tail: bytes | None = None):
    """Probe an in-memory file the way a caller reading head/tail would."""
    size = len(data) if size is None else size
    head = data[:probe.HEAD_SIZE]
    if tail is None:
        tail = data[-probe.TAIL_SIZE:] if data else b""
    return probe_bytes(head, tail, size, name)


def run_file(path: Path):
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(probe.HEAD_SIZE)
        fh.seek(max(0, size - probe.TAIL_SIZE))
        tail = fh.read()
    return probe_bytes(head, tail, size, path.name)


def check_invariants(cands):
    assert cands, "probe must always return at least raw"
    assert cands[-1].format == "raw" and cands[-1].score == 1
    assert [c.format for c in cands].count("raw") == 1
    scores = [c.score for c in cands]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= s <= 100 for s in scores)
    assert len({c.format for c in cands}) == len(cands)
    assert all(isinstance(c.reason, str) and c.reason for c in cands)


def top(data: bytes, **kw):
    cands = run(data, **kw)
    check_invariants(cands)
    return cands[0]


def formats(data: bytes, **kw):
    cands = run(data, **kw)
    check_invariants(cands)
    return [c.format for c in cands]


# --- hand-built headers (offsets from the spec notes) ----------------------

def qcow2_header(version: int = 3, cluster_bits: int = 16) -> bytes:
    # qcow2.md §3: big-endian; v2 = 72 bytes, v3 = header_length (112 from QEMU 7.2)
    hdr = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", version, 0, 0, cluster_bits,
                      10 << 20, 0, 1, 3 << cluster_bits, 1 << cluster_bits, 1, 0, 0)
    assert len(hdr) == 72
    if version >= 3:
        hdr += struct.pack(">QQQII", 0, 0, 0, 4, 112) + bytes(8)
    return hdr.ljust(3 << cluster_bits if cluster_bits <= 12 else 4096, b"\0")


def qcow1_header() -> bytes:
    # qcow.md §2: 48 bytes, cluster_bits u8 @32, l2_bits u8 @33, L1 at 48
    hdr = struct.pack(">4sIQIIQBBHIQ", b"QFI\xfb", 1, 0, 0, 0, 10 << 20, 12, 9, 0, 0, 48)
    assert len(hdr) == 48
    return hdr + bytes(512)


def cow_header(version: int = 2, size: int = 1 << 20) -> bytes:
    # cow.md §1 x86-64 layout: magic, version, char[1024], mtime, pad, u64 size, u32 512, pad
    hdr = struct.pack(">4sI1024si4xQI4x", b"OOOM", version, b"base.img", 0, size, 512)
    assert len(hdr) == 1056
    bitmap = bytes(((size // 512) + 7) // 8)
    return hdr + bitmap


def kdmv_header(version=1, flags=0x3, capacity=20480, desc_off=1, desc_size=20,
                compress=0, newline=b"\n \r\n", descriptor: bytes | None = None) -> bytes:
    # vmdk.md §4: struct '<4sIIQQQQIQQQB4sH' then 433 pad bytes
    hdr = struct.pack("<4sIIQQQQIQQQB4sH", b"KDMV", version, flags, capacity, 128,
                      desc_off, desc_size, 512, 21, 26, 128, 0, newline, compress)
    hdr = hdr.ljust(512, b"\0")
    if descriptor is not None:
        hdr += descriptor.ljust(desc_size * 512, b"\0")
    return hdr + bytes(4096)


def cowd_header() -> bytes:
    # vmdk.md §8: 2048-byte little-endian header
    return struct.pack("<4sIIIIIII", b"COWD", 1, 3, 20480, 1, 4, 5, 100).ljust(2048, b"\0")


def sesparse_header() -> bytes:
    # vmdk.md §9
    return struct.pack("<QQQQQQ", 0xCAFEBABE, 0x0000000200000001, 20480, 8, 64, 0).ljust(512, b"\0")


def vdi_header(version=0x00010001) -> bytes:
    # vdi.md §2/§3: banner, LE signature @0x40, version @0x44, cbHeader @0x48 ...
    banner = b"<<< Oracle VirtualBox Disk Image >>>\n".ljust(64, b"\0")
    hdr = banner + struct.pack("<III", 0xBEDA107F, version, 384)
    hdr += struct.pack("<II", 1, 0) + bytes(256)                 # type, flags, comment
    hdr += struct.pack("<II", 0x200, 0x400) + struct.pack("<IIIII", 0, 0, 0, 512, 0)
    hdr += struct.pack("<QIIII", 10 << 20, 1 << 20, 0, 10, 0)
    hdr = hdr.ljust(512, b"\0") + b"\xff" * 40
    return hdr.ljust(1024, b"\0")


def vhd_footer(disk_type: int, size: int = 10 << 20, data_offset: int | None = None) -> bytes:
    # vhd.md A2 footer, A2.1 checksum (one's complement of the byte sum)
    if data_offset is None:
        data_offset = 0xFFFFFFFFFFFFFFFF if disk_type == 2 else 512
    f = struct.pack(">8sIIQI4sI4sQQHBBII16sB", b"conectix", 2, 0x00010000, data_offset, 0,
                    b"qemu", 0x00050003, b"Wi2k", size, size, 304, 4, 17, disk_type, 0,
                    bytes(range(16)), 0).ljust(512, b"\0")
    csum = (~sum(f)) & 0xFFFFFFFF
    return f[:64] + struct.pack(">I", csum) + f[68:]


def lvm_crc(data: bytes) -> int:
    # lvm2.md §2.2
    return zlib.crc32(data, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def lvm_label(sector: int = 1, sector_xl: int | None = None, good_crc: bool = True) -> bytes:
    # lvm2.md §2.1/§2.3: label header + PV header (uuid, size, one data area, one mda)
    sector_xl = sector if sector_xl is None else sector_xl
    body = struct.pack("<I8s", 32, b"LVM2 001")
    body += b"Uw7ssSJaP6gCDBMaQ2JW92qofqYGVWoh" + struct.pack("<Q", 64 << 20)
    body += struct.pack("<QQQQ", 1 << 20, 0, 0, 0) + struct.pack("<QQQQ", 4096, 1044480, 0, 0)
    body = body.ljust(512 - 20, b"\0")
    crc = lvm_crc(body) if good_crc else lvm_crc(body) ^ 1
    label = b"LABELONE" + struct.pack("<QI", sector_xl, crc) + body
    assert len(label) == 512
    disk = bytearray(4096)
    disk[sector * 512:(sector + 1) * 512] = label
    return bytes(disk)


OVF_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
           b'<!-- exported -->\n'
           b'<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
           b'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">\n'
           b'  <References><File ovf:id="file1" ovf:href="disk1.vmdk"/></References>\n'
           b'</Envelope>\n')


def tar_bytes(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


VMX_TEXT = (b'.encoding = "UTF-8"\n'
            b'config.version = "8"\n'
            b'virtualHW.version = "19"\n'
            b'displayName = "web01"\n'
            b'memsize = "2048"\n'
            b'scsi0:0.fileName = "web01.vmdk"\n')

DESCRIPTOR = (b'# Disk DescriptorFile\n'
              b'version=1\n'
              b'CID=ae553db\n'
              b'parentCID=ffffffff\n'
              b'createType="monolithicFlat"\n'
              b'\n'
              b'# Extent description\n'
              b'RW 2048 FLAT "d-flat.vmdk" 0\n'
              b'\n'
              b'# The Disk Data Base\n'
              b'#DDB\n'
              b'\n'
              b'ddb.virtualHWVersion = "4"\n'
              b'ddb.adapterType = "ide"\n')


# ---------------------------------------------------------------------------
# qcow / qcow2
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", [2, 3])
def test_qcow2_hand_built(version):
    c = top(qcow2_header(version))
    assert (c.format, c.score) == ("qcow2", 100)
    assert f"version at offset 4 is {version}" in c.reason


def test_qcow2_unknown_future_version_is_lower_and_says_so():
    c = top(qcow2_header(7))
    assert c.format == "qcow2" and 1 < c.score < 100
    assert "unknown" in c.reason and "7" in c.reason


def test_qcow2_bad_cluster_bits_lowers_score():
    c = top(qcow2_header(3, cluster_bits=30))
    assert c.format == "qcow2" and c.score < 100 and "cluster_bits" in c.reason


def test_qcow_v1_hand_built():
    c = top(qcow1_header())
    assert (c.format, c.score) == ("qcow", 100)


def test_qcow_magic_with_version_zero_is_weak():
    data = b"QFI\xfb" + bytes(100)
    c = top(data)
    assert c.format == "qcow2" and c.score <= 20


def test_qcow2_truncated_header():
    c = top(b"QFI\xfb\x00\x00\x00\x03")
    assert c.format == "qcow2" and c.score < 100 and "truncated" in c.reason
    assert formats(b"QFI") == ["raw"]


# ---------------------------------------------------------------------------
# cow
# ---------------------------------------------------------------------------

def test_cow_hand_built():
    c = top(cow_header())
    assert (c.format, c.score) == ("cow", 100)
    assert "OOOM" in c.reason


def test_cow_shorter_than_header():
    c = top(cow_header()[:600])
    assert c.format == "cow" and c.score < 100 and "shorter" in c.reason


def test_cow_i386_sized_header_accepted():
    assert top(cow_header()[:1048]).score == 100


def test_uml_cow_v3_is_weak():
    data = bytearray(cow_header())
    data[4:8] = struct.pack(">I", 3)
    c = top(bytes(data))
    assert c.format == "cow" and c.score <= 20 and "User-Mode-Linux" in c.reason


# ---------------------------------------------------------------------------
# vmdk
# ---------------------------------------------------------------------------

def test_kdmv_monolithic_sparse_with_embedded_descriptor():
    desc = DESCRIPTOR.replace(b"monolithicFlat", b"monolithicSparse")
    c = top(kdmv_header(descriptor=desc))
    assert (c.format, c.score) == ("vmdk", 100)
    assert "KDMV" in c.reason and "monolithicSparse" in c.reason


def test_kdmv_stream_optimized_flags():
    c = top(kdmv_header(version=3, flags=0x30003, compress=1))
    assert (c.format, c.score) == ("vmdk", 100) and "streamOptimized" in c.reason


def test_kdmv_text_mode_damage_detected():
    c = top(kdmv_header(newline=b"\n \n\n"))
    assert c.format == "vmdk" and c.score < 100 and "text-mode" in c.reason


def test_kdmv_bad_version():
    c = top(kdmv_header(version=9))
    assert c.format == "vmdk" and c.score < 100


def test_cowd():
    c = top(cowd_header())
    assert (c.format, c.score) == ("vmdk", 100) and "COWD" in c.reason


def test_sesparse():
    c = top(sesparse_header())
    assert c.format == "vmdk" and 1 < c.score < 100 and "seSparse" in c.reason


def test_text_descriptor_qemu_rule():
    c = top(DESCRIPTOR, name="d.vmdk")
    assert (c.format, c.score) == ("vmdk", 100) and "monolithicFlat" in c.reason


def test_text_descriptor_nul_padded_like_qemu_img_convert():
    assert top(DESCRIPTOR.ljust(1024, b"\0")).score == 100


def test_text_descriptor_crlf_and_space_lines():
    data = b"   \r\n" + DESCRIPTOR.replace(b"\n", b"\r\n")
    assert (top(data).format, top(data).score) == ("vmdk", 100)


@pytest.mark.parametrize("data", [
    b"\n" + DESCRIPTOR,                                   # empty line: QEMU says no
    DESCRIPTOR.replace(b"version=1", b"version = 1"),     # spaces around '='
    b"\xef\xbb\xbf" + DESCRIPTOR,                         # UTF-8 BOM
    DESCRIPTOR.replace(b"# Disk DescriptorFile\nversion=1\n", b"#Disk Descriptor File\n"),
])
def test_text_descriptor_heuristic_below_qemu_rule(data):
    c = top(data)
    assert c.format == "vmdk" and 50 <= c.score < 100
    assert "-f vmdk" in c.reason


def test_plain_ini_file_with_version_line_is_not_vmdk():
    assert formats(b"[main]\nversion=1\nname=x\n") == ["raw"]


# ---------------------------------------------------------------------------
# vdi
# ---------------------------------------------------------------------------

def test_vdi_hand_built():
    c = top(vdi_header())
    assert (c.format, c.score) == ("vdi", 100) and "0xBEDA107F" in c.reason


def test_vdi_v0_and_unknown_version():
    assert top(vdi_header(0x00000002)).score < 100
    c = top(vdi_header(0x00020000))
    assert c.format == "vdi" and c.score < 100 and "unknown version" in c.reason


def test_vdi_truncated():
    c = top(vdi_header()[:0x46])
    assert c.format == "vdi" and c.score < 100


# ---------------------------------------------------------------------------
# vpc / vhdx
# ---------------------------------------------------------------------------

def dynamic_vhd() -> bytes:
    footer = vhd_footer(3)
    dyn = struct.pack(">8sQQIII", b"cxsparse", 0xFFFFFFFFFFFFFFFF, 1536, 0x00010000, 5,
                      0x200000).ljust(1024, b"\0")
    return footer + dyn + b"\xff" * 512 + footer


def test_vpc_dynamic_hand_built():
    c = top(dynamic_vhd())
    assert (c.format, c.score) == ("vpc", 100) and "dynamic" in c.reason


def test_vpc_bad_checksum_lowers_score():
    data = bytearray(dynamic_vhd())
    data[70] ^= 0xFF
    c = top(bytes(data))
    assert c.format == "vpc" and c.score < 100 and "checksum" in c.reason


def test_vpc_fixed_footer_found_in_tail():
    size = 1 << 20
    data = os.urandom(size) + vhd_footer(2, size=size)
    c = top(data)
    assert (c.format, c.score) == ("vpc", 100)
    assert "fixed" in c.reason and str(size) in c.reason


def test_vpc_fixed_footer_only_tail_given():
    """The head is not the whole file: the footer must come from `tail`."""
    size = 4 << 20
    tail = os.urandom(512) + vhd_footer(2, size=size)
    c = probe_bytes(bytes(probe.HEAD_SIZE), tail, size + 512)[0]
    assert (c.format, c.score) == ("vpc", 100)


def test_vpc_511_byte_footer():
    data = bytes(4096) + vhd_footer(2, size=4096)[:511]
    c = top(data)
    assert c.format == "vpc" and "511" in c.reason


def test_vhdx():
    data = b"vhdxfile" + "QEMU v7.2".encode("utf-16-le") + bytes(1000)
    c = top(data)
    assert (c.format, c.score) == ("vhdx", 100)


# ---------------------------------------------------------------------------
# lvm2
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sector", [0, 1, 2, 3])
def test_lvm2_label_any_of_first_four_sectors(sector):
    c = top(lvm_label(sector))
    assert (c.format, c.score) == ("lvm2", 100) and f"sector {sector}" in c.reason


def test_lvm2_label_wrong_sector_or_crc():
    c = top(lvm_label(1, sector_xl=5))
    assert c.format == "lvm2" and c.score < 100 and "sector_xl" in c.reason
    c = top(lvm_label(1, good_crc=False))
    assert c.format == "lvm2" and c.score < 100 and "CRC" in c.reason


def test_lvm2_label_in_sector_four_ignored():
    data = bytes(512 * 4) + lvm_label(0)[:512]
    assert formats(data) == ["raw"]


# ---------------------------------------------------------------------------
# ova / ovf / vmx
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_ova_descriptor_first(fmt):
    data = tar_bytes([("vm.ovf", OVF_XML), ("disk1.vmdk", kdmv_header()),
                      ("vm.mf", b"SHA256(vm.ovf)= 00\n")], fmt)
    c = top(data, name="vm.ova")
    assert (c.format, c.score) == ("ova", 100) and "vm.ovf" in c.reason


def test_ova_long_member_name_gnu_and_pax():
    long = "d" * 150 + ".ovf"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        c = top(tar_bytes([(long, OVF_XML)], fmt))
        assert (c.format, c.score) == ("ova", 100)


def test_ova_descriptor_not_first():
    data = tar_bytes([("vm.mf", b"x\n"), ("vm.ovf", OVF_XML)])
    c = top(data)
    assert c.format == "ova" and 1 < c.score < 100 and "first" in c.reason


def test_plain_tar_is_not_ova():
    assert formats(tar_bytes([("a.txt", b"hello\n")]), name="a.tar") == ["raw"]
    c = top(tar_bytes([("a.txt", b"hello\n")]), name="a.ova")
    assert c.format == "ova" and c.score <= 30


def test_ovf_default_namespace():
    c = top(OVF_XML, name="vm.ovf")
    assert (c.format, c.score) == ("ovf", 100) and "envelope/1" in c.reason


def test_ovf_prefixed_root_and_ovf2():
    data = (b'<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2" '
            b'xmlns:rasd="x"><ovf:References/></ovf:Envelope>')
    assert (top(data).format, top(data).score) == ("ovf", 100)


def test_ovf_utf16_with_bom():
    data = b"\xff\xfe" + OVF_XML.decode().encode("utf-16-le")
    assert top(data).format == "ovf"


def test_soap_envelope_is_not_ovf():
    data = (b'<?xml version="1.0"?><soap:Envelope '
            b'xmlns:soap="http://www.w3.org/2003/05/soap-envelope"></soap:Envelope>')
    assert formats(data) == ["raw"]


def test_vmx_keys():
    c = top(VMX_TEXT)
    assert (c.format, c.score) == ("vmx", 100) and "virtualHW.version" in c.reason


def test_vmx_by_name_only():
    c = top(b'displayName = "x"\nmemsize = "512"\n', name="X.VMX")
    assert c.format == "vmx" and c.score < 90


def test_vmdk_descriptor_named_vmx_stays_vmdk():
    fmts = formats(DESCRIPTOR, name="oops.vmx")
    assert fmts[0] == "vmdk" and "vmx" not in fmts


def test_binary_vmdk_named_vmx_is_not_vmx():
    assert "vmx" not in formats(kdmv_header(), name="oops.vmx")


# ---------------------------------------------------------------------------
# raw fallback, negatives, robustness
# ---------------------------------------------------------------------------

@pytest.mark.usefixtures("strict_probes")
def test_random_bytes_are_raw_only():
    rng = random.Random(1234)
    for _ in range(50):
        data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 600, 5000])))
        assert formats(data) == ["raw"]


def test_empty_file():
    cands = probe_bytes(b"", b"", 0)
    assert [c.format for c in cands] == ["raw"]


def test_mbr_noted_in_raw_reason():
    data = bytearray(1024)
    data[510:512] = b"\x55\xaa"
    c = top(bytes(data))
    assert c.format == "raw" and "55 AA" in c.reason


def test_zero_head_with_file_size_larger_than_head():
    cands = probe_bytes(bytes(probe.HEAD_SIZE), bytes(1024), 10 << 30)
    assert [c.format for c in cands] == ["raw"]


SAMPLES = {
    "qcow2": qcow2_header(3), "qcow2v2": qcow2_header(2), "qcow": qcow1_header(),
    "cow": cow_header(), "kdmv": kdmv_header(descriptor=DESCRIPTOR), "cowd": cowd_header(),
    "sesparse": sesparse_header(), "desc": DESCRIPTOR, "vdi": vdi_header(),
    "vpc": dynamic_vhd(), "vpcfixed": bytes(2048) + vhd_footer(2, size=2048),
    "lvm2": lvm_label(1), "ova": tar_bytes([("vm.ovf", OVF_XML)]), "ovf": OVF_XML,
    "vmx": VMX_TEXT,
}


@pytest.fixture
def strict_probes(monkeypatch):
    """Let exceptions escape individual probes instead of being swallowed."""
    monkeypatch.setattr(probe, "_STRICT", True)


@pytest.mark.usefixtures("strict_probes")
@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_every_truncation_is_safe(key):
    data = SAMPLES[key]
    step = max(1, len(data) // 400)
    for n in list(range(0, min(len(data), 1100))) + list(range(0, len(data) + 1, step)):
        cut = data[:n]
        check_invariants(probe_bytes(cut, cut[-1024:], n, "x.vmx"))
        # inconsistent caller input must not raise either
        check_invariants(probe_bytes(cut, b"", n + 10**9))
        check_invariants(probe_bytes(cut, cut[:3], 0))


@pytest.mark.usefixtures("strict_probes")
@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_random_corruption_is_safe(key):
    rng = random.Random(key)
    data = SAMPLES[key]
    for _ in range(200):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(buf), 2048))
            buf[i] = rng.getrandbits(8)
        check_invariants(probe_bytes(bytes(buf), bytes(buf[-1024:]), len(buf), "a.ova"))


def test_accepts_bytearray_and_memoryview():
    data = qcow2_header()
    assert probe_bytes(bytearray(data), memoryview(data[-1024:]), len(data))[0].format == "qcow2"


def test_candidate_is_frozen():
    c = probe.Candidate("raw", 1, "x")
    with pytest.raises(Exception):
        c.score = 5


# ---------------------------------------------------------------------------
# real images from qemu-img
# ---------------------------------------------------------------------------

def qemu_img(*args):
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)


def qemu_probe(path: Path) -> str | None:
    """The format qemu-img itself probes (None if it cannot open the file)."""
    r = subprocess.run([QEMU_IMG, "info", "--output=json", str(path)],
                       capture_output=True, text=True)
    return json.loads(r.stdout)["format"] if r.returncode == 0 else None


REAL = [
    # (file, qemu-img create args, our top format, what qemu-img's probe says)
    ("a.qcow2", ["-f", "qcow2"], "qcow2", "qcow2"),
    ("v2.qcow2", ["-f", "qcow2", "-o", "compat=0.10"], "qcow2", "qcow2"),
    ("a.qcow", ["-f", "qcow"], "qcow", "qcow"),
    ("sparse.vmdk", ["-f", "vmdk", "-o", "subformat=monolithicSparse"], "vmdk", "vmdk"),
    ("stream.vmdk", ["-f", "vmdk", "-o", "subformat=streamOptimized"], "vmdk", "vmdk"),
    ("flat.vmdk", ["-f", "vmdk", "-o", "subformat=monolithicFlat"], "vmdk", "vmdk"),
    ("split.vmdk", ["-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"], "vmdk", "vmdk"),
    ("a.vdi", ["-f", "vdi"], "vdi", "vdi"),
    ("dyn.vhd", ["-f", "vpc"], "vpc", "vpc"),
    ("fixed.vhd", ["-f", "vpc", "-o", "subformat=fixed"], "vpc", "raw"),
    ("a.vhdx", ["-f", "vhdx"], "vhdx", "vhdx"),
    ("a.raw", ["-f", "raw"], "raw", "raw"),
]


@needs_qemu
@pytest.mark.parametrize("fname,args,expected,qemu_says", REAL, ids=[r[0] for r in REAL])
def test_qemu_img_created_images(tmp_path, fname, args, expected, qemu_says):
    path = tmp_path / fname
    qemu_img("create", "-q", *args, str(path), "10M")
    cands = run_file(path)
    check_invariants(cands)
    assert cands[0].format == expected
    if expected != "raw":
        assert cands[0].score == 100
        assert [c.format for c in cands] == [expected, "raw"]
    assert qemu_probe(path) == qemu_says


@needs_qemu
def test_qemu_img_side_files(tmp_path):
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
             str(tmp_path / "f.vmdk"), "10M")
    assert [c.format for c in run_file(tmp_path / "f-flat.vmdk")] == ["raw"]
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
             str(tmp_path / "t.vmdk"), "10M")
    c = run_file(tmp_path / "t-s001.vmdk")[0]
    assert c.format == "vmdk" and "split" in c.reason


@needs_qemu
def test_qemu_img_convert_padded_descriptor(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x42" * 4096 + bytes(1 << 20))
    dst = tmp_path / "conv.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", str(src), str(dst))
    c = run_file(dst)[0]
    assert (c.format, c.score) == ("vmdk", 100)


@needs_qemu
@pytest.mark.parametrize("prefix,body_transform", [
    (b"", lambda b: b),
    (b"\n", lambda b: b),
    (b"   \r\n", lambda b: b),
    (b"", lambda b: b.replace(b"\n", b"\r\n")),
    (b"", lambda b: b.replace(b"version=1", b"version = 1")),
    (b"", lambda b: b.replace(b"version=1", b"version=4")),
    (b"\xef\xbb\xbf", lambda b: b),
    (b"", lambda b: b.replace(b"# Disk DescriptorFile\n", b"  # indented comment\n")),
], ids=["plain", "empty-line", "space-line", "crlf", "spaced-eq", "v4", "bom", "indent"])
def test_vmdk_text_rule_matches_qemu(tmp_path, prefix, body_transform):
    """Our port of QEMU's text probe gives 100 exactly when qemu-img says vmdk."""
    (tmp_path / "d-flat.vmdk").write_bytes(bytes(2048 * 512))
    path = tmp_path / "d.vmdk"
    path.write_bytes(prefix + body_transform(DESCRIPTOR))
    ours = run_file(path)[0]
    qemu_says_vmdk = qemu_probe(path) == "vmdk"
    assert (ours.format == "vmdk" and ours.score == 100) == qemu_says_vmdk
