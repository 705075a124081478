"""Real LT-SFT supports for the benchmarks: a 5% global top-K over multilingual-e5-small's 72
encoder linear weights (see shared/data/e5small-ltsft-masks/README.md). Real masks are skewed:
the last layer's FFN matrices hold 26-36% of their entries, early attention matrices about 1%.

The folder sits beside the repository (`../shared/data/...` from its root), as on CI. Where it is
missing, `load()` prints a note once and returns None, and the families skip their real-mask rows.
`XLSPARSE_MASKS_DIR` points elsewhere.
"""
import json
import os

import torch

FOLDER = os.path.join("..", "shared", "data", "e5small-ltsft-masks")
FILE = "masks.safetensors"
LABEL = "real e5-small 5%"

_notes_printed: set[str] = set()


def _candidates() -> list[str]:
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the source tree's root
    found = [os.environ["XLSPARSE_MASKS_DIR"]] if os.environ.get("XLSPARSE_MASKS_DIR") else []
    return found + [os.path.join(repo_root, FOLDER), os.path.join(os.getcwd(), FOLDER)]


def load(folder: str | None = None) -> dict[str, tuple[torch.Tensor, tuple[int, int]]] | None:
    """{weight name: (sorted flat row-major int64 indices, (out, in))}, or None with a note."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    paths = [os.path.join(folder, FILE)] if folder else [os.path.join(c, FILE) for c in _candidates()]
    for path in paths:
        if os.path.exists(path):
            with safe_open(path, "pt") as f:
                shapes = json.loads(f.metadata()["shapes"])
            return {name: (idx.long(), tuple(shapes[name])) for name, idx in load_file(path).items()}
    note = f"note: real-mask rows skipped: {FILE} not found in {', '.join(os.path.dirname(p) for p in paths)}"
    if note not in _notes_printed:
        print(note, flush=True)
        _notes_printed.add(note)
    return None


def weights(masks: dict, quick: bool) -> list[str]:
    """The weights a family benchmarks: all 72, or the last two layers' with --quick."""
    names = sorted(masks)
    return [n for n in names if n.startswith(("encoder.layer.10.", "encoder.layer.11."))] if quick else names


def density(entry: tuple[torch.Tensor, tuple[int, int]]) -> float:
    idx, (rows, cols) = entry
    return idx.numel() / (rows * cols)


def skewed_ffn(masks: dict) -> str:
    """The densest FFN matrix (the last layer's FFN-in in this selection)."""
    ffn = [n for n in masks if n.endswith(("intermediate.dense.weight", "output.dense.weight"))
           and ".attention." not in n]
    return max(ffn, key=lambda n: density(masks[n]))


def typical_attention(masks: dict) -> str:
    """The attention matrix whose density is the median of all attention matrices'."""
    attention = sorted((n for n in masks if ".attention." in n), key=lambda n: density(masks[n]))
    return attention[len(attention) // 2]


def same_shape_group(masks: dict, name: str, count: int) -> list[str]:
    """`count` weights of the same kind as `name` from the last layers: e.g. the FFN-in of
    layers 8-11, as the supports of 4 languages or experts over one shared shape."""
    suffix = name.split(".", 3)[3]  # drop "encoder.layer.L."
    same = sorted((n for n in masks if n.split(".", 3)[3] == suffix and masks[n][1] == masks[name][1]),
                  key=lambda n: int(n.split(".")[2]))
    return same[-count:]
