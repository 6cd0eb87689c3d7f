"""Partition tables inside a guest disk: MBR, EBR chain, protective MBR and GPT.

* ``mbr``: the 512-byte master boot record at LBA 0 (an EBR has the same layout).
* ``mbr_entry`` / ``MBR_ENTRY_DTYPE``: the four 16-byte partition entries, as a
  record (field rows) and as a numpy table (all four decoded at once).
* ``gpt_header``: the GPT header at LBA 1 (backup at the last LBA).
* ``gpt_entry_dtype`` / ``gpt_entries``: the partition entry array as one numpy
  table, whatever the entry size (128 * 2^k bytes).
* Names for MBR type bytes, GPT type GUIDs and GPT attribute bits, CHS decoding
  and the CRC-32 both GPT checksums use.

Field names follow the UEFI specification and Linux (``block/partitions``).
All integers are little endian; GUIDs are stored mixed-endian (u32, u16, u16
little endian, then 8 bytes as they are).
"""
from __future__ import annotations

import uuid
import zlib

import construct as cs
import numpy as np

from ._types import NumpyArray, enum, flags

SECTOR = 512
MBR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"
MBR_ENTRIES_OFFSET = 446
MBR_ENTRY_SIZE = 16
MBR_N_ENTRIES = 4
BOOT_ACTIVE = 0x80

TYPE_EMPTY = 0x00
TYPE_GPT_PROTECTIVE = 0xEE
#: types Linux follows as an extended partition (EBR chain)
EXTENDED_TYPES = (0x05, 0x0F, 0x85)

GPT_SIGNATURE = b"EFI PART"
GPT_REVISION_1_0 = 0x00010000
GPT_HEADER_SIZE = 92
GPT_ENTRY_SIZE = 128
GPT_NAME_UNITS = 36
#: the UEFI minimum reserved for the entry array (128 entries of 128 bytes)
GPT_MIN_ARRAY_BYTES = 16384

#: MBR partition type byte -> name (util-linux's names, so listings match fdisk)
MBR_TYPES = {
    0x00: "Empty", 0x01: "FAT12", 0x02: "XENIX root", 0x03: "XENIX usr", 0x04: "FAT16 <32M",
    0x05: "Extended", 0x06: "FAT16", 0x07: "HPFS/NTFS/exFAT", 0x08: "AIX", 0x09: "AIX bootable",
    0x0A: "OS/2 Boot Manager", 0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Ext'd (LBA)", 0x10: "OPUS", 0x11: "Hidden FAT12",
    0x12: "Compaq diagnostics", 0x14: "Hidden FAT16 <32M", 0x16: "Hidden FAT16",
    0x17: "Hidden HPFS/NTFS", 0x18: "AST SmartSleep", 0x1B: "Hidden W95 FAT32",
    0x1C: "Hidden W95 FAT32 (LBA)", 0x1E: "Hidden W95 FAT16 (LBA)", 0x24: "NEC DOS",
    0x27: "Hidden NTFS WinRE", 0x39: "Plan 9", 0x3C: "PartitionMagic recovery",
    0x40: "Venix 80286", 0x41: "PPC PReP Boot", 0x42: "SFS", 0x4D: "QNX4.x",
    0x4E: "QNX4.x 2nd part", 0x4F: "QNX4.x 3rd part", 0x50: "OnTrack DM",
    0x51: "OnTrack DM6 Aux1", 0x52: "CP/M", 0x53: "OnTrack DM6 Aux3", 0x54: "OnTrackDM6",
    0x55: "EZ-Drive", 0x56: "Golden Bow", 0x5C: "Priam Edisk", 0x61: "SpeedStor",
    0x63: "GNU HURD or SysV", 0x64: "Novell Netware 286", 0x65: "Novell Netware 386",
    0x70: "DiskSecure Multi-Boot", 0x75: "PC/IX", 0x80: "Old Minix", 0x81: "Minix / old Linux",
    0x82: "Linux swap / Solaris", 0x83: "Linux", 0x84: "OS/2 hidden C: drive",
    0x85: "Linux extended", 0x86: "NTFS volume set", 0x87: "NTFS volume set",
    0x88: "Linux plaintext", 0x8E: "Linux LVM", 0x93: "Amoeba", 0x94: "Amoeba BBT",
    0x9F: "BSD/OS", 0xA0: "IBM Thinkpad hibernation", 0xA5: "FreeBSD", 0xA6: "OpenBSD",
    0xA7: "NeXTSTEP", 0xA8: "Darwin UFS", 0xA9: "NetBSD", 0xAB: "Darwin boot",
    0xAF: "HFS / HFS+", 0xB7: "BSDI fs", 0xB8: "BSDI swap", 0xBB: "Boot Wizard hidden",
    0xBC: "Acronis FAT32 LBA", 0xBE: "Solaris boot", 0xBF: "Solaris",
    0xC1: "DRDOS/sec (FAT-12)", 0xC4: "DRDOS/sec (FAT-16 < 32M)", 0xC6: "DRDOS/sec (FAT-16)",
    0xC7: "Syrinx", 0xDA: "Non-FS data", 0xDB: "CP/M / CTOS / ...", 0xDE: "Dell Utility",
    0xDF: "BootIt", 0xE1: "DOS access", 0xE3: "DOS R/O", 0xE4: "SpeedStor", 0xEB: "BeOS fs",
    0xEE: "GPT", 0xEF: "EFI (FAT-12/16/32)", 0xF0: "Linux/PA-RISC boot", 0xF1: "SpeedStor",
    0xF2: "DOS secondary", 0xF4: "SpeedStor", 0xFB: "VMware VMFS", 0xFC: "VMware VMKCORE",
    0xFD: "Linux raid autodetect", 0xFE: "LANstep", 0xFF: "BBT",
}

