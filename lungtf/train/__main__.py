"""``python -m lungtf.train``: see ``lungtf.train.cli``."""

import sys

from lungtf.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
