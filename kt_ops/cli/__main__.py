"""python -m kt_ops.cli: the kt-sft command."""

import sys

from . import main

sys.exit(main())
