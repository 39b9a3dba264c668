"""`python -m engine.cli ...`: the same as `vade ...`."""

import sys

from engine.cli.main import main

sys.exit(main())
