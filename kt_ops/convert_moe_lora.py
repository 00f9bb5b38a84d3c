"""`python -m kt_ops.convert_moe_lora`: the command's documented name. The code is kt_ops.weights.moe_lora."""

import sys

from .weights.moe_lora import main

if __name__ == "__main__":
    sys.exit(main())
