"""`sheepop report RUN_DIR [log_x=true] [out=DIR]`: report.html and report.md of a run (sheepop.monitor.report)."""
from __future__ import annotations

from sheepop.cli.args import parse_kv, wants_help

OPTIONS = {"log_x": bool, "out": str}
USAGE = ("usage: sheepop report RUN_DIR [log_x=true] [out=DIR]\n"
         "  writes DIR/report.html (self-contained) and DIR/report.md + DIR/report_files/*.png; DIR defaults to RUN_DIR")


def main(argv: list[str]) -> int:
    if not argv or wants_help(argv):
        print(USAGE)
        return 0 if argv else 2
    run_dir = argv[0].split("=", 1)[1] if argv[0].startswith("run.dir=") else argv[0]  # as the other commands take it
    opts = parse_kv(argv[1:], OPTIONS, "report")
    if opts.get("out"):  # report files are its own: replaced, but never in place of a file or under one
        from sheepop import output_paths

        output_paths.check(opts["out"], "out", kind="folder", force=True)
    from sheepop.monitor.report import write

    html_path, md_path = write(run_dir, opts.get("out"), opts.get("log_x", False))
    print(f"wrote {html_path} ({html_path.stat().st_size / 1024:.0f} KiB) and {md_path}")
    return 0
