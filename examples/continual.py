"""Thin wrapper: `python examples/continual.py [--quick] [--model NAME] [--out DIR]` = `xlsparse demo continual ...`
(the demo lives in xlsparse/demos/continual.py so that an installed wheel can run it)."""
import sys

from xlsparse.demos import main

if __name__ == "__main__":
    sys.exit(main("continual"))
