"""python -m convert HF_DIR OUT_DIR [--dtype D] [--overwrite]: a Hugging Face Mixtral to a jaxfire checkpoint."""

from __future__ import annotations

import argparse
import sys

from convert.hf import DTYPES, convert_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors or .bin files)")
    parser.add_argument("out_dir", help="where to write the jaxfire checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="storage precision (default: the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it is not empty")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from jaxfire.errors import JaxfireError

    try:
        out = convert_hf(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                         progress=not args.quiet)
    except JaxfireError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
