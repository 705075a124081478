"""Thin wrapper: `python examples/ltsft.py [--quick] [--model NAME] [--out DIR]` = `xlsparse demo ltsft ...`
(the demo lives in xlsparse/demos/ltsft.py so that an installed wheel can run it)."""
import sys

from xlsparse.demos import main

if __name__ == "__main__":
    sys.exit(main("ltsft"))
