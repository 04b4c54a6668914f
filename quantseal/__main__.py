"""``python -m quantseal`` = the ``quantseal`` command."""

import sys

from .cli import main

sys.exit(main())
