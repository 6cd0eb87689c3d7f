"""Command line: qemu-img style verbs over the common model.

    imgscope info [--output human|json] [--backing-chain] [-f FMT] FILE
    imgscope map  [--output human|json] [-f FMT] [--start-offset N] [--max-length N] FILE
    imgscope fields|tables [NAME]|regions [--output table|csv|json] FILE
    imgscope check [--output human|json] [-f FMT] [-p|-q] FILE   (exit 0/1/2/3 as qemu-img)
    imgscope partitions [--output table|csv|json] FILE
    imgscope lvm [--output table|csv|json] FILE
    imgscope survey PATH...
    imgscope hexdump [--structure NAME|list | --offset N [--length N]] [--file N]
                     [--output text|html|json] [--color] [-f FMT] FILE
    imgscope convert [-f FMT] [-O FMT] [-o k=v,...] [-c] [-S SIZE] [-B BACKING [-F FMT]]
                     [-l SNAPSHOT] [-p] [-n | --force] SRC DST
    imgscope create [-f FMT] [-o k=v,...] [-b BACKING [-F FMT]] FILE [SIZE]
    imgscope compare [-f FMT] [-F FMT] [-s] [-p] A B          (exit 0/1/2 as qemu-img)
    imgscope resize [-f FMT] [--shrink] FILE [+|-]SIZE

Errors print one line on stderr and exit non-zero (1), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import ImageError


def _open(args):
    import imgscope
    img = imgscope.open(args.filename, args.format, strict=getattr(args, "strict", False),
                        allow_paths=getattr(args, "allow_path", None) or None)
    for layer in img.chain:
        layer.given_name = None
    img.given_name = args.filename
    _name_chain(img)
    return img


def _name_chain(img) -> None:
    """Name each layer as qemu does: parent paths joined to the child's given name."""
    import os
    from .info import full_backing_name
    child = None
    for layer in img.chain:
        if child is not None:          # a backing layer: named from the layer above it
            layer.given_name = full_backing_name(child)
        layer.source.given_name = layer.given_name
        for src in layer.files()[1:]:
            if src.named_as and not os.path.isabs(src.named_as):
                src.given_name = os.path.join(os.path.dirname(layer.given_name), src.named_as)
        child = layer


def _size(text: str) -> int:
    from .units import parse_size
    try:
        return parse_size(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def cmd_info(args) -> int:
    from .info import human_info
    img = _open(args)
    infos = img.info(backing_chain=args.backing_chain)
    if args.output == "json":
        print(json.dumps(infos, indent=4))
    else:
        chain = infos if isinstance(infos, list) else [infos]
        print("\n\n".join(human_info(i) for i in chain))
    return 0


def cmd_map(args) -> int:
    from .map import map_entries, map_json_fast, map_human, map_table
    img = _open(args)
    if args.output == "json":
        sys.stdout.flush()
        table = map_table(img, args.start_offset, args.max_length)
        sys.stdout.buffer.write(map_json_fast(table, args.start_offset) + b"\n")
    else:
        print(map_human(map_entries(img, args.start_offset, args.max_length)))
    return 0


def _print_frame(df, output: str) -> None:
    import pandas as pd
    df = df.copy()
    # a table on a terminal shows the first 16 bytes of long fields; csv/json show all
    short = 16 if output == "table" else None

    def cell(v):
        if isinstance(v, (bytes, bytearray)):
            return v.hex() if short is None or len(v) <= short else v[:short].hex() + "..."
        return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(cell)
    if output == "csv":
        df.to_csv(sys.stdout, index=False)
    elif output == "json":
        print(df.to_json(orient="records", indent=2, default_handler=str))
    else:
        with pd.option_context("display.max_rows", None, "display.max_columns", None,
                               "display.width", 200, "display.max_colwidth", 60):
            print(df.to_string(index=False))


def cmd_fields(args) -> int:
    img = _open(args)
    df = img.fields
    if args.output != "json":
        df = df.drop(columns=["value"])
    _print_frame(df, args.output)
    return 0


def cmd_tables(args) -> int:
    img = _open(args)
    if not args.name:
        for name in img.tables:
            print(f"{name}: {len(img.tables[name])} rows")
        return 0
    if args.name not in img.tables:
        raise ImageError(f"no table {args.name!r} (have: {', '.join(img.tables)})",
                         path=args.filename)
    _print_frame(img.tables[args.name], args.output)
    return 0


def cmd_regions(args) -> int:
    img = _open(args)
    _print_frame(img.regions(), args.output)
    return 0


def cmd_check(args) -> int:
    """qemu-img check's verdict and counters plus every finding; exit 0/1/2/3 as qemu-img."""
    from .analysis.check import check_path
    bar = None
    if args.progress or (args.progress is None and sys.stderr.isatty()):
        from tqdm import tqdm
        bar = tqdm(total=1, unit="step", file=sys.stderr, leave=False)

        def progress(stage, done, total):
            bar.set_description(stage)
            bar.total, bar.n = max(total, 1), done
            bar.refresh()
    report = check_path(args.filename, args.format, given_name=args.filename,
                        progress=progress if bar is not None else None,
                        strict=args.strict, allow_paths=args.allow_path or None)
    if bar is not None:
        bar.close()
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=4))
    else:
        print(report.human())
    return report.exit_code


