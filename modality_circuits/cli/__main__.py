"""``python -m modality_circuits.cli``."""

import sys

from . import main

sys.exit(main())
