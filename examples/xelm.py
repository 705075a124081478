"""Thin wrapper: `python examples/xelm.py [--quick] [--model NAME] [--out DIR]` = `xlsparse demo xelm ...`
(the demo lives in xlsparse/demos/xelm.py so that an installed wheel can run it)."""
import sys

from xlsparse.demos import main

if __name__ == "__main__":
    sys.exit(main("xelm"))