def cmd_partitions(args) -> int:
    """The guest disk's MBR/GPT; `--output json` is in the shape `sfdisk --json` prints."""
    img = _open(args)
    table = img.partition_table()
    if args.output == "json":
        print(json.dumps(table.to_sfdisk(), indent=3))
        return 0
    if args.output == "table":
        print(f"Disklabel type: {table.scheme}"
              + (f", identifier: {table.disk_id}" if table.disk_id else "")
              + f", sector size: {table.sector_size}")
    _print_frame(table.frame, args.output)
    return 0


def cmd_lvm(args) -> int:
    """The LVM2 physical volume on the guest disk: VG, PVs, LVs and segments."""
    img = _open(args)
    pv = img.lvm()
    if args.output == "json":
        print(json.dumps(pv.to_dict(), indent=2, default=str))
        return 0
    for name in ("volume_group", "physical_volumes", "logical_volumes", "segments"):
        if args.output == "table":
            print(f"{name}:")
        _print_frame(pv.tables[name], args.output)
        if args.output == "table":
            print()
    return 0


def _offset(text: str) -> int:
    """A byte offset or length: 4096, 0x1000, 64k, 1M."""
    t = text.strip().lower()
    try:
        return int(t, 16) if t.startswith("0x") else _size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid offset {text!r}") from None


def cmd_hexdump(args) -> int:
    """A structure or byte range with every field named (text like hexdump -C, html, json)."""
    from . import hexview
    try:
        img = _open(args)
    except ImageError as exc:
        if args.structure is not None:
            raise
        # a file no driver can read is still worth seeing: its bytes, unannotated
        import imgscope
        try:
            img = imgscope.open(args.filename, "raw")
        except ImageError:
            raise exc from None
        print(f"imgscope: {exc}; showing the bytes unannotated", file=sys.stderr)
    if args.structure == "list":
        for name in hexview.structures(img) + hexview.structure_forms(img):
            print(name)
        return 0
    d = hexview.annotate(img, args.structure, offset=args.offset, length=args.length,
                         file=args.file)
    if args.output == "html":
        print(d.html())
    elif args.output == "json":
        print(json.dumps(d.to_json(), indent=2))
    else:
        sys.stdout.write(d.text(width=args.width, colour=args.color))
    return 0