#: GPT partition type GUID (upper case) -> name (the common ones; util-linux's names)
GPT_TYPES = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "024DEE41-33E7-11D3-9D69-0008C781F39F": "MBR partition scheme",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3": "Microsoft LDM metadata",
    "AF9B60A0-1431-4F62-BC68-3311714A69AD": "Microsoft LDM data",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery environment",
    "E75CAF8F-F680-4CEE-AFA3-B001E56EFC2D": "Microsoft Storage Spaces",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "3B8F8425-20E0-4F3B-907F-1A25A76F98E8": "Linux server data",
    "44479540-F297-41B2-9AF7-D131D5F0458A": "Linux root (x86)",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3": "Linux root (ARM)",
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "Linux root (ARM-64)",
    "8DA63339-0007-60C0-C436-083AC8230908": "Linux reserved",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "4D21B016-B534-45C2-A9FB-5C16E091FD2D": "Linux variable data",
    "7EC6F557-3BC5-4ACA-B293-16EF5DF639D1": "Linux temporary data",
    "8484680C-9521-48C6-9C11-B0720656F69E": "Linux /usr (x86-64)",
    "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
    "CA7D7CCB-63ED-4C53-861C-1742536059CC": "Linux LUKS",
    "7FFEC5C9-2D00-49B7-8941-3EA10A5586B7": "Linux plain dm-crypt",
    "516E7CB4-6ECF-11D6-8FF8-00022D09712B": "FreeBSD data",
    "83BD6B9D-7F41-11DC-BE0B-001560B84F0F": "FreeBSD boot",
    "516E7CB5-6ECF-11D6-8FF8-00022D09712B": "FreeBSD swap",
    "516E7CB6-6ECF-11D6-8FF8-00022D09712B": "FreeBSD UFS",
    "516E7CBA-6ECF-11D6-8FF8-00022D09712B": "FreeBSD ZFS",
    "48465300-0000-11AA-AA11-00306543ECAC": "Apple HFS/HFS+",
    "7C3457EF-0000-11AA-AA11-00306543ECAC": "Apple APFS",
    "426F6F74-0000-11AA-AA11-00306543ECAC": "Apple boot",
    "6A85CF4D-1DD2-11B2-99A6-080020736631": "Solaris root",
    "6A898CC3-1DD2-11B2-99A6-080020736631": "Solaris /usr & Apple ZFS",
    "824CC7A0-36A8-11E3-890A-952519AD3F61": "OpenBSD data",
    "49F48D5A-B10E-11DC-B99B-0019D1879648": "NetBSD FFS",
    "FE3A2A5D-4F32-41A7-B725-ACCC3285A309": "ChromeOS kernel",
    "3CB8E202-3B7E-47DD-8A3C-7FF2A13CFCEC": "ChromeOS root fs",
    "AA31E02A-400F-11DB-9590-000C2911D1B8": "VMware VMFS",
    "9D275380-40AD-11DB-BF97-000C2911D1B8": "VMware Diagnostic",
}

