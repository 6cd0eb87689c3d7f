"""The Jupyter widgets driven without a browser: set a widget's value, read the HTML it shows.

The hex views are parsed back to (address -> byte) and compared with the file's own
bytes, read here with plain `open()`: choosing L1 entry 0 of demo.qcow2 must show the 8
bytes at the L1 table offset the header names (bytes 40-47, read with struct), a regions
row its bytes, an extents row the guest's bytes.  A 64 GiB metadata-preallocated qcow2
(a million L2 entries) is paged 50 rows at a time.  The stepper shows one card per
translation step, titled as translate() titles them.  Errors land in the status line.
"""
from __future__ import annotations

import html
import json
import re
import struct
from pathlib import Path

import ipywidgets
import pytest

import imgscope
from imgscope import widgets
from imgscope.translate import translate
from imgscope.widgets import PAGE_ROWS, Explorer, Stepper, parse_offset

import oracle

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
MANIFEST = json.loads((SAMPLES / "corrupt" / "MANIFEST.json").read_text())
_TAG = re.compile(r"<[^>]+>")
_LINE = re.compile(r"([0-9a-f]{8,})  (.*?)  \|")
_SPAN = re.compile(r"data-field='([^']*)' data-offset='(\d+)' data-size='(\d+)'")


# --------------------------------------------------------------------------- reading the HTML back
def hex_bytes(text: str) -> dict[int, int]:
    """address -> byte of every hex dump in an HTML block (hexdump -C columns)."""
    out: dict[int, int] = {}
    for pre in re.findall(r"<pre>(.*?)</pre>", text, re.S):
        for line in pre.split("\n"):
            m = _LINE.match(html.unescape(_TAG.sub("", line)))
            if not m:
                continue
            base, cols = int(m.group(1), 16), m.group(2)
            for c in range(16):
                pos = 3 * c + (1 if c >= 8 else 0)
                tok = cols[pos:pos + 2]
                if tok.strip():
                    out[base + c] = int(tok, 16)
    return out


def span_fields(text: str) -> dict[str, tuple[int, int]]:
    """field label -> (offset, size) of the coloured spans of a hex view."""
    return {html.unescape(name): (int(off), int(size)) for name, off, size in _SPAN.findall(text)}


def shown(text: str, offset: int, size: int) -> bytes:
    b = hex_bytes(text)
    missing = [a for a in range(offset, offset + size) if a not in b]
    assert not missing, f"bytes {missing[:4]}... not shown"
    return bytes(b[a] for a in range(offset, offset + size))


def file_bytes(path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def page_rows(text: str) -> list[int]:
    return [int(r) for r in re.findall(r"data-row='(\d+)'", text)]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo():
    with imgscope.open(SAMPLES / "demo.qcow2") as img:
        yield img


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """64 GiB qcow2 with metadata preallocation: 1 Mi L2 entries, a sparse file."""
    oracle.require_tools()
    path = tmp_path_factory.mktemp("widgets") / "big.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
               path, "64G")
    with imgscope.open(path) as img:
        yield img


# --------------------------------------------------------------------------- explorer
def test_summary_and_header_fields(demo):
    e = Explorer(demo)
    assert not e.status.value
    text = html.unescape(_TAG.sub(" ", e.summary.value))
    assert "qcow2 v3" in text and "16777216 bytes" in text and "65536 bytes" in text
    assert re.search(rf"findings\s+{len(demo.findings)}\b", text)
    fields = e.fields_view.value
    for name in ("l1_table_offset", "cluster_bits", "refcount_table_offset", "nb_snapshots"):
        assert f"<td>{name}</td>" in fields
    l1_off = struct.unpack(">Q", file_bytes(demo.path, 40, 8))[0]
    assert re.search(rf"<td>0x28</td><td>8</td><td>[^<]*\b{l1_off}\b", fields)   # at byte 40


def test_l1_entry_0_shows_the_8_bytes_at_the_l1_table(demo):
    e = Explorer(demo)
    e.table_select.value = "l1"
    e.entry.value = 0
    assert not e.status.value
    l1_off = struct.unpack(">Q", file_bytes(demo.path, 40, 8))[0]
    assert span_fields(e.hex.value)["l1[0]"] == (l1_off, 8)
    entry = file_bytes(demo.path, l1_off, 8)
    assert shown(e.hex.value, l1_off, 8) == entry
    # ... and the first bytes of the L2 table it points to
    l2_off = struct.unpack(">Q", entry)[0] & 0x00FFFFFFFFFFFE00
    assert shown(e.hex.value, l2_off, 64) == file_bytes(demo.path, l2_off, 64)
    assert page_rows(e.table_view.value) == [0]
    assert "class='sel' data-row='0'" in e.table_view.value


