"""``python -m explorer BUNDLE ...``: the same as ``explore BUNDLE ...``."""

import sys

from explorer.cli import main

sys.exit(main())
