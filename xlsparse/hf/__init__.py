"""Hugging Face integration: convert a model's linear layers, route languages, merge, save and
reload, and the recipes for the five methods (LT-SFT, language subnetworks, continual updates,
language arithmetic, sparse expert ensembles). No kernel code lives here."""
from .config import XlsparseConfig
from .model import (convert, disable, extract_diff, from_pretrained, languages, merge, merge_and_unload,
                    print_trainable_parameters, route, save_pretrained, tied_parameters, unmerge)

__all__ = ["XlsparseConfig", "convert", "disable", "extract_diff", "from_pretrained", "languages", "merge",
           "merge_and_unload", "print_trainable_parameters", "route", "save_pretrained", "tied_parameters", "unmerge"]
