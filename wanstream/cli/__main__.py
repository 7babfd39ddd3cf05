"""``python -m wanstream.cli …`` is ``wanstream …``."""

import sys

from wanstream.cli.main import main

sys.exit(main())