def cmd_survey(args) -> int:
    """One line per image in the given files/folders: what it is and what it holds."""
    import imgscope
    from pathlib import Path
    from .units import human_size
    paths = []
    for p in args.paths:
        p = Path(p)
        paths += sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]
    rows = [("FILE", "FORMAT", "VIRTUAL", "DATA", "CHAIN", "SNAPSHOTS", "FINDINGS")]
    for path in paths:
        try:
            cands = imgscope.probe(path)
            if cands[0].format == "raw" and path.suffix not in (".raw", ".img", ".bin", ".dd"):
                continue  # not an image (scripts, notes)
            with imgscope.open(path, allow_paths=args.allow_path) as img:
                ext = img.extents()
                data = int(ext.length[ext.kind.isin(["data", "compressed", "encrypted"])].sum())
                rows.append((path.name, f"{img.format} {img.variant}".strip(),
                             human_size(img.virtual_size), human_size(data),
                             " <- ".join(i.path.name for i in img.chain[1:]) or "-",
                             str(len(img.snapshots)), str(len(img.findings))))
        except ImageError as exc:
            rows.append((path.name, "error", "-", "-", "-", "-", exc.message))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


# ---- writing verbs -----------------------------------------------------------------------
def _parse_o(texts: list[str] | None) -> dict:
    """qemu-img's `-o k=v,k2=v2` (`,,` is a literal comma); repeated -o accumulate."""
    out: dict = {}
    for text in texts or []:
        parts, cur, i = [], "", 0
        while i < len(text):
            if text[i] == ",":
                if text[i + 1:i + 2] == ",":
                    cur += ","
                    i += 2
                    continue
                parts.append(cur)
                cur = ""
            else:
                cur += text[i]
            i += 1
        parts.append(cur)
        for part in filter(None, parts):
            key, eq, value = part.partition("=")
            out[key] = value if eq else "on"
    return out


def _options_help(fmt: str) -> str:
    from .conversion.writers import writer_class
    cls = writer_class(fmt)
    lines = [f"Supported options ({cls.format}):"]
    lines.append(f"  {'size':<24} <size>     - Virtual disk size")
    for opt in cls.OPTIONS.values():
        kind = {"size": "<size>", "bool": "<bool (on/off)>", "int": "<num>",
                "str": "<str>", "choice": "<str>"}[opt.kind]
        lines.append(f"  {opt.name:<24} {kind:<10} - {opt.help}")
    return "\n".join(lines)


def cmd_convert(args) -> int:
    from .conversion.pipeline import convert
    options = _parse_o(args.options)
    if options.pop("help", None) is not None or options.pop("?", None) is not None:
        print(_options_help(args.output_format))
        return 0
    convert(args.src, args.dst, args.output_format, options=options, compress=args.compress,
            source_format=args.format, snapshot=args.snapshot, sparse_size=args.sparse_size,
            backing=args.backing, backing_format=args.backing_format,
            overwrite=args.force, into_existing=args.into_existing, progress=args.progress,
            allow_paths=args.allow_path or None)
    return 0


def cmd_create(args) -> int:
    from .conversion.pipeline import create
    from .units import human_size
    options = _parse_o(args.options)
    if options.pop("help", None) is not None or options.pop("?", None) is not None:
        print(_options_help(args.format))
        return 0
    size = args.size if args.size is not None else options.pop("size", None)
    path = create(args.filename, args.format, size, options, backing=args.backing,
                  backing_format=args.backing_format, overwrite=args.force,
                  allow_paths=args.allow_path or None)
    if not args.quiet:
        import imgscope
        with imgscope.open(path, args.format, allow_paths=args.allow_path or None) as img:
            print(f"Formatting '{args.filename}', fmt={args.format} "
                  f"size={img.virtual_size} ({human_size(img.virtual_size)})")
    return 0


def cmd_compare(args) -> int:
    """qemu-img compare: exit 0 identical, 1 different, 2+ errors; text as qemu-img prints."""
    from .conversion.compare import compare_images
    result = compare_images(args.image_a, args.image_b, fmt_a=args.format,
                            fmt_b=args.format_b, strict=args.strict,
                            progress=bool(args.progress), allow_paths=args.allow_path or None)
    if result.message and not args.quiet:
        stream = sys.stdout if result.exit_code in (0, 1) else sys.stderr
        print(result.message, file=stream)
    return result.exit_code


