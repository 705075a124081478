"""The `xlsparse` command line."""
import argparse
import dataclasses
import importlib
import math
import os
import pkgutil
import shutil
import sys

from ._paths import check_output, made_folder


def _benchmarks():
    """The benchmarks package, shipped as `xlsparse.benchmarks`."""
    return importlib.import_module("xlsparse.benchmarks")


def _families() -> dict[str, str]:
    found = {}
    for info in pkgutil.iter_modules(_benchmarks().__path__):
        if info.name.startswith("bench_"):
            found[info.name[len("bench_"):]] = info.name
    return found


# The order the table is printed in: composition first, so its first row is sparse_axpy_.
_ORDER = ("compose", "optim", "matmul")
# Run only when named: whole XLM-R-base training steps (about 5 GB and tens of seconds per step
# on 2 cores), too heavy for the default table.
_ON_REQUEST = ("ltsft",)


def _progress(items, desc: str):
    """tqdm over `items` on stderr, or the items alone where tqdm (the hf extra) is missing."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="case", file=sys.stderr)


def _measure_families(harness, families: dict, names: list, args) -> dict:
    """{family: rows}."""
    results = {}
    for name in names:
        module = importlib.import_module(f"xlsparse.benchmarks.{families[name]}")
        rows = []
        for case in _progress(module.cases(quick=args.quick, device=args.device), name):
            try:
                rows.append(harness.measure(case, args.device, quick=args.quick))
            except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as exc:
                # One broken kernel must not hide the other rows; its row says FAILED and the run exits 1.
                rows.append(harness.failed_row(case, exc))
        results[name] = rows
    return results


def _plot_path(path: str) -> str:
    """The file `--plot path` writes: matplotlib adds .png to a name without a suffix, so the path
    printed is the one written. Checked before the run, as plotting comes after all of it."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install xlsparse[examples]") from None
    if not path:  # with the suffix added, '' became '.png', a hidden file in the working folder
        raise ValueError("--plot: an empty path; give a file such as bench.png")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise ValueError(f"--plot {path}: is a folder; give a file such as {os.path.join(path, 'bench.png')}")
    suffix = os.path.splitext(path)[1][1:].lower()
    if not suffix:
        path += ".png"
    elif suffix not in FigureCanvasBase.get_supported_filetypes():
        raise ValueError(f"--plot {path}: matplotlib cannot write .{suffix} files; give a name ending in one of "
                         f"{', '.join(sorted(FigureCanvasBase.get_supported_filetypes()))} (.png, say)")
    check_output("--plot", path, folder=False)
    return path


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    families = _families()
    harness = importlib.import_module("xlsparse.benchmarks.harness")
    # "" (an unset shell variable) is an unknown family, not every family
    names = [args.family] if args.family is not None else sorted((f for f in families if f not in _ON_REQUEST),
                                                                  key=lambda f: (_ORDER + (f,)).index(f))
    for name in names:
        if name not in families:
            raise ValueError(f"--family: unknown family {name!r}; choose from {sorted(families)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    if args.threads < 0:
        raise ValueError(f"--threads must be 0 (torch's choice) or more, got {args.threads}")
    check_output("--out", args.out, folder=True)
    # --plot alone writes beside the JSON (it wrote benchmarks/results/bench.png whatever --out said);
    # --plot '' was dropped once: no plot, exit 0
    plot_path = None if args.plot is None else _plot_path(os.path.join(args.out, "bench.png") if args.plot is True
                                                          else args.plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = harness.describe_machine(args.device)
    monitor = harness.LoadMonitor()
    before = harness.measure_ceilings(machine, quick=args.quick)
    results = _measure_families(harness, families, names, args)
    after = harness.measure_ceilings(machine, quick=args.quick)
    load = monitor.finish()
    best = harness.best_ceilings(before, after)
    lines = harness.header_lines(machine, before, after, load, args.quick)
    all_rows = []
    for name, rows in results.items():
        for row in rows:  # roofline shares against the higher of the two measured ceilings
            harness.judge(row, best)
        lines += ["", f"### {name}", ""] + harness.format_table(rows)
        path = harness.save(name, rows, machine, before, after, load, args.out)
        print(f"<!-- {name}: {len(rows)} rows written to {path} -->", file=sys.stderr)
        all_rows += rows
    lines += ["", "### targets (issues 12 and 14)", ""] + harness.format_targets(all_rows, args.quick)
    print("\n".join(lines), flush=True)
    if plot_path:
        plot = importlib.import_module("xlsparse.benchmarks.plot")
        noisy = "NOISY " if harness.noisy_reasons(before, after, load, machine.threads) else ""
        title = f"{noisy}{machine.processor}, {machine.threads} threads, torch {machine.torch}"
        print(f"plot written to {plot.plot([dataclasses.asdict(r) for r in all_rows], plot_path, title)}")
    failed = [r for r in all_rows if r.note.startswith("FAILED")]
    if failed:
        print(f"xlsparse bench: {len(failed)} rows failed", file=sys.stderr)
    return 1 if failed else 0


def _diff_file(arg: str, path: str) -> str:
    """The file a diff argument names: itself, or the pytorch_diff.bin of a composable-sft folder."""
    if not os.path.exists(path):  # named here: the loaders' errors name the path only, or torch.load's errno
        raise ValueError(f"{arg} {path}: no such file or folder")
    if not os.path.isdir(path):
        return path
    file = os.path.join(path, "pytorch_diff.bin")
    if not os.path.isfile(file):
        # a folder of hf.save_pretrained or of a trainer holds xlsparse diff files: say which
        diffs = [os.path.join(path, n) for n in sorted(os.listdir(path)) if _is_xlsparse_diff(os.path.join(path, n))]
        hint = f"; it holds the xlsparse diff files {', '.join(diffs)}" if diffs else \
            "; it is a model folder (config.json), not a diff" if os.path.isfile(os.path.join(path, "config.json")) else ""
        raise ValueError(f"{arg} {path}: a folder without pytorch_diff.bin (a composable-sft diff folder holds one){hint}")
    return file


def _is_safetensors(file: str) -> bool:
    """Whether `file` opens as a safetensors file does: an 8-byte header size that fits in the
    file, then its JSON (torch.save's zip and pickle files start with bytes that read as a size
    far beyond their own)."""
    try:
        with open(file, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size


def _is_xlsparse_diff(file: str) -> bool:
    """Whether `file` is a safetensors file that `SparseDiff.save` wrote (its metadata says so)."""
    if not (file.endswith(".safetensors") and os.path.isfile(file) and _is_safetensors(file)):
        return False
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return "xlsparse" in (f.metadata() or {})
    except Exception:  # unreadable: not offered as a diff
        return False


def _load_diff(path: str):
    from xlsparse import SparseDiff

    file = _diff_file("DIFF", path)
    # A .bin name is composable-sft's, unless the file is an xlsparse one: `SparseDiff.save` and
    # convert-composable-sft write any name (OUT.bin was written, then unreadable to info and compose).
    if file.endswith(".bin") and not _is_safetensors(file):
        return SparseDiff.load_composable_sft(file)
    return SparseDiff.load(file)


def _saved_configs(paths: list[str]) -> dict:
    """{DIFF path: (its file name, folder, XlsparseConfig)} for each DIFF that `hf.save_pretrained`
    wrote (its xlsparse config lies beside it)."""
    from xlsparse.hf.config import CONFIG_NAME, XlsparseConfig
    from xlsparse.hf.model import _saved_file

    saved = {}
    for path in paths:
        folder, name = os.path.split(os.path.realpath(path))
        if name != CONFIG_NAME and _saved_file(name) and os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            saved[path] = (name, folder, XlsparseConfig.load(folder))
    return saved


def _refuse_routed_part_alone(paths: list[str], saved: dict) -> None:
    """A routed ('multi') model saved by `hf.save_pretrained` keeps its shared entries (the saved
    modules) in xlsparse_diff.safetensors and each language's deltas in its own file. Every language
    runs with the shared entries: given without any language's file, compose wrote base + heads, with
    no language; a language's file without the shared one (that holds some) kept the base's modules
    in place of the trained ones. Both silently. `saved`: `_saved_configs(paths)`."""
    from xlsparse.hf.model import DIFF_NAME, _lang_file

    given = {os.path.realpath(p) for p in paths}
    for path, (name, folder, config) in saved.items():
        if config.kind != "multi":
            continue
        files = [_lang_file(i) for i in range(len(config.languages))]
        if name == DIFF_NAME and not given & {os.path.join(folder, f) for f in files}:
            raise ValueError(f"DIFF {path}: the shared entries of a routed ('multi') model, without its languages' "
                             f"deltas; give the file of the language to compose too: "
                             + ", ".join(f"{f} ({lang})" for f, lang in zip(files, config.languages)))
        shared = os.path.join(folder, DIFF_NAME)
        if name != DIFF_NAME and config.modules_to_save and shared not in given:
            raise ValueError(f"DIFF {path}: one language's deltas of a routed ('multi') model, without the trained "
                             f"modules {config.modules_to_save[:3]} that every language runs with, in {shared}; give "
                             f"that file too (add --no-abs-of {shared} to keep the base's modules instead)")


# Files of a model folder that hold weights (and their shard indexes): compose writes its own.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


def _holds_weights(name: str) -> bool:
    return name.removesuffix(".index.json").endswith(WEIGHT_SUFFIXES)


def cmd_compose(args: argparse.Namespace) -> int:
    import transformers

    import xlsparse

    alphas = args.alpha or [1.0] * len(args.diffs)
    if len(alphas) != len(args.diffs):
        raise ValueError(f"--alpha: {len(alphas)} values for {len(args.diffs)} diffs")
    if not os.path.isdir(args.base):  # checked here: transformers would look it up on the Hub
        raise ValueError(f"BASE_DIR {args.base}: no such folder")
    from xlsparse.hf.config import CONFIG_NAME
    from xlsparse.diff import _named_tensors
    from xlsparse.hf.model import _check_same_base

    if os.path.isfile(os.path.join(args.base, CONFIG_NAME)):
        # a converted model's save_pretrained (a Trainer checkpoint): the model class would load its
        # base weights and drop its deltas, and OUT would get an xlsparse_config.json without its diff
        raise ValueError(f"BASE_DIR {args.base}: holds {CONFIG_NAME}, a model converted by xlsparse.hf, whose deltas "
                         "transformers' from_pretrained would drop; compose onto the base it was converted from, its "
                         "diff file among the DIFFs, or load it with xlsparse.hf.from_pretrained and merge_and_unload")
    if os.path.realpath(args.out) == os.path.realpath(args.base):
        raise ValueError(f"--out {args.out} is BASE_DIR: the merged model would overwrite the base; give another folder")
    check_output("--out", args.out, folder=True)
    if os.path.isdir(args.out) and os.listdir(args.out):  # another model's files would stay beside the new ones
        raise ValueError(f"--out {args.out}: a folder that is not empty; give a new or empty folder")
    # Real paths: ./a.safetensors is the DIFF a.safetensors.
    real = [os.path.realpath(p) for p in args.diffs]
    twice = sorted({p for p, r in zip(args.diffs, real) if real.count(r) > 1})
    if twice:  # added twice, silently (a repeated shell glob or path); a scale is --alpha's
        raise ValueError(f"DIFF: {twice} given more than once; give each diff once (scale one with --alpha)")
    no_abs_of = {os.path.realpath(p) for p in args.no_abs_of}
    unknown = [p for p in args.no_abs_of if os.path.realpath(p) not in set(real)]
    if unknown:
        raise ValueError(f"--no-abs-of: {unknown} are not among the DIFF arguments {args.diffs}")
    if args.num_labels is not None and args.num_labels < 1:
        raise ValueError(f"--num-labels: must be at least 1, got {args.num_labels}")
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise ValueError(f"--alpha: {bad} are not finite")
    saved = _saved_configs(args.diffs)
    _refuse_routed_part_alone(args.diffs, saved)
    diffs = [_load_diff(p) for p in args.diffs]  # before the model: a bad DIFF is told at once
    for i, (p, d, a) in enumerate(zip(args.diffs, diffs, alphas)):
        if a != 1.0 and d.absolute and not args.no_abs and os.path.realpath(p) not in no_abs_of:
            raise ValueError(f"--alpha: {p} has absolute entries (heads), which take no scale, but its alpha is {a}; "
                             f"give it alpha 1, or pass --no-abs-of {p} / --no-abs")
    config = transformers.AutoConfig.from_pretrained(args.base, local_files_only=True)
    # "" (an unset shell variable) is no class: it fell back to the config's architecture silently
    arch = args.model_class if args.model_class is not None else (config.architectures or ["AutoModel"])[0]
    model_class = getattr(transformers, arch, None)
    # An Auto* model class or a concrete model; not a config, tokenizer or an abstract *PreTrainedModel base.
    concrete = isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel) \
        and not arch.endswith("PreTrainedModel")
    if not (arch.startswith("AutoModel") and model_class is not None or concrete):
        raise ValueError(f"--model-class: {arch!r} is not a transformers model class (such as AutoModelForMaskedLM "
                         "or BertForMaskedLM)")
    labels = {} if args.num_labels is None else {"num_labels": args.num_labels}
    model, loading = model_class.from_pretrained(args.base, local_files_only=True, output_loading_info=True, **labels)
    if labels and args.num_labels != config.num_labels and not loading["missing_keys"]:
        # every weight came from BASE_DIR: no head was built for N labels, only config.json says N
        raise ValueError(f"--num-labels {args.num_labels}: {arch} loads every weight from BASE_DIR {args.base}, so it "
                         "builds no head of that size; give a --model-class with a classification head, such as "
                         "AutoModelForTokenClassification")
    diffs = [d.without_absolute() if os.path.realpath(p) in no_abs_of else d for p, d in zip(args.diffs, diffs)]
    given = set() if args.no_abs else {n for d in diffs for n in d.absolute}
    fresh = sorted(set(loading["missing_keys"]) - given)
    if fresh:  # transformers only logs these; OUT would hold a head drawn at random, another one each run
        raise ValueError(f"--model-class {arch}: BASE_DIR {args.base} has no weights for {fresh[:4]}"
                         f"{' ...' if len(fresh) > 4 else ''}, which transformers initialises at random, and no DIFF "
                         "gives them as absolute entries; give a DIFF that holds that head (a task SFT trained "
                         "with it) or compose onto a base that has it")
    # a DIFF that hf.save_pretrained wrote goes only onto the base it was trained on, as from_pretrained checks
    for path, (_, folder, config) in saved.items():
        _check_same_base(model, config, folder, what=f"DIFF {path}")
    # Named here, with apply's own lookup: apply's error says "diff 0" and names no option (a
    # language SFT's MLM head onto a task model needs --no-abs-of; a diff of another class, --model-class).
    known = _named_tensors(model)
    for p, d in zip(args.diffs, diffs):
        heads = [] if args.no_abs else [n for n in d.absolute if n not in known]
        if heads:
            raise ValueError(f"DIFF {p}: its absolute entries {heads[:3]} (a head) are not in {arch}; pass --no-abs-of "
                             f"{p} to leave them out, or give the --model-class it was trained with")
        absent = [n for n in [*d.deltas, *d.dense] if n not in known]
        if absent:
            raise ValueError(f"DIFF {p}: changes {absent[:3]}, which {arch} has not; give the --model-class "
                             "it was trained with")
    xlsparse.apply(diffs, model, alphas=alphas, with_abs=not args.no_abs)
    # Every file but the weights travels with the model (tokenizer, chat template, processor
    # config...); copied first, so that what save_pretrained writes (config.json) wins.
    # a full disk half way leaves no half-written model: OUT (new, or checked empty above) is as it was
    with made_folder(args.out, undo_added=True):
        for name in os.listdir(args.base):
            path = os.path.join(args.base, name)
            if os.path.isfile(path) and not _holds_weights(name):
                shutil.copy(path, args.out)
        model.save_pretrained(args.out)
    print(f"wrote {arch} with {len(diffs)} diffs (alphas {alphas}) to {args.out}")
    return 0


def _print_install() -> None:
    """What `xlsparse info` prints without a DIFF: the version, the compiled extension and, per op,
    the backends this install has (`xlsparse.backends()`)."""
    import torch

    from xlsparse import __version__, _ext, backends

    ext = (f"loaded, CPU kernels for {_ext.cpu_capability()}" if _ext.loaded() else
           "not loaded, every op runs its PyTorch reference")
    print(f"xlsparse {__version__}, torch {torch.__version__}; compiled extension: {ext}; "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}\n")
    print("| op | cpu | cuda | triton |")
    print("|---|---|---|---|")
    for op, table in backends().items():
        print(f"| {op} | " + " | ".join("yes" if table[b] else "no" for b in ("cpu", "cuda", "triton")) + " |")


def cmd_info(args: argparse.Namespace) -> int:
    if args.diff is None:  # DESIGN's `xlsparse info`: it stopped at a usage error (exit status 2)
        _print_install()
        return 0
    diff = _load_diff(args.diff)
    # the diff file's size: a composable-sft folder also holds a trainer's files (training_args.bin,
    # checkpoints), which the whole folder's size counted as the diff's
    size = os.path.getsize(_diff_file("DIFF", args.diff))
    print(f"{args.diff}: {size / 2**20:.2f} MiB on disk, base model {diff.base_model or 'unknown'}")
    print(f"{len(diff.deltas)} sparse, {len(diff.dense)} dense, {len(diff.absolute)} absolute entries; {diff.nnz:,} stored delta values (explicit zeros included)\n")
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

    src = _diff_file("IN", args.src)
    check_output("OUT", args.out, folder=False)
    if os.path.exists(args.out):  # as compose refuses a non-empty --out: never replace a file silently
        raise ValueError(f"OUT {args.out}: exists; remove it first or give a new path")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):  # said before the load, not after it
        raise ValueError(f"OUT {args.out}: its folder {os.path.dirname(os.path.abspath(args.out))} does not exist")
    diff = SparseDiff.load_composable_sft(src)
    diff.save(args.out)
    print(f"converted {src} ({len(diff.deltas)} sparse, {len(diff.absolute)} absolute entries, {diff.nnz:,} stored delta values) to {args.out}")
    return 0


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from xlsparse import demos

    parser.epilog = f"methods: {', '.join(demos.METHODS)}"
    demos.add_arguments(parser)


def cmd_demo(args: argparse.Namespace) -> int:
    from xlsparse import demos

    methods = list(demos.METHODS) if args.method is None else [args.method]  # "" (an unset shell variable) is no method: not all five
    for method in methods:  # every method's arguments, before the first runs
        demos.check(method, model=args.model, out=args.out, seeds=args.seeds, threads=args.threads)
    for method in methods:
        demos.run(method, quick=args.quick, model=args.model, out=args.out, seeds=args.seeds, threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from xlsparse import __version__

    parser = argparse.ArgumentParser(prog="xlsparse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"xlsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the kernel benchmarks and print the table")
    bench.add_argument("--family", help="one op family (default: all but ltsft, the LT-SFT phase-2 training "
                                        "step at XLM-R-base size, which runs only when named)")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    bench.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="where the tensors live; XLSPARSE_BACKEND picks cuda or triton kernels on cuda")
    bench.add_argument("--plot", nargs="?", const=True, default=None, metavar="PNG",
                       help="also write a PNG: speed-up and roofline share per row (default: bench.png in the --out "
                            "folder)")
    bench.set_defaults(run=cmd_bench)

    compose = sub.add_parser("compose", help="apply diffs to a saved Hugging Face model and save the merged model")
    compose.add_argument("base", metavar="BASE_DIR", help="a model folder saved with save_pretrained")
    compose.add_argument("diffs", metavar="DIFF", nargs="+", help="xlsparse diff files or composable-sft folders")
    # extend: a second --alpha adds to the list (by default it replaced the first one's, silently)
    compose.add_argument("--alpha", type=float, nargs="+", action="extend", help="one weight per diff (default 1)")
    compose.add_argument("--out", required=True, metavar="DIR", help="folder for the merged model")
    compose.add_argument("--model-class", metavar="CLASS",
                         help="transformers class to load BASE_DIR with, e.g. AutoModelForTokenClassification "
                              "(default: the config's first architecture)")
    compose.add_argument("--num-labels", type=int, metavar="N",
                         help="labels of the classification head that --model-class builds (transformers' "
                              "num_labels), for a BASE_DIR saved without it, such as a pretrained masked LM "
                              "(default: the config's, 2 if it names none)")
    compose.add_argument("--no-abs", action="store_true", help="skip the absolute entries of every diff")
    compose.add_argument("--no-abs-of", action="append", default=[], metavar="DIFF",
                         help="skip the absolute entries of this diff only (repeatable), as composable-sft's "
                              "lang_sft.apply(model, with_abs=False): a language SFT's MLM head is left out of a "
                              "task model while the task SFT's classifier goes in")
    compose.set_defaults(run=cmd_compose)

    demo = sub.add_parser("demo", help="each method against the naive way on the gettext catalogues, with a "
                                       "pretrained multilingual encoder: tables, JSON and plots")
    demo.add_argument("method", nargs="?", metavar="METHOD", help="one method (default: all)")
    _add_demo_arguments(demo)
    demo.set_defaults(run=cmd_demo)

    info = sub.add_parser("info", help="describe a diff: density per module, size on disk, base model; without DIFF, "
                                       "this install: version, compiled extension, backends per op")
    info.add_argument("diff", metavar="DIFF", nargs="?")
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
    except BrokenPipeError:  # the reader left (`xlsparse info DIFF | head`): not an error, as for other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 141  # 128 + SIGPIPE
    except Exception as exc:  # a bad file or argument: one line, no traceback, exit status 1
        # a KeyError's str is its message's repr, quotes and all
        text = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
        message = " ".join(text.split()) or type(exc).__name__
        print(f"xlsparse {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
