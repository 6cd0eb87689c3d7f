"""Command line: qemu-img style verbs over the common model.

    imgscope info [--output human|json] [--backing-chain] [-f FMT] FILE
    imgscope map  [--output human|json] [-f FMT] [--start-offset N] [--max-length N] FILE
    imgscope fields|tables [NAME]|regions [--output table|csv|json] FILE
    imgscope check [--output human|json] [-f FMT] [-p|-q] FILE   (exit 0/1/2/3 as qemu-img)
    imgscope partitions [--output table|csv|json] FILE
    imgscope lvm [--output table|csv|json] FILE
    imgscope survey PATH...

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
    for layer in img.chain:
        if layer is not img:
            layer.given_name = full_backing_name(layer_child)
        layer.source.given_name = layer.given_name
        for src in layer.files()[1:]:
            if src.named_as and not os.path.isabs(src.named_as):
                src.given_name = os.path.join(os.path.dirname(layer.given_name), src.named_as)
        layer_child = layer


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

    sp = sub.add_parser("regions", help="host-file layout: every byte's owner")
    common(sp, tab, "table")
    sp.set_defaults(func=cmd_regions)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `tables NAME --output json FILE`: argparse takes NAME as FILE when options
    # come between the two positionals; the leftover is the real FILE.
    if (extra and getattr(args, "verb", None) == "tables" and args.name is None
            and len(extra) == 1 and not extra[0].startswith("-")):
        args.name, args.filename = args.filename, extra[0]
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
