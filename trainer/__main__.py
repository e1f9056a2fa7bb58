"""`python -m trainer` is `loraserve train`."""

import sys

from server.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