#: GPT attribute bit -> name (bits 48..63 belong to the partition type)
GPT_ATTRIBUTE_BITS = {0: "RequiredPartition", 1: "NoBlockIOProtocol", 2: "LegacyBIOSBootable"}
GPT_TYPE_BITS_FIRST = 48
GPT_TYPE_BITS_COUNT = 16
GPT_ATTRIBUTE_NAMES = {**GPT_ATTRIBUTE_BITS,
                       **{b: f"type-specific bit {b}" for b in range(48, 64)},
                       60: "read-only (Microsoft basic data)", 61: "shadow copy (Microsoft)",
                       62: "hidden (Microsoft)", 63: "no drive letter (Microsoft)"}


class GuidAdapter(cs.Adapter):
    """A 16-byte GUID stored mixed-endian; parses to the upper-case text form."""

    def _decode(self, obj, context, path):
        return str(uuid.UUID(bytes_le=bytes(obj))).upper()

    def _encode(self, obj, context, path):
        return uuid.UUID(str(obj)).bytes_le


def Guid() -> GuidAdapter:
    return GuidAdapter(cs.Bytes(16))


BOOT_INDICATORS = {0x00: "inactive", BOOT_ACTIVE: "active (bootable)"}

mbr_entry = cs.Struct(
    "boot_indicator" / enum(cs.Int8ul, BOOT_INDICATORS) * "0x80 active (bootable), 0x00 inactive; any other value and Linux does not take the sector for a partition table",
    "start_chs" / cs.Bytes(3) * "CHS of the first sector: head; sector in bits 0-5 and cylinder bits 8-9 in bits 6-7; cylinder bits 0-7 (legacy: the LBA fields are used)",
    "partition_type" / enum(cs.Int8ul, MBR_TYPES) * "partition type byte: 0x00 empty, 0x05/0x0F/0x85 extended, 0xEE GPT protective, 0x83 Linux ...",
    "end_chs" / cs.Bytes(3) * "CHS of the last sector, encoded like start_chs (FE FF FF once the cylinder passes 1023)",
    "start_lba" / cs.Int32ul * "first sector; from the disk start for primaries, from the EBR for a logical, from the extended partition for an EBR link",
    "num_sectors" / cs.Int32ul * "number of sectors; 0 and Linux ignores the entry",
)

mbr = cs.Struct(
    "boot_code" / cs.Bytes(440) * "boot loader code (zero on data disks)",
    "disk_signature" / cs.Int32ul * "disk signature (label-id in sfdisk), optional",
    "copy_protect" / cs.Int16ul * "usually 0x0000 (0x5A5A: copy protected)",
    "partition_entries" / cs.Bytes(MBR_N_ENTRIES * MBR_ENTRY_SIZE) * "four 16-byte partition entries (see mbr_entry)",
    "boot_signature" / cs.Bytes(2) * "boot signature 55 AA; without it the sector holds no partition table",
)

#: the four entries as one numpy table
MBR_ENTRY_DTYPE = np.dtype([("boot_indicator", "u1"), ("start_chs", "u1", (3,)),
                            ("partition_type", "u1"), ("end_chs", "u1", (3,)),
                            ("start_lba", "<u4"), ("num_sectors", "<u4")])


def mbr_entries() -> NumpyArray:
    """The four partition entries at offset 446 of an MBR or EBR."""
    return NumpyArray(MBR_N_ENTRIES, MBR_ENTRY_DTYPE)


GPT_REVISIONS = {GPT_REVISION_1_0: "1.0"}

