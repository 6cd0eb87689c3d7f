"""The pictures of imgscope.plots checked by what they draw.

* layout_strip: the PNG's pixel colours at the host offsets of known structures
  (the header, the L1 table at the offset the header names, an unreferenced
  cluster) are COLOURS[kind]; in the damaged samples the leaked cluster and the
  cluster two L2 entries share (offsets taken from MANIFEST.json's pokes) show
  the leak / overlap colour, with a finding marker above them.
* allocation_map: the broken_barh segments of data cover exactly the data runs of
  `qemu-img map --output=json`; by_layer: the segments of each layer are the
  present runs qemu-img map gives that depth; the raster used for many runs marks
  every pixel holding a qemu data run as data.
* fragmentation: the points are the (guest, host) pairs of qemu-img map's data runs.
* refcount_histogram: bar heights are np.bincount of the refcounts table (qcow2) or,
  elsewhere, of the references per host cluster counted from qemu-img map.
* snapshot_sharing: shared / own cluster counts recomputed from the snapshot and
  active L1/L2 tables read from the file with numpy.
* chain_diagram: one box per layer with its file name, arrows between them.
* Every picture renders for every format (sample images, VHDX/cow/VMDK fixtures,
  damaged samples); a 64 GiB metadata-preallocated qcow2 (1 M clusters) renders
  within a 60 s hang guard.
"""
from __future__ import annotations

import io
import json
import struct
import sys
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import imgscope  # noqa: E402
from imgscope import plots  # noqa: E402
from imgscope.frames import REGION_KINDS  # noqa: E402
from imgscope.model import KINDS  # noqa: E402
from imgscope.plots import COLOURS  # noqa: E402

import oracle  # noqa: E402
from test_qcow2_damaged import run_isolated  # noqa: E402

KiB, MiB, GiB = oracle.KiB, oracle.MiB, oracle.GiB
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
sys.path.insert(0, str(SAMPLES))
import make_cow_fixtures  # noqa: E402
import make_vhdx_fixtures  # noqa: E402
import make_vmdk_fixtures  # noqa: E402

L2E_OFFSET = 0x00FFFFFFFFFFFE00
PICTURES = ("allocation_map", "layout_strip", "fragmentation", "refcount_histogram",
            "snapshot_sharing", "chain_diagram")


# --------------------------------------------------------------------------- helpers
def png(fig: Figure) -> np.ndarray:
    """The figure saved as PNG at its own dpi, read back (rows top first, RGBA floats)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    buf.seek(0)
    return mpimg.imread(buf)


def pixel_at(img: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """RGB of the PNG pixel under data point (x, y) of `ax` (after the figure was saved)."""
    dx, dy = ax.transData.transform((x, y))
    return img[int(img.shape[0] - dy), int(dx), :3]


def same_colour(rgb, name: str) -> bool:
    return bool(np.allclose(rgb, to_rgb(COLOURS[name]), atol=1.5 / 255))


def bars(ax, gid: str) -> list[tuple[float, float]]:
    """(start, end) of every bar of the broken_barh collection with this gid."""
    out = []
    for coll in ax.collections:
        if coll.get_gid() == gid:
            for path in coll.get_paths():
                xs = path.vertices[:, 0]
                out.append((float(xs.min()), float(xs.max())))
    return sorted(out)


def union(intervals) -> list[tuple[int, int]]:
    """Sorted intervals with touching/overlapping ones merged."""
    out: list[list[int]] = []
    for s, e in sorted((int(s), int(e)) for s, e in intervals if e > s):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [tuple(x) for x in out]


def qemu_runs(entries, pred) -> list[tuple[int, int]]:
    return union((e["start"], e["start"] + e["length"]) for e in entries if pred(e))


def qcow2_header_fields(path: Path) -> dict:
    """The few header fields the tests need, straight from the bytes (qcow2 spec offsets)."""
    h = path.read_bytes()[:104]
    cluster_bits, size = struct.unpack_from(">IQ", h, 20)
    l1_size, l1_offset = struct.unpack_from(">IQ", h, 36)
    return {"cluster_bits": cluster_bits, "size": size, "l1_size": l1_size, "l1_offset": l1_offset}


def l2_entries(data: bytes, l1_offset: int, l1_size: int, cluster_bits: int,
               n_clusters: int) -> np.ndarray:
    """Every guest cluster's L2 entry (0 where no L2 table), read with numpy."""
    cs = 1 << cluster_bits
    per = cs // 8
    l1 = np.frombuffer(data, ">u8", count=l1_size, offset=l1_offset).astype(np.uint64)
    out = np.zeros(n_clusters, np.uint64)
    for i, e in enumerate(l1.tolist()):          # a handful of L1 entries in these samples
        off = e & L2E_OFFSET
        n = min(per, n_clusters - i * per)
        if off and n > 0:
            out[i * per:i * per + n] = np.frombuffer(data, ">u8", count=n, offset=off)
    return out


