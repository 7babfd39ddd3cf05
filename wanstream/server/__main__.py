"""``python -m wanstream.server --model DIR ...`` is ``wanstream serve --model DIR ...`` (an entry point, not a
module anything imports)."""

import sys

from wanstream.cli.main import main

sys.exit(main(["serve", *sys.argv[1:]]))