gpt_header = cs.Struct(
    "signature" / cs.Bytes(8) * "'EFI PART'",
    "revision" / enum(cs.Int32ul, GPT_REVISIONS) * "GPT revision, 0x00010000 for 1.0",
    "header_size" / cs.Int32ul * "bytes covered by header_crc32: 92 <= header_size <= logical sector size",
    "header_crc32" / cs.Int32ul * "CRC-32 of header_size bytes of the header with this field taken as zero",
    "reserved" / cs.Int32ul * "zero",
    "my_lba" / cs.Int64ul * "LBA of this header: 1 for the primary, the last LBA of the disk for the backup",
    "alternate_lba" / cs.Int64ul * "LBA of the other header",
    "first_usable_lba" / cs.Int64ul * "first LBA a partition may use",
    "last_usable_lba" / cs.Int64ul * "last LBA a partition may use (inclusive)",
    "disk_guid" / Guid() * "GUID of the disk (label-id in sfdisk)",
    "partition_entry_lba" / cs.Int64ul * "first LBA of the partition entry array: 2 for the primary, after the usable area for the backup",
    "num_partition_entries" / cs.Int32ul * "number of entry slots in the array (usually 128), used or not",
    "sizeof_partition_entry" / cs.Int32ul * "bytes per entry: 128 * 2^k (Linux accepts only 128)",
    "partition_entry_array_crc32" / cs.Int32ul * "CRC-32 of num_partition_entries * sizeof_partition_entry bytes of the entry array",
)

gpt_entry = cs.Struct(
    "partition_type_guid" / Guid() * "type of the partition; all zero: unused slot",
    "unique_partition_guid" / Guid() * "GUID of this partition",
    "starting_lba" / cs.Int64ul * "first LBA of the partition",
    "ending_lba" / cs.Int64ul * "last LBA of the partition (inclusive)",
    "attributes" / flags(cs.Int64ul, GPT_ATTRIBUTE_NAMES) * "bit 0 platform required, 1 firmware should ignore (no block IO protocol), 2 legacy BIOS bootable, 48-63 defined by the partition type",
    "partition_name" / cs.Bytes(2 * GPT_NAME_UNITS) * "name, 36 UTF-16LE code units, NUL padded",
)


def gpt_entry_dtype(entry_size: int = GPT_ENTRY_SIZE) -> np.dtype:
    """numpy view of one entry; larger entries (128 * 2^k) keep their tail unread."""
    return np.dtype({"names": ["type_guid", "unique_guid", "first_lba", "last_lba",
                               "attributes", "name"],
                     "formats": ["V16", "V16", "<u8", "<u8", "<u8", ("<u2", (GPT_NAME_UNITS,))],
                     "offsets": [0, 16, 32, 40, 48, 56], "itemsize": int(entry_size)})


def gpt_entries(count, entry_size: int = GPT_ENTRY_SIZE) -> NumpyArray:
    """The partition entry array: `count` entries of `entry_size` bytes."""
    return NumpyArray(count, gpt_entry_dtype(entry_size))


def gpt_header_crc(data: bytes, header_size: int) -> int:
    """CRC-32 of the first header_size bytes with the header_crc32 field taken as zero."""
    head = bytes(data[:header_size])
    return zlib.crc32(head[:16] + b"\0\0\0\0" + head[20:]) & 0xFFFFFFFF


def crc32(data) -> int:
    """The reflected CRC-32 (zlib's) GPT uses for the header and the entry array."""
    return zlib.crc32(data) & 0xFFFFFFFF


def decode_chs(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cylinder, head, sector) of an (n, 3) array of CHS triples."""
    raw = np.asarray(raw, np.uint16).reshape(-1, 3)
    head = raw[:, 0]
    sector = raw[:, 1] & 0x3F
    cylinder = ((raw[:, 1] & 0xC0) << 2) | raw[:, 2]
    return cylinder, head, sector


def guid_text(raw: np.ndarray) -> list[str]:
    """Upper-case text of an array of 16-byte mixed-endian GUIDs ('V16' or (n, 16) uint8)."""
    b = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, 16)
    # mixed endian: reverse the first three groups, then print as hex
    order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15]
    hexed = b[:, order].tobytes().hex().upper()
    return [f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
            for h in (hexed[i * 32:(i + 1) * 32] for i in range(b.shape[0]))]


def mbr_type_name(code: int) -> str:
    return MBR_TYPES.get(int(code), "unknown")


GPT_UNUSED = "00000000-0000-0000-0000-000000000000"


def gpt_type_name(guid: str) -> str:
    return "unused" if guid == GPT_UNUSED else GPT_TYPES.get(guid.upper(), "unknown")
