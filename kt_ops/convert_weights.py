"""`python -m kt_ops.convert_weights`: the command's documented name. The code is kt_ops.weights.convert."""

import sys

from .weights.convert import main

if __name__ == "__main__":
    sys.exit(main())
