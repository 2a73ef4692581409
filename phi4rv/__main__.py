import sys

from phi4rv.cli import main

sys.exit(main())