def strips(ax) -> list:
    return [im for im in ax.images if isinstance(im, plots.RunRaster)]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The on-demand fixtures (VHDX, cow, a VMDK of several extent files), a fragmented
    qcow2 and a 64 GiB qcow2 with metadata preallocation."""
    oracle.require_tools()
    root = tmp_path_factory.mktemp("plots")
    vhdx = make_vhdx_fixtures.build_fixtures(root / "vhdx")
    cow = make_cow_fixtures.build_fixtures(root / "cow")
    (root / "vmdk").mkdir()                     # only the descriptor with several extent files
    make_vmdk_fixtures.build_mixed(root / "vmdk", np.random.default_rng(make_vmdk_fixtures.SEED))
    vmdk = {"mixed": make_vmdk_fixtures.open_path(root / "vmdk", "mixed")}
    frag = root / "frag.qcow2"
    oracle.build_fragmented_qcow2(frag, 64 * MiB, 600, cluster_size=4096, scramble_every=3)
    big = root / "big.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
               big, "64G")
    return {"vhdx": {n: f.path for n, f in vhdx.items()}, "cow": cow, "vmdk": vmdk,
            "frag": frag, "big": big}


@pytest.fixture(scope="module")
def demo():
    return imgscope.open(SAMPLES / "demo.qcow2")


# --------------------------------------------------------------------------- colours, axes
def test_one_colour_scheme_names_every_kind():
    for name in (*KINDS, *REGION_KINDS, "finding"):
        assert name in COLOURS, name
        to_rgb(COLOURS[name])
    # what must stand out differs from everything an intact image shows
    alarm = {COLOURS[k] for k in ("unreferenced", "overlap", "beyond_eof")}
    calm = {COLOURS[k] for k in (*KINDS, *REGION_KINDS) if k not in
            ("unreferenced", "overlap", "beyond_eof")}
    assert len(alarm) == 3 and not alarm & calm
    assert len({COLOURS[k] for k in KINDS}) == len(KINDS)


def test_byte_axis_binary_units(demo):
    fig = plots.allocation_map(demo)
    ax = fig.axes[0]
    png(fig)
    ticks = [t for t in ax.get_xticks() if 0 <= t <= demo.virtual_size]
    labels = {round(t): lab.get_text() for t, lab in zip(ax.get_xticks(), ax.get_xticklabels())}
    assert len(ticks) >= 3
    step = ticks[1] - ticks[0]
    assert step == 2 ** round(np.log2(step))                # a power of two: binary units
    for t in ticks[1:]:
        v = t / MiB if t >= MiB else t / KiB
        unit = "MiB" if t >= MiB else "KiB"
        assert labels[round(t)] == f"{v:g} {unit}"
    assert ax.get_xlabel() == "guest offset"
    assert plots.format_bytes(1536 * KiB) == "1.5 MiB"
    assert plots.format_bytes(64 * GiB) == "64 GiB"
    assert plots.format_bytes(1 << 40) == "1 TiB"


def test_raster_keeps_a_one_byte_leak_in_a_tebibyte_visible():
    """Per pixel: alarm and one-of-a-kind structures win when present, the rest by bytes."""
    names = list(REGION_KINDS)
    ix = {k: i for i, k in enumerate(names)}
    tib = 1 << 40
    leak = 700 * GiB + 12345
    starts = np.array([0, 4096, leak, leak + 1], np.uint64)
    ends = np.array([4096, leak, leak + 1, tib], np.uint64)
    codes = np.array([ix["header"], ix["data"], ix["unreferenced"], ix["data"]])
    rank = [1 if k in ("header", "unreferenced") else -1 for k in names]
    rank[ix["unreferenced"]] = 2
    px = plots.raster_codes(starts, ends, codes, len(names), rank, 0, tib, 800)
    assert px[0] == ix["header"]
    where = int(leak * 800 // tib)
    assert px[where] == ix["unreferenced"]
    assert np.count_nonzero(px == ix["unreferenced"]) == 1
    assert np.all(np.delete(px, [0, where]) == ix["data"])
    # bulk kinds: the one holding more bytes of the pixel wins
    px = plots.raster_codes(np.array([0, 10], np.uint64), np.array([10, 100], np.uint64),
                            np.array([ix["slack"], ix["data"]]), len(names), [-1] * len(names),
                            0, 100, 1)
    assert px.tolist() == [ix["data"]]


# --------------------------------------------------------------------------- layout strip
def test_layout_strip_colours_known_structures(demo):
    path = SAMPLES / "demo.qcow2"
    hdr = qcow2_header_fields(path)
    cs = 1 << hdr["cluster_bits"]
    regions = demo.regions()
    fig = plots.layout_strip(demo)
    ax = fig.axes[0]
    img = png(fig)
    (strip,) = strips(ax)
    assert demo.path.name in ax.get_title()
    y = (strip.y0 + strip.y1) / 2
    # the header: the whole first cluster
    assert same_colour(pixel_at(img, ax, cs / 2, y), "header")
    # the L1 table: 8 bytes where the header says, one pixel wide at this scale
    l1 = hdr["l1_offset"]
    width = strip.pixel_codes.size
    col = int(l1 * width // strip.domain[1])
    assert strip.pixel_codes[col] == REGION_KINDS.index("l1_table")
    dx, dy = ax.transData.transform((l1 + 4, y))
    row = int(img.shape[0] - dy)
    assert any(same_colour(img[row, int(dx) + d, :3], "l1_table") for d in (-1, 0, 1))
    # an unreferenced cluster: refcount 0 and no structure claims it
    rc = demo.tables["refcounts"]
    free = rc[(rc["refcount"] == 0) & (rc["host_offset"] < path.stat().st_size)]
    unref = regions[regions["kind"] == "unreferenced"]
    assert len(free) and len(unref)
    assert set(free["host_offset"].astype(int)) == set(unref["offset"].astype(int))
    for off in unref["offset"].astype(int):
        assert same_colour(pixel_at(img, ax, off + cs / 2, y), "unreferenced")
    # every region wider than 3 pixels shows its own colour at its centre
    scale = width / strip.domain[1]
    for off, ln, kind in zip(regions["offset"], regions["length"], regions["kind"].astype(str)):
        if ln * scale > 3:
            assert same_colour(pixel_at(img, ax, int(off) + int(ln) / 2, y), kind), (off, kind)
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert set(regions["kind"].astype(str)) <= legend


@pytest.mark.parametrize("name", ["qcow2_leaked_cluster.qcow2", "qcow2_shared_data_cluster.qcow2"])
def test_layout_strip_shows_leaks_and_shared_clusters(name):
    """The MANIFEST's poke says which cluster leaks and which two entries share."""
    manifest = json.loads((SAMPLES / "corrupt" / "MANIFEST.json").read_text())[name]
    (poke,) = manifest["pokes"]
    old, new = int(poke["old"], 16) & L2E_OFFSET, int(poke["new"], 16) & L2E_OFFSET
    expect = {old: "unreferenced"}               # the cluster the cleared entry pointed at
    if new:
        expect[new] = "overlap"                  # now read by two guest clusters
    image = imgscope.open(SAMPLES / "corrupt" / name)
    fig = plots.layout_strip(image, check=True)
    ax = fig.axes[0]
    img = png(fig)
    (strip,) = strips(ax)
    y = (strip.y0 + strip.y1) / 2
    marks = next(c for c in ax.collections if c.get_gid() == "findings").get_offsets()
    findings = image.findings
    for off, kind in expect.items():
        assert same_colour(pixel_at(img, ax, off + image.cluster_size / 2, y), kind), (off, kind)
        assert off in set(findings["host_offset"].dropna().astype(int))
        assert off in set(np.asarray(marks)[:, 0].astype(int))
    assert "finding" in " ".join(t.get_text() for t in ax.get_legend().get_texts())


