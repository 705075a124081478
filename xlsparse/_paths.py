"""Checks of the paths the command line writes, shared by `xlsparse` and `xlsparse demo`, and the
folders a writer makes."""
import contextlib
import os
import shutil


def path_arg(arg: str, path, give: str) -> str:
    """`path` (a str or os.PathLike) as a str; not a path, or an empty one, raises naming `arg`,
    before anything is read or written. `give` says what the path should name ("file", "folder")."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{arg} must be a str or os.PathLike, got {type(path).__name__}")
    if not path:  # "" (an unset shell variable): it failed after the work, as "No such file or directory: ''"
        raise ValueError(f"{arg}: an empty path; give a {give}")
    return path


def check_output(arg: str, path: str, folder: bool) -> None:
    """Refuse, before any long work, an output path that cannot be written: a file where a folder
    goes or the reverse, or a path under a file (makedirs would fail only at the end)."""
    path_arg(arg, path, "folder" if folder else "file")
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise ValueError(f"{arg} {path}: is a {'file' if folder else 'folder'}; give a {'folder' if folder else 'file'}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{arg} {path}: {parent} is a file, not a folder")


@contextlib.contextmanager
def made_folder(folder: str, undo_added: bool = False):
    """Make `folder` and its missing parents; if the block raises, remove what was made here (a
    failed write leaves no empty folders behind) and, with `undo_added`, what the block added to a
    `folder` that existed (its earlier entries stay). Yields the topmost folder made, or None when
    `folder` existed."""
    made = None if os.path.isdir(folder) else os.path.abspath(folder)
    while made and not os.path.isdir(os.path.dirname(made)):
        made = os.path.dirname(made)
    earlier = set(os.listdir(folder)) if undo_added and not made else set()
    os.makedirs(folder, exist_ok=True)
    try:
        yield made
    except BaseException:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        elif undo_added:
            for name in set(os.listdir(folder)) - earlier:
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):  # the block's own error is the one to raise
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
        raise
