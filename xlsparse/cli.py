"""The `xlsparse` command line."""
import argparse
import importlib
import os
import pkgutil
import shutil
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


def _load_diff(path: str):
    from xlsparse import SparseDiff

    if os.path.isdir(path) and os.path.exists(os.path.join(path, "pytorch_diff.bin")):
        return SparseDiff.load_composable_sft(os.path.join(path, "pytorch_diff.bin"))
    if path.endswith(".bin"):
        return SparseDiff.load_composable_sft(path)
    return SparseDiff.load(path)


def cmd_compose(args: argparse.Namespace) -> int:
    import transformers

    import xlsparse

    alphas = args.alpha or [1.0] * len(args.diffs)
    if len(alphas) != len(args.diffs):
        raise ValueError(f"--alpha: {len(alphas)} values for {len(args.diffs)} diffs")
    config = transformers.AutoConfig.from_pretrained(args.base, local_files_only=True)
    arch = (config.architectures or ["AutoModel"])[0]
    model_class = getattr(transformers, arch, transformers.AutoModel)
    model = model_class.from_pretrained(args.base, local_files_only=True)
    diffs = [_load_diff(p) for p in args.diffs]
    xlsparse.apply(diffs, model, alphas=alphas)
    model.save_pretrained(args.out)
    for name in os.listdir(args.base):  # the tokenizer travels with the model
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "sentencepiece")):
            shutil.copy(os.path.join(args.base, name), args.out)
    print(f"wrote {arch} with {len(diffs)} diffs (alphas {alphas}) to {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    diff = _load_diff(args.diff)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(args.diff) for f in fs) \
        if os.path.isdir(args.diff) else os.path.getsize(args.diff)
    print(f"{args.diff}: {size / 2**20:.2f} MiB on disk, base model {diff.base_model or 'unknown'}")
    print(f"{len(diff.deltas)} sparse, {len(diff.dense)} dense, {len(diff.absolute)} absolute entries; {diff.nnz:,} nonzeros\n")
    print("| parameter | shape | nnz | density | dtype |")
    print("|---|---|---|---|---|")
    for name, d in diff.deltas.items():
        print(f"| {name} | {tuple(d.shape)} | {d.nnz:,} | {100 * d.density:.3f}% | {d.values.dtype} |")
    for kind, group in (("dense", diff.dense), ("absolute", diff.absolute)):
        for name, t in group.items():
            print(f"| {name} ({kind}) | {tuple(t.shape)} | {t.numel():,} | 100% | {t.dtype} |")
    return 0


def cmd_convert_composable_sft(args: argparse.Namespace) -> int:
    from xlsparse import SparseDiff

    src = os.path.join(args.src, "pytorch_diff.bin") if os.path.isdir(args.src) else args.src
    diff = SparseDiff.load_composable_sft(src)
    diff.save(args.out)
    print(f"converted {src} ({len(diff.deltas)} sparse, {len(diff.absolute)} absolute entries, {diff.nnz:,} nonzeros) to {args.out}")
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

    compose = sub.add_parser("compose", help="apply diffs to a saved Hugging Face model and save the merged model")
    compose.add_argument("base", metavar="BASE_DIR", help="a model folder saved with save_pretrained")
    compose.add_argument("diffs", metavar="DIFF", nargs="+", help="xlsparse diff files or composable-sft folders")
    compose.add_argument("--alpha", type=float, nargs="+", help="one weight per diff (default 1)")
    compose.add_argument("--out", required=True, metavar="DIR", help="folder for the merged model")
    compose.set_defaults(run=cmd_compose)

    info = sub.add_parser("info", help="describe a diff: density per module, size on disk, base model")
    info.add_argument("diff", metavar="DIFF")
    info.set_defaults(run=cmd_info)

    conv = sub.add_parser("convert-composable-sft", help="convert a composable-sft pytorch_diff.bin to an xlsparse diff")
    conv.add_argument("src", metavar="IN", help="pytorch_diff.bin or the folder holding it")
    conv.add_argument("out", metavar="OUT", help="the xlsparse diff file to write")
    conv.set_defaults(run=cmd_convert_composable_sft)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `xlsparse` console command."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as exc:  # a bad file or argument: one line, no traceback, exit status 1
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"xlsparse {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
