"""``python -m mhd_fast ...`` is ``mhd-fast ...``."""
from .cli import main

raise SystemExit(main())
