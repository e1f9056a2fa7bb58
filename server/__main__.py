"""`python -m server` is the `loraserve` command."""

import sys

from server.cli import main

sys.exit(main())
