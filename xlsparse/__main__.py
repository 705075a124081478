"""`python -m xlsparse`: the `xlsparse` console command, for environments whose scripts folder is not on PATH."""
from .cli import main

raise SystemExit(main())
