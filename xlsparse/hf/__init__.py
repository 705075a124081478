"""Hugging Face integration: convert a model's linear layers, route languages, merge, and the
recipes for the five methods (LT-SFT, language subnetworks, continual updates, language
arithmetic, sparse expert ensembles). No kernel code lives here."""
from .model import convert, extract_diff, languages, merge, print_trainable_parameters, route, unmerge

__all__ = ["convert", "extract_diff", "languages", "merge", "print_trainable_parameters", "route", "unmerge"]
