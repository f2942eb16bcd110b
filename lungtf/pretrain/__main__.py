"""``python -m lungtf.pretrain``: see ``lungtf.pretrain.cli``."""

import sys

from lungtf.pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
