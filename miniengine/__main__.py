"""`python -m miniengine ...` is the `miniengine` command."""

import sys

from miniengine.cli import main

sys.exit(main())
