"""Thin wrapper: `python examples/arithmetic.py [--quick] [--model NAME] [--out DIR]` = `xlsparse demo arithmetic ...`
(the demo lives in xlsparse/demos/arithmetic.py so that an installed wheel can run it)."""
import sys

from xlsparse.demos import main

if __name__ == "__main__":
    sys.exit(main("arithmetic"))
