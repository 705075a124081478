"""Thin wrapper: `python examples/subnetworks.py [--quick] [--model NAME] [--out DIR]` = `xlsparse demo subnetworks ...`
(the demo lives in xlsparse/demos/subnetworks.py so that an installed wheel can run it)."""
import sys

from xlsparse.demos import main

if __name__ == "__main__":
    sys.exit(main("subnetworks"))
