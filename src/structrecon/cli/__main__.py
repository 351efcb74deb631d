"""``python -m structrecon.cli``."""

import sys

from . import main

sys.exit(main())
