"""`python -m kt_ops.convert_moe_lora`: convert a PEFT MoE LoRA adapter into the kt_ops serving
format (kt_ops.weights.moe_lora holds the conversion)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .weights.moe_lora import DEFAULT_LORA_ALPHA, NothingToConvert, convert_moe_lora, logger


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0: converted, or nothing to convert (no file written); 2: bad input (message on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m kt_ops.convert_moe_lora",
        description="Convert a PEFT MoE LoRA adapter into the kt_ops serving format.",
    )
    parser.add_argument("--input", required=True, help="adapter_model.safetensors")
    parser.add_argument("--config", default=None, help="adapter_config.json (for lora_alpha and the rank check)")
    parser.add_argument("--output", required=True, help="output .pt file")
    parser.add_argument(
        "--lora-alpha", type=float, default=None, help=f"LoRA alpha (default: the config's, else {DEFAULT_LORA_ALPHA})"
    )
    parser.add_argument(
        "--fill-missing-experts",
        action="store_true",
        help="give experts that have no LoRA keys at all a zero LoRA instead of failing",
    )
    parser.add_argument(
        "--num-experts",
        type=int,
        default=None,
        help="experts per layer (default: what the adapter records, else the highest id + 1)",
    )
    parser.add_argument("--verbose", action="store_true", help="per-layer shapes and the ignored keys")
    args = parser.parse_args(argv)

    # A handler of our own, bound to the stderr of this call: the library logger stays silent for
    # importers, and the CLI prints whatever the root logging setup is.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    previous_level, previous_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logger.propagate = False
    try:
        convert_moe_lora(
            args.input,
            args.output,
            config_path=args.config,
            lora_alpha=args.lora_alpha,
            verbose=args.verbose,
            fill_missing_experts=args.fill_missing_experts,
            num_experts=args.num_experts,
        )
    except NothingToConvert as e:
        print(f"{e}; no output written", file=sys.stderr)
        return 0
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        logger.propagate = previous_propagate
    return 0


if __name__ == "__main__":
    sys.exit(main())
