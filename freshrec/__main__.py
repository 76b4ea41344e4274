"""``python -m freshrec``: the command line, which lives on the top floor (:mod:`console.cli`).

The one upward import from :mod:`freshrec` (tests/unit/test_layers.py allows exactly this
module): an entry point that nothing imports, kept so ``python -m freshrec`` still works.
"""

import sys

from console.cli import main

sys.exit(main())
