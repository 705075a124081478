"""Checks of the paths the command line writes, shared by `xlsparse` and `xlsparse demo`."""
import os


def check_output(arg: str, path: str, folder: bool) -> None:
    """Refuse, before any long work, an output path that cannot be written: a file where a folder
    goes or the reverse, or a path under a file (makedirs would fail only at the end)."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise ValueError(f"{arg} {path}: is a {'file' if folder else 'folder'}; give a {'folder' if folder else 'file'}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{arg} {path}: {parent} is a file, not a folder")
