"""``python -m lcl_tune.cli`` runs ``lcl-tune``."""

import sys

from lcl_tune.cli.main import main

sys.exit(main())
