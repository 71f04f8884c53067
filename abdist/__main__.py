import sys

from abdist.cli import main

sys.exit(main())
