import sys

from iw_relay.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
