"""The installed package's version (a module of its own, so that xlsparse.diff can read it without
importing the package `xlsparse` back)."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("xlsparse")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
