"""`python -m loraserve.trainer` is `loraserve train`."""

import sys

from loraserve.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
