"""``python -m al_ext`` is the ``al-ext`` command."""
import sys

from .cli import main

sys.exit(main())
