"""The `xlsparse` command line."""
import argparse
import importlib
import pkgutil
import sys


def _families() -> dict[str, object]:
    from xlsparse import benchmarks

    found = {}
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name.startswith("bench_"):
            found[info.name[len("bench_"):]] = info.name
    return found


# The order the table is printed in: composition first, so its first row is sparse_axpy_.
_ORDER = ("compose", "optim", "matmul")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from xlsparse.benchmarks import harness

    families = _families()
    names = [args.family] if args.family else sorted(families, key=lambda f: (_ORDER + (f,)).index(f))
    for name in names:
        if name not in families:
            raise SystemExit(f"xlsparse bench: unknown family {name!r}; choose from {sorted(families)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ceilings = harness.measure_ceilings(quick=args.quick)
    harness.print_ceilings(ceilings)
    for name in names:
        module = importlib.import_module(f"xlsparse.benchmarks.{families[name]}")
        rows = []
        for case in module.cases(quick=args.quick):
            row = harness.measure(case, ceilings, quick=args.quick)
            print(harness.format_row(row), flush=True)
            rows.append(row)
        path = harness.save(name, rows, ceilings, args.out)
        print(f"<!-- {name}: {len(rows)} rows written to {path} -->", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the kernel benchmarks and print the table")
    bench.add_argument("--family", help="one op family (default: all)")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    bench.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `xlsparse` console command."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, IndexError, OSError, RuntimeError) as exc:
        print(f"xlsparse {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
