"""``python -m conformance`` = ``diffkv-conformance``."""

import sys

from conformance.cli import main

sys.exit(main())
