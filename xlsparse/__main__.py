"""`python -m xlsparse`: the `xlsparse` console command, for environments whose scripts folder is not on PATH."""
from .cli import main

if __name__ == "__main__":  # importing the module (pkgutil walks) must not run the command
    raise SystemExit(main())