def test_l2_entry_3(demo):
    e = Explorer(demo)
    e.table_select.value = "l2"
    e.entry.value = 3
    l1_off = struct.unpack(">Q", file_bytes(demo.path, 40, 8))[0]
    l2_off = struct.unpack(">Q", file_bytes(demo.path, l1_off, 8))[0] & 0x00FFFFFFFFFFFE00
    assert span_fields(e.hex.value)["l2[3]"] == (l2_off + 24, 8)
    entry = file_bytes(demo.path, l2_off + 24, 8)
    assert shown(e.hex.value, l2_off + 24, 8) == entry
    host = struct.unpack(">Q", entry)[0] & 0x00FFFFFFFFFFFE00
    if host:                                    # the cluster it points to
        assert shown(e.hex.value, host, 32) == file_bytes(demo.path, host, 32)


def test_a_regions_row_shows_its_bytes(demo):
    e = Explorer(demo)
    reg = demo.regions()
    for kind in ("l1_table", "refcount_block", "data"):
        k = int(reg.index[reg.kind == kind][0])
        e.region.value = k
        assert not e.status.value
        off, n = int(reg.offset[k]), min(int(reg.length[k]), widgets.POINTED_BYTES)
        assert shown(e.hex.value, off, n) == file_bytes(demo.path, off, n), kind
        assert k in page_rows(e.regions_view.value)
        assert f"class='sel' data-row='{k}'" in e.regions_view.value


def test_an_extents_row_shows_the_guest_bytes(demo):
    e = Explorer(demo)
    ext = demo.extents()
    k = int(ext.index[ext.kind == "data"][0])
    e.extent.value = k
    g = int(ext.guest_offset[k])
    with demo.open_guest() as r:
        r.seek(g)
        want = r.read(64)
    assert shown(e.hex.value, g, 64) == want


@pytest.mark.parametrize("name", ["qcow2_l2_entry_beyond_eof.qcow2", "vmdk_grain_beyond_eof.vmdk",
                                  "vhd_footer_checksum.vhd", "vdi_duplicate_block.vdi"])
def test_findings_view_lists_the_codes_of_a_corrupt_sample(name):
    with imgscope.open(SAMPLES / "corrupt" / name, MANIFEST[name]["format"]) as img:
        e = Explorer(img)
        e.check_button.click()
        assert e.report is not None and not e.status.value
        assert "corruptions" in e.summary.value
        pages = []
        for p in range(1, e.findings_page.max + 1):
            e.findings_page.value = p
            pages.append(e.findings_view.value)
        text = "".join(pages)
        for code in MANIFEST[name]["expected"]:
            assert f"<td>{code}</td>" in text, code
        assert len(set(re.findall(r"data-row='(\d+)'", text))) == len(img.findings)
        # a finding with a host offset inside the file shows the bytes there
        f = img.findings
        inside = f.host_offset.notna() & (f.file == str(img.path))
        inside &= f.host_offset.fillna(0).astype("uint64") + 8 <= img.source.size
        k = int(f.index[inside][0])
        e.finding.value = k
        at = int(f.host_offset[k])
        assert not e.status.value
        assert shown(e.hex.value, at, 8) == file_bytes(img.path, at, 8)


def test_paging_a_table_of_a_million_rows(big):
    e = Explorer(big)
    e.table_select.value = "l2"
    frame = big.tables["l2"]
    assert len(frame) == 1 << 20
    assert page_rows(e.table_view.value) == list(range(PAGE_ROWS))
    assert e.page.max == (1 << 20) // PAGE_ROWS + 1
    assert "of 1048576" in e._table.info.value
    assert len(e.table_view.value) < 100_000            # never the whole table
    e.page.value = 1000
    rows = page_rows(e.table_view.value)
    assert rows == list(range(999 * PAGE_ROWS, 1000 * PAGE_ROWS))
    for r in (rows[0], rows[-1]):                        # the cells are the frame's
        g = int(frame.guest_offset.iloc[r])
        assert re.search(rf"data-row='{r}'><td>{r}</td>.*?<td>{g:#x}</td>", e.table_view.value)
    e._table.next.click()
    assert e.page.value == 1001 and page_rows(e.table_view.value)[0] == 1000 * PAGE_ROWS
    e._table.previous.click()
    assert e.page.value == 1000
    row = 123_456
    e.entry.value = row
    assert e.page.value == row // PAGE_ROWS + 1
    assert f"class='sel' data-row='{row}'" in e.table_view.value
    at = int(frame.entry_offset.iloc[row])
    assert span_fields(e.hex.value)[f"l2[{row}]"] == (at, 8)
    assert shown(e.hex.value, at, 8) == file_bytes(big.path, at, 8)


