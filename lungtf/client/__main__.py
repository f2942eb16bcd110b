"""``python -m lungtf.client``: see ``lungtf.client.cli``."""

import sys

from lungtf.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