# --------------------------------------------------------------------------- allocation map
ALLOCATION_CASES = [("demo.qcow2", None), ("chain-top.qcow2", None), ("compressed.qcow2", None),
                    ("sparse.raw", "raw"), ("sparse.vmdk", None), ("stream.vmdk", None),
                    ("sparse.vdi", None), ("sparse.vhd", "vpc"), ("sparse.qcow", None)]


@pytest.mark.parametrize("name,fmt", ALLOCATION_CASES)
def test_allocation_map_bars_are_qemu_data_runs(name, fmt):
    path = SAMPLES / name
    image = imgscope.open(path, fmt)
    fig = plots.allocation_map(image)
    ax = fig.axes[0]
    entries = oracle.qemu_map(path, fmt)
    drawn = union(bars(ax, "state:data") + bars(ax, "state:compressed")
                  + bars(ax, "state:encrypted"))
    assert drawn == qemu_runs(entries, lambda e: e["data"])
    # the rest of the guest is drawn as zero or unallocated, as qemu-img says
    rest = union(bars(ax, "state:zero") + bars(ax, "state:unallocated"))
    assert rest == qemu_runs(entries, lambda e: not e["data"])
    assert union(bars(ax, "state:unallocated")) == qemu_runs(
        entries, lambda e: not e["present"] and not e["data"])
    for coll in ax.collections:
        kind = coll.get_gid().split(":")[1]
        assert np.allclose(coll.get_facecolor()[0][:3], to_rgb(COLOURS[kind]))
    assert name in ax.get_title()


