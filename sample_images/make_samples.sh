#!/usr/bin/env bash
# Regenerates every image stored in this folder (and, last, the corrupt/ set) with
# qemu-img / qemu-io 7.2 and sfdisk, in a few seconds.  The guest contents are fixed patterns.
# Only what the tools make up on their own changes from run to run (README.md lists it):
# snapshot dates (demo.qcow2), the VMDK CID, VDI UUIDs, the VHD time stamp, unique id
# and checksum, VHDX GUIDs and CRCs.
set -euo pipefail
cd "$(dirname "$0")"
rm -f demo.qcow2 chain-base.qcow2 chain-top.qcow2 compressed.qcow2 sparse.raw stream.vmdk sparse.vmdk \
      sparse.vdi sparse.vhd sparse.vhdx sparse.qcow gpt-disk.qcow2
q() { qemu-io -f qcow2 "$@" >/dev/null; }

# demo.qcow2: v3, 16 MiB, data across cluster boundaries, a zero cluster, two snapshots, a bitmap
qemu-img create -q -f qcow2 demo.qcow2 16M
qemu-img bitmap --add demo.qcow2 changes
q -c "write -P 0x11 0 96k" -c "write -P 0x22 1M 64k" demo.qcow2
qemu-img snapshot -c before-update demo.qcow2
q -c "write -P 0x33 32k 64k" -c "write -z 1M 64k" demo.qcow2
qemu-img snapshot -c after-update demo.qcow2
q -c "write -P 0x44 8M 128k" demo.qcow2

# chain-base.qcow2 <- chain-top.qcow2 (relative backing name)
qemu-img create -q -f qcow2 -o cluster_size=4096 chain-base.qcow2 8M
q -c "write -P 0xaa 0 256k" -c "write -P 0xbb 4M 64k" chain-base.qcow2
qemu-img create -q -f qcow2 -b chain-base.qcow2 -F qcow2 chain-top.qcow2
q -c "write -P 0xcc 64k 64k" -c "write -z 4M 64k" chain-top.qcow2

# sparse.raw: a raw disk with data at three places
truncate -s 2M sparse.raw
qemu-io -f raw -c "write -P 0x5a 0 4k" -c "write -P 0x5b 512k 8k" -c "write -P 0x5c 1536k 4k" sparse.raw >/dev/null

# compressed.qcow2: zlib-compressed clusters from the raw disk
qemu-img convert -c -O qcow2 sparse.raw compressed.qcow2

# VMDK: the same raw disk as a streamOptimized file (compressed grains) and a
# monolithicSparse one with a zero grain (zeroed_grain=on, GTE = 1)
qemu-img convert -O vmdk -o subformat=streamOptimized sparse.raw stream.vmdk
qemu-img convert -O vmdk -o zeroed_grain=on sparse.raw sparse.vmdk
qemu-io -f vmdk -c "write -z 512k 64k" sparse.vmdk >/dev/null
# VDI, VHD (vpc), VHDX and qcow (v1) of the same raw disk
qemu-img convert -O vdi sparse.raw sparse.vdi
qemu-img convert -O vpc sparse.raw sparse.vhd
qemu-img convert -O vhdx -o log_size=1M,block_size=1M sparse.raw sparse.vhdx
qemu-img convert -O qcow sparse.raw sparse.qcow

# gpt-disk.qcow2: a GPT (fixed GUIDs) with two named partitions holding known bytes
rm -f gpt-disk.raw && truncate -s 8M gpt-disk.raw
sfdisk -q gpt-disk.raw <<'GPT'
label: gpt
label-id: 0DDBA110-0000-4000-8000-000000000001
size=2MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=0DDBA110-0000-4000-8000-0000000000A1, name="EFI system"
type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=0DDBA110-0000-4000-8000-0000000000A2, name=root
GPT
qemu-io -f raw -c "write -P 0xe5 1M 64k" -c "write -P 0x77 3M 128k" gpt-disk.raw >/dev/null
qemu-img convert -O qcow2 gpt-disk.raw gpt-disk.qcow2
rm -f gpt-disk.raw

# corrupt/: clean images made the same way, then the documented pokes (MANIFEST.json)
python3 corrupt/make_corrupt.py >/dev/null
ls -l
