"""`python -m exportctl`: the client."""

import sys

from exportctl.cli import main

sys.exit(main())