def test_allocation_map_by_layer_follows_depth():
    path = SAMPLES / "chain-top.qcow2"
    image = imgscope.open(path)
    fig = plots.allocation_map(image, by_layer=True)
    ax = fig.axes[0]
    entries = oracle.qemu_map(path)
    ext = image.extents()
    chain = image.chain
    assert len(chain) == 2
    for depth, layer in enumerate(chain):
        drawn = union(bars(ax, f"layer:{depth}"))
        assert drawn, depth
        assert drawn == qemu_runs(entries, lambda e, d=depth: e["present"] and e["depth"] == d)
        rows = ext[(ext["depth"] == depth) & (ext["kind"] != "unallocated")]
        assert drawn == union(zip(rows["guest_offset"].astype(int),
                                  (rows["guest_offset"] + rows["length"]).astype(int)))
        coll = next(c for c in ax.collections if c.get_gid() == f"layer:{depth}")
        assert np.allclose(coll.get_facecolor()[0][:3], to_rgb(plots.layer_colour(depth)))
        assert any(layer.path.name in t.get_text() for t in ax.get_legend().get_texts())
    assert union(bars(ax, "layer:unallocated")) == qemu_runs(entries, lambda e: not e["present"])


def test_allocation_map_raster_for_many_runs(built, monkeypatch):
    """Past MAX_BARS runs a row is one raster; every pixel touching a data run is data."""
    path = built["frag"]
    image = imgscope.open(path)
    entries = oracle.qemu_map(path)
    data = np.array(qemu_runs(entries, lambda e: e["data"]), np.float64)
    assert len(data) > 100
    monkeypatch.setattr(plots, "MAX_BARS", 100)
    fig = plots.allocation_map(image)
    ax = fig.axes[0]
    png(fig)
    (strip,) = strips(ax)
    assert not [c for c in ax.collections if str(c.get_gid()).startswith("state:")]
    px = strip.pixel_codes
    w = px.size
    assert abs(w - ax.bbox.width) <= 1                  # as wide as the axis in pixels
    size = image.virtual_size
    first = np.floor(data[:, 0] * w / size).astype(int)
    last = np.ceil(data[:, 1] * w / size).astype(int)
    expect = np.zeros(w, bool)
    for a, b in zip(first, last):
        expect[a:max(b, a + 1)] = True
    assert np.array_equal(px == KINDS.index("data"), expect)
    assert set(px[~expect].tolist()) == {KINDS.index("unallocated")}