def test_errors_show_in_the_widget(demo):
    e = Explorer(demo)
    e.table_select.value = "l1"
    e.entry.value = 10 ** 9                  # no such row
    assert "error" in e.status.value and "rows 0 to" in e.status.value
    e.region.value = -5
    assert "error" in e.status.value
    e.entry.value = 0                        # a good value clears the status
    assert not e.status.value


def test_a_part_that_fails_to_load_shows_its_error_and_the_rest_works(monkeypatch):
    with imgscope.open(SAMPLES / "sparse.vdi") as img:
        def broken():
            raise imgscope.ImageError("regions exploded on purpose", path=str(img.path))
        monkeypatch.setattr(img, "regions", broken)
        e = Explorer(img)
        assert "regions exploded on purpose" in e.status.value
        assert e.regions_view.value == ""
        e.table_select.value = "block_map"
        e.entry.value = 1
        at = int(img.tables["block_map"].entry_offset[1])
        assert shown(e.hex.value, at, 4) == file_bytes(img.path, at, 4)


def test_explore_takes_a_path_or_an_image(demo):
    ex = widgets.explore(SAMPLES / "sparse.vmdk")
    assert isinstance(ex, Explorer) and ex.image.format == "vmdk"
    assert isinstance(ex.widget, ipywidgets.VBox) and callable(ex._ipython_display_)
    assert ex.summary in ex.widget.children and ex.hex in ex.widget.children
    assert widgets.explore(demo).image is demo
    ex.image.close()


@pytest.mark.parametrize("name", ["chain-top.qcow2", "compressed.qcow2", "stream.vmdk",
                                  "sparse.vmdk", "sparse.vdi", "sparse.vhd", "sparse.vhdx",
                                  "sparse.qcow", "sparse.raw", "gpt-disk.qcow2"])
def test_every_table_of_every_sample(name):
    """Each table's first and last entry, and the first regions, render without an error."""
    with imgscope.open(SAMPLES / name) as img:
        e = Explorer(img)
        assert not e.status.value
        for table in img.tables:
            e.table_select.value = table
            n = len(img.tables[table])
            assert page_rows(e.table_view.value) == list(range(min(n, PAGE_ROWS)))
            if n:
                e.entry.value = n - 1           # the last page, its last row chosen
                first = (n - 1) // PAGE_ROWS * PAGE_ROWS
                assert page_rows(e.table_view.value) == list(range(first, n))
                assert e.hex.value
            assert not e.status.value, (table, e.status.value)
        for k in range(min(5, len(img.regions()))):
            e.region.value = k
            assert not e.status.value, e.status.value


# --------------------------------------------------------------------------- stepper
def _cards(text: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r"data-title='([^']*)'", text)]


def test_stepper_shows_one_card_per_step(demo):
    s = Stepper(demo)
    for text, g in (("0", 0), ("1M", 1 << 20), ("0x10000", 0x10000), ("64k", 65536),
                    ("1.5M", 3 << 19)):
        s.offset.value = text
        want = translate(demo, g)
        assert not s.status.value.count("error"), s.status.value
        assert s.result[-1].guest_offset == g
        assert _cards(s.steps.value) == [st.title for st in want]
        assert [st.title for st in s.result] == [st.title for st in want]
    # the L1 card shows the entry's bytes from the file
    s.offset.value = "0"
    l1 = s.result[0]
    assert shown(s.steps.value, l1.host_offset, 8) == file_bytes(demo.path, l1.host_offset, 8)


def test_stepper_follows_a_chain():
    with imgscope.open(SAMPLES / "chain-top.qcow2") as img:
        s = Stepper(img, offset=0)
        titles = _cards(s.steps.value)
        assert "backing file chain-base.qcow2" in titles
        assert titles == [st.title for st in translate(img, 0)]
        assert "(layer 1)" in s.steps.value


def test_stepper_errors_show_in_the_widget(demo):
    s = Stepper(demo)
    s.offset.value = "abc"
    assert "error" in s.status.value and "not an offset" in s.status.value and not s.result
    s.offset.value = str(demo.virtual_size)
    assert "error" in s.status.value and "outside the disk" in s.status.value
    s.offset.value = "4096"
    assert "error" not in s.status.value and s.result


def test_parse_offset():
    assert parse_offset("1M") == 1 << 20
    assert parse_offset(" 0x1f ") == 31
    assert parse_offset("2G") == 2 << 30
    assert parse_offset(12) == 12