def cmd_resize(args) -> int:
    if args.size is None:
        raise ImageError("resize needs a size: [+|-]SIZE", path=args.filename)
    from .conversion.resize import resize_image, parse_new_size
    import imgscope
    with imgscope.open(args.filename, args.format) as img:
        asked = parse_new_size(args.size, img.virtual_size)
    size = resize_image(args.filename, args.size, fmt=args.format, shrink=args.shrink)
    if not args.quiet:
        print("Image resized.")
    if size != asked:
        print(f"note: the disk is {size} bytes (the format rounds the size asked, {asked})",
              file=sys.stderr)
    return 0


def _add_writing_verbs(sub) -> None:
    F = argparse.RawDescriptionHelpFormatter
    sp = sub.add_parser(
        "convert", formatter_class=F,
        help="convert an image to another format (qemu-img convert)",
        usage="imgscope convert [-f FMT] [-O OUTPUT_FMT] [-o OPTIONS] [-c] [-S SPARSE_SIZE] "
              "[-B BACKING_FILE [-F BACKING_FMT]] [-l SNAPSHOT] [-p] [-n | --force] SRC DST",
        description="Convert the disk image SRC to DST using format OUTPUT_FMT (raw by "
                    "default, as qemu-img).\n\n"
                    "SRC may also be FILE:partN (partition N of the image's guest disk, "
                    "numbered as Linux does: 1-4 primary, 5+ logical) or FILE:lvm:LVNAME (a "
                    "linear LVM logical volume on the guest disk).\n\n"
                    "Only the source's data is read: unallocated and zero ranges are skipped, "
                    "data is zero-detected per unit (-S), so the output stays sparse. The "
                    "output is built in a temporary folder beside DST and appears under DST's "
                    "name only when complete; an existing DST is refused unless --force "
                    "replaces it, or -n writes into it in place (qemu-img's 'skip target "
                    "creation': a raw file or block device at least as large as SRC; every "
                    "byte of it is written, zeros punched as holes).\n\n"
                    "'-o help' lists the options of OUTPUT_FMT.")
    sp.add_argument("-f", dest="format", metavar="FMT", help="source format (default: probe)")
    sp.add_argument("-O", dest="output_format", metavar="OUTPUT_FMT", default="raw",
                    help="output format (default raw)")
    sp.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                    help="format options, comma separated key=value ('-o help' lists them)")
    sp.add_argument("-c", dest="compress", action="store_true",
                    help="compress the output (qcow2, vmdk streamOptimized, ...)")
    sp.add_argument("-S", dest="sparse_size", type=_size, default=4096, metavar="SPARSE_SIZE",
                    help="consecutive zero bytes that make a hole in the output "
                         "(default 4k; 0 writes every byte)")
    sp.add_argument("-B", dest="backing", metavar="BACKING_FILE",
                    help="backing file of the output: only what differs from it is written")
    sp.add_argument("-F", dest="backing_format", metavar="BACKING_FMT",
                    help="format of the backing file (default: probe)")
    sp.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                    help="convert this internal snapshot (name or id) of SRC")
    sp.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    sp.add_argument("--force", action="store_true", help="replace DST if it exists")
    sp.add_argument("-n", dest="into_existing", action="store_true",
                    help="do not create DST: write into the existing raw file or device")
    sp.add_argument("--allow-path", action="append", metavar="DIR",
                    help="also allow backing files under DIR")
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("dst", metavar="DST")
    sp.set_defaults(func=cmd_convert)

    sp = sub.add_parser(
        "create", formatter_class=F, help="create a new empty image (qemu-img create)",
        usage="imgscope create [-f FMT] [-o OPTIONS] [-b BACKING_FILE [-F BACKING_FMT]] "
              "[-q] [--force] FILENAME [SIZE]",
        description="Create the new disk image FILENAME of size SIZE and format FMT. With "
                    "-b, SIZE defaults to the backing file's size. SIZE takes k, M, G, T "
                    "suffixes (powers of 1024). '-o help' lists the options of FMT.")
    sp.add_argument("-f", dest="format", metavar="FMT", default="raw",
                    help="image format (default raw)")
    sp.add_argument("-o", dest="options", action="append", metavar="OPTIONS")
    sp.add_argument("-b", dest="backing", metavar="BACKING_FILE")
    sp.add_argument("-F", dest="backing_format", metavar="BACKING_FMT")
    sp.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    sp.add_argument("--force", action="store_true", help="replace FILENAME if it exists")
    sp.add_argument("--allow-path", action="append", metavar="DIR")
    sp.add_argument("filename", metavar="FILENAME")
    sp.add_argument("size", metavar="SIZE", nargs="?", type=_size)
    sp.set_defaults(func=cmd_create)

    sp = sub.add_parser(
        "compare", help="compare two images' guest disks (qemu-img compare)",
        usage="imgscope compare [-f FMT] [-F FMT] [-s] [-p] [-q] FILENAME1 FILENAME2",
        description="Check if two images have the same content. Exit 0 identical, 1 "
                    "different, 2 an image could not be opened, 3 allocation status "
                    "unknown, 4 read error.")
    sp.add_argument("-f", dest="format", metavar="FMT", help="format of the first image")
    sp.add_argument("-F", dest="format_b", metavar="FMT", help="format of the second image")
    sp.add_argument("-s", dest="strict", action="store_true",
                    help="strict mode: a size or allocation difference is a difference")
    sp.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    sp.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    sp.add_argument("--allow-path", action="append", metavar="DIR")
    sp.add_argument("image_a", metavar="FILENAME1")
    sp.add_argument("image_b", metavar="FILENAME2")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser(
        "resize", help="grow or shrink an image (qemu-img resize)",
        usage="imgscope resize [-f FMT] [--shrink] [-q] FILENAME [+|-]SIZE",
        description="Change the virtual size of FILENAME to SIZE, or by +SIZE / -SIZE. "
                    "Shrinking needs --shrink (data past the new end is lost).")
    sp.add_argument("-f", dest="format", metavar="FMT")
    sp.add_argument("--shrink", action="store_true", help="allow making the image smaller")
    sp.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    sp.add_argument("filename", metavar="FILENAME")
    sp.add_argument("size", metavar="[+|-]SIZE", nargs="?")
    sp.set_defaults(func=cmd_resize)