# --------------------------------------------------------------------------- fragmentation
@pytest.mark.parametrize("which", ["demo", "frag", "chain"])
def test_fragmentation_points_are_qemu_runs(which, built):
    path = {"demo": SAMPLES / "demo.qcow2", "frag": built["frag"],
            "chain": SAMPLES / "chain-top.qcow2"}[which]
    image = imgscope.open(path)
    fig = plots.fragmentation(image)
    ax = fig.axes[0]
    entries = [e for e in oracle.qemu_map(path) if e["data"] and "offset" in e]
    pts = np.concatenate([np.asarray(c.get_offsets()) for c in ax.collections
                          if str(c.get_gid()).startswith("data:")])
    assert sorted(map(tuple, pts.astype(np.int64).tolist())) == sorted(
        (e["start"], e["offset"]) for e in entries)
    # per layer file: the title counts the runs whose host offset goes backwards
    back = 0
    for depth in {e["depth"] for e in entries}:
        hosts = [e["offset"] for e in sorted(entries, key=lambda e: e["start"])
                 if e["depth"] == depth]
        back += sum(b < a for a, b in zip(hosts, hosts[1:]))
    assert f"{len(entries)} data runs, {back} out of host order" in ax.get_title()
    if which == "frag":
        assert back > 100                            # the reverse-written quarter
        assert len(ax.collections) <= 2              # one scatter, not one artist per run
    png(fig)


def test_fragmentation_density_for_many_runs(built, monkeypatch):
    monkeypatch.setattr(plots, "MAX_POINTS", 50)
    fig = plots.fragmentation(imgscope.open(built["frag"]))
    ax = fig.axes[0]
    assert [im.get_gid() for im in ax.images] == ["data:0"]
    assert not ax.collections
    png(fig)


# --------------------------------------------------------------------------- refcounts
def test_refcount_histogram_is_bincount_of_refcounts(demo):
    fig = plots.refcount_histogram(demo)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches if p.get_gid() == "refcounts"]
    values = [int(t.get_text()) for t in ax.get_xticklabels()]
    assert len(values) == len(heights)
    counts = np.bincount(demo.tables["refcounts"]["refcount"].to_numpy(np.int64))
    assert dict(zip(values, heights)) == {v: c for v, c in enumerate(counts) if c}
    assert max(values) >= 2                      # the snapshots share clusters
    png(fig)


@pytest.mark.parametrize("path,fmt", [(SAMPLES / "sparse.vmdk", "vmdk"),
                                      (SAMPLES / "sparse.vdi", "vdi"),
                                      (SAMPLES / "corrupt" / "vmdk_grain_table_entry_moved.vmdk",
                                       "vmdk")])
def test_refcount_histogram_counts_references_elsewhere(path, fmt):
    """Without stored refcounts: references per host cluster, from the guest map."""
    image = imgscope.open(path, fmt)
    cs = image.cluster_size
    n_clusters = -(-path.stat().st_size // cs)
    refs = np.zeros(n_clusters + 1, np.int64)
    for e in oracle.qemu_map(path, fmt):
        if e["data"] and "offset" in e:
            first, end = e["offset"] // cs, -(-(e["offset"] + e["length"]) // cs)
            refs[first:end] += 1
    expect = np.bincount(refs[:n_clusters])
    fig = plots.refcount_histogram(image)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches if p.get_gid() == "refcounts"]
    values = [int(t.get_text()) for t in ax.get_xticklabels()]
    assert len(values) == len(heights)
    assert dict(zip(values, heights)) == {v: c for v, c in enumerate(expect) if c}
    assert "guest references" in ax.get_xlabel()


