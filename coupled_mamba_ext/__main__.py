"""``python -m coupled_mamba_ext``: the ``coupled-mamba`` command."""
import sys

from .cli import main

sys.exit(main())
