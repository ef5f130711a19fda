"""``python -m rocmoe`` = the ``rocmoe`` command."""

import sys

from rocmoe.cli import main

sys.exit(main())