# --------------------------------------------------------------------------- snapshots
def test_snapshot_sharing_counts_from_the_tables(demo):
    path = SAMPLES / "demo.qcow2"
    data = path.read_bytes()
    hdr = qcow2_header_fields(path)
    cs = 1 << hdr["cluster_bits"]
    n = -(-hdr["size"] // cs)
    active = l2_entries(data, hdr["l1_offset"], hdr["l1_size"], hdr["cluster_bits"], n)
    snaps = demo.tables["snapshots"]
    assert len(snaps) == 2
    fig = plots.snapshot_sharing(demo)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert demo.path.name in ax.get_title()

    def kind(e):
        return np.where((e >> np.uint64(62)) & np.uint64(1), 2, np.where(e & np.uint64(1), 1, 0))
    seen = set()
    for snap in snaps.itertuples():
        sn = l2_entries(data, snap.l1_table_offset, snap.l1_size, hdr["cluster_bits"],
                        -(-snap.disk_size // cs))
        a = active[:sn.size] if sn.size <= active.size else np.pad(active, (0, sn.size - active.size))
        off_a, off_s = a & np.uint64(L2E_OFFSET), sn & np.uint64(L2E_OFFSET)
        shared = (off_s != 0) & (off_a == off_s) & (kind(a) == kind(sn))
        own = (off_s != 0) & (kind(sn) == 0) & ~shared
        drawn_shared = sum(e - s for s, e in bars(ax, f"snapshot:{snap.name}:shared")) / cs
        drawn_own = sum(e - s for s, e in bars(ax, f"snapshot:{snap.name}:snapshot_only")) / cs
        assert (drawn_shared, drawn_own) == (shared.sum(), own.sum()), snap.name
        assert f"{snap.name}\n{shared.sum()} shared, {own.sum()} own" in labels
        seen.add((int(shared.sum()), int(own.sum())))
    assert len(seen) == 2                   # the two snapshots differ from each other
    png(fig)


@pytest.mark.parametrize("name", ["chain-top.qcow2", "sparse.vmdk"])
def test_snapshot_sharing_without_snapshots_says_so(name):
    fig = plots.snapshot_sharing(imgscope.open(SAMPLES / name))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("no internal snapshots" in t and name in t for t in texts)


# --------------------------------------------------------------------------- chain
def test_chain_diagram_boxes_per_layer():
    image = imgscope.open(SAMPLES / "chain-top.qcow2")
    info = oracle.qemu_info(SAMPLES / "chain-top.qcow2", backing_chain=True)
    fig = plots.chain_diagram(image)
    ax = fig.axes[0]
    boxes = sorted(p.get_gid() for p in ax.patches if str(p.get_gid()).startswith("chain:"))
    assert boxes == [f"chain:{d}" for d in range(len(info))] and len(info) == 2
    texts = {t.get_gid(): t.get_text() for t in ax.texts}
    for d, layer in enumerate(info):
        text = texts[f"chain-text:{d}"]
        assert Path(layer["filename"]).name in text and layer["format"] in text
        assert plots.human_size(layer["virtual-size"]) in text
    arrows = [c for c in ax.get_children() if str(c.get_gid()).startswith("chain-arrow:")]
    assert len(arrows) == 1
    assert any(info[0]["backing-filename"] == t.get_text() for t in ax.texts)
    png(fig)
    single = plots.chain_diagram(imgscope.open(SAMPLES / "sparse.vdi")).axes[0]
    assert [p.get_gid() for p in single.patches] == ["chain:0"]


# --------------------------------------------------------------------------- every format
def _everything(image) -> Figure:
    """All pictures of one image on one figure (one draw: cheaper than seven)."""
    fig = Figure(figsize=(10, 26), dpi=40)
    axs = fig.subplots(7, 1)
    for fn, ax in zip(PICTURES, axs):
        assert getattr(plots, fn)(image, ax=ax) is fig
    plots.allocation_map(image, ax=axs[6], by_layer=True)
    return fig


def _every_format_cases():
    """Each format the model holds: raw, qcow2 (snapshots, chain, compressed), qcow, cow,
    VMDK (sparse, stream, several extent files), VDI, VHD, VHDX (dynamic, differencing)
    and two damaged files whose pointers run past the end."""
    out = [("sample", n) for n in ("demo.qcow2", "chain-top.qcow2", "compressed.qcow2",
                                   "sparse.raw", "sparse.qcow", "sparse.vdi", "sparse.vhd",
                                   "sparse.vhdx", "sparse.vmdk", "stream.vmdk")]
    out += [("vhdx", "child"), ("cow", "qcow2_backing"), ("vmdk", "mixed")]
    out += [("corrupt", n) for n in ("qcow2_l2_entry_beyond_eof.qcow2",
                                     "vhdx_bat_beyond_eof.vhdx")]
    return out


@pytest.mark.parametrize("where,name", _every_format_cases())
def test_every_picture_renders_for_every_format(where, name, built):
    if where == "sample":
        path = SAMPLES / name
    elif where == "corrupt":
        path = SAMPLES / "corrupt" / name
    else:
        path = Path(built[where][name])
    image = imgscope.open(path)
    if where == "corrupt":
        image.check()                   # its findings are marked on the layout strip
    fig = _everything(image)
    img = png(fig)
    assert img.shape[0] > 100 and img[..., :3].std() > 0
    alloc, layout = fig.axes[0], fig.axes[1]
    for ax in fig.axes:
        title = ax.get_title()
        assert path.name in title or not title, title
    # the strip has one row per host file of the image, each as wide as the axis
    files = list(dict.fromkeys(image.regions()["file"].astype(str)))
    rows = strips(layout)
    assert len(rows) == len(files)
    for r in rows:
        assert abs(r.pixel_codes.size - layout.bbox.width) <= 1
        assert (r.pixel_codes >= 0).any()
    # the guest picture covers the whole disk, in bars or a raster
    covered = union(s for c in alloc.collections if str(c.get_gid()).startswith("state:")
                    for s in bars(alloc, c.get_gid()))
    assert covered == [(0, image.virtual_size)] or strips(alloc)
    assert any(lab.get_text().endswith("iB") for lab in layout.get_xticklabels())
    if image.findings["host_offset"].notna().any():
        assert [c for c in layout.collections if c.get_gid() == "findings"]


# --------------------------------------------------------------------------- scale
def test_one_million_clusters_render_quickly(built, record_property, capsys):
    """64 GiB, metadata preallocation: 1 M clusters, 128 L2 tables, 33 refcount blocks."""
    path = built["big"]

    def render():
        times = {}
        t0 = time.perf_counter()
        image = imgscope.open(path)
        times["open"] = time.perf_counter() - t0
        out = {}
        for fn in ("layout_strip", "allocation_map"):
            t = time.perf_counter()
            fig = getattr(plots, fn)(image)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            times[fn] = time.perf_counter() - t
            ax = fig.axes[0]
            out[fn] = (len(ax.collections) + len(ax.images) + len(ax.patches),
                       [int(np.count_nonzero(r.pixel_codes >= 0)) for r in strips(ax)],
                       [r.pixel_codes.size for r in strips(ax)])
        return times, out, len(image.tables["refcounts"])

    res = run_isolated(render, timeout=60)
    assert res[0] == "ok", res
    times, out, clusters = res[1]
    assert clusters >= (64 * GiB) // (64 * KiB)
    artists, shown, widths = out["layout_strip"]
    assert artists <= 3 and shown == widths          # one raster, every pixel drawn
    assert out["allocation_map"][0] <= 5
    record_property("render_seconds", times)
    with capsys.disabled():
        print(f"\n64 GiB qcow2 (1 M clusters): open {times['open']:.2f} s, layout_strip "
              f"{times['layout_strip']:.2f} s, allocation_map {times['allocation_map']:.2f} s "
              "(each including savefig)")
