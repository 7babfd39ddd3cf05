"""``python -m wanstream.server --model DIR ...`` (same options as ``wanstream serve``)."""

import sys

from .cli import main

sys.exit(main())
