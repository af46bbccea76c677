import sys

from tmequant.cli import main

sys.exit(main())
