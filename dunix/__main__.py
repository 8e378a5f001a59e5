import sys

from dunix.cli import main

sys.exit(main())
