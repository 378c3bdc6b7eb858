"""python -m lctriton: the command line."""

import sys

from lctriton.cli import main

sys.exit(main())
