"""``python -m robustclip ...`` is the ``robustclip`` command."""

import sys

from robustclip.cli import main

sys.exit(main())
