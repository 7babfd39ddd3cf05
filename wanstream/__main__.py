"""``python -m wanstream …`` is ``wanstream …``."""

import sys

from wanstream.cli.main import main

sys.exit(main())