def _hexdump_options(sp) -> None:
    what = sp.add_mutually_exclusive_group()
    what.add_argument("--structure", metavar="NAME",
                      help="structure to show (default: the header); 'list' prints the names "
                           "this image has, including forms like l2@OFFSET")
    what.add_argument("--offset", type=_offset, metavar="N",
                      help="show the bytes from offset N of the host file instead")
    sp.add_argument("--length", type=_offset, metavar="N",
                    help="bytes to show (default 256 from --offset; a structure is cut at "
                         "4 KiB unless a length is given; at most 16 KiB)")
    sp.add_argument("--file", type=int, default=0, metavar="N",
                    help="host file number for --offset (VMDK extents, data files; default 0)")
    sp.add_argument("--width", type=int, default=16, metavar="N", help="bytes per line (text)")
    sp.add_argument("--color", "--colour", dest="color", action="store_true",
                    help="colour the fields (ANSI, text output)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgscope", description="Look inside VM disk images "
                                "(qemu-img compatible verbs plus our own).")
    p.add_argument("--version", action="version", version=f"imgscope {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    def common(sp, outputs=("human", "json"), default="human", before_file=None):
        sp.add_argument("-f", "--format", dest="format", help="image format (default: probe)")
        sp.add_argument("--output", choices=outputs, default=default,
                        help=f"output format (default {default})")
        sp.add_argument("--allow-path", action="append", metavar="DIR",
                        help="also allow backing/data files under DIR")
        sp.add_argument("--strict", action="store_true", help="fail on the first damaged structure")
        sp.add_argument("-U", "--force-share", action="store_true",
                        help="accepted for qemu-img compatibility (imgscope never locks or writes)")
        if before_file:
            before_file(sp)
        sp.add_argument("filename", metavar="FILE")

    sp = sub.add_parser("info", help="summary like qemu-img info")
    common(sp)
    sp.add_argument("--backing-chain", action="store_true", help="show every layer of the chain")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("map", help="guest map like qemu-img map")
    common(sp)
    sp.add_argument("--start-offset", type=_size, default=0, metavar="OFFSET")
    sp.add_argument("--max-length", type=_size, default=None, metavar="LEN")
    sp.set_defaults(func=cmd_map)

    tab = ("table", "csv", "json")
    sp = sub.add_parser("fields", help="every header field with offset, bytes and meaning")
    common(sp, tab, "table")
    sp.set_defaults(func=cmd_fields)

    sp = sub.add_parser("tables", help="list metadata tables, or print one")
    common(sp, tab, "table", before_file=lambda p: p.add_argument(
        "name", nargs="?", help="table to print (omit to list the tables)"))
    sp.set_defaults(func=cmd_tables)

    sp = sub.add_parser("check", help="find and explain damage (exit codes as qemu-img check)")
    common(sp)
    sp.add_argument("-p", "--progress", action="store_true", default=None,
                    help="show progress on stderr (default: when stderr is a terminal)")
    sp.add_argument("-q", "--quiet", dest="progress", action="store_false",
                    help="no progress")
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("partitions", help="MBR/GPT partitions of the guest disk "
                        "(--output json: as sfdisk --json)")
    common(sp, tab, "table")
    sp.set_defaults(func=cmd_partitions)

    sp = sub.add_parser("lvm", help="LVM2 volume group, physical and logical volumes")
    common(sp, tab, "table")
    sp.set_defaults(func=cmd_lvm)

    sp = sub.add_parser("survey", help="one line per image in files or folders")
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument("--allow-path", action="append", metavar="DIR")
    sp.set_defaults(func=cmd_survey)

    sp = sub.add_parser("hexdump", help="annotated hex dump: every field of a structure named "
                        "and explained ('--structure list' names them)")
    common(sp, ("text", "html", "json"), "text", before_file=_hexdump_options)
    sp.set_defaults(func=cmd_hexdump)

    sp = sub.add_parser("regions", help="host-file layout: every byte's owner")
    common(sp, tab, "table")
    sp.set_defaults(func=cmd_regions)
    _add_writing_verbs(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # imgscope does no linear algebra: numpy's BLAS worker threads (started at import)
    # would only compete with the copy threads for the CPUs
    if "numpy" not in sys.modules:
        import os
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `tables NAME --output json FILE`: argparse takes NAME as FILE when options
    # come between the two positionals; the leftover is the real FILE.
    if (extra and getattr(args, "verb", None) == "tables" and args.name is None
            and len(extra) == 1 and not extra[0].startswith("-")):
        args.name, args.filename = args.filename, extra[0]
    elif (extra and getattr(args, "verb", None) == "resize" and args.size is None
          and len(extra) == 1):
        args.size = extra[0]          # `-1G` looks like an option to argparse
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ImageError as exc:
        print(f"imgscope: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("imgscope: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError, ValueError, RecursionError) as exc:
        print(f"imgscope: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line (IMGSCOPE_DEBUG=1 shows the traceback)
        import os
        if os.environ.get("IMGSCOPE_DEBUG"):
            raise
        print(f"imgscope: internal error ({type(exc).__name__}: {exc}); "
              "set IMGSCOPE_DEBUG=1 for details", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
