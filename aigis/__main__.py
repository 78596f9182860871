"""``python -m aigis``: the core daemon."""

import sys

from aigis._daemon import main

sys.exit(main())
