"""`python -m exportd`: the daemon."""

import sys

from exportd.cli import main

sys.exit(main())
