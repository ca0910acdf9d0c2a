"""FP8 quality: perplexity, next-token KL and top-1 agreement of FP8 variants against bf16; MMLU 5-shot.

    python -m bench.quality --text tests/data/builtin_heldout.txt               # the built-in model
    python -m bench.quality --checkpoint ckpt/mixtral --text wiki.txt --max-tokens 16384
    python -m bench.quality --checkpoint ckpt/mixtral --mesh --mmlu data/mmlu \
        --mmlu-variants "bf16 top-2" "fp8 x fp8 top-3"
    python -m bench.quality --smoke                                              # a few windows, nothing written

Each row names the checkpoint, the text, the tokens scored and the variant (see
`jaxfire.evaluate.VARIANTS`), and goes to bench/results/quality.jsonl (MMLU rows to quality_mmlu.jsonl).
The reference is bf16 with the checkpoint's own experts per token.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import sys
import time

from bench.common import print_table, write_results


def _text_label(paths: list[pathlib.Path]) -> str:
    """The files as given, or for several their common folder and the names under it."""
    if len(paths) == 1:
        return paths[0].as_posix()
    root = pathlib.Path(os.path.commonpath([p.resolve() for p in paths]))
    return f"{root.as_posix()}: " + " ".join(p.resolve().relative_to(root).as_posix() for p in paths)


def main(argv: list[str] | None = None) -> int:
    from jaxfire import evaluate as E

    names = [v.name for v in (E.REFERENCE, *E.VARIANTS)]
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--text", nargs="+", type=pathlib.Path, help="text file(s) to score, concatenated")
    ap.add_argument("--window", type=int, default=256, help="tokens per window (each window starts without context)")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=32, help="windows per call")
    ap.add_argument("--variants", nargs="+", choices=names[1:], default=names[1:], metavar="NAME",
                    help=f"variants to compare with the reference (default: all of {names[1:]})")
    ap.add_argument("--mmlu", type=pathlib.Path, help="an MMLU directory (dev/, test/ CSV files) to score as well")
    ap.add_argument("--mmlu-variants", nargs="+", choices=names, default=["bf16 top-2", "fp8 x fp8 top-3"],
                    metavar="NAME")
    ap.add_argument("--mmlu-shots", type=int, default=5)
    ap.add_argument("--mmlu-limit", type=int, help="at most this many test questions per subject")
    ap.add_argument("--mesh", action="store_true",
                    help="load over every device (expert parallel), for a model one device cannot hold")
    ap.add_argument("--out-dir", help="results directory (default: bench/results)")
    ap.add_argument("--smoke", action="store_true",
                    help="a quick check: 4 windows of 64 tokens of the test sample, nothing written")
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    import jaxfire

    if args.smoke:
        data = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data"
        args.text = args.text or [data / "builtin_heldout.txt"]
        args.window, args.max_tokens = 64, 256
        if args.mmlu is None:
            args.mmlu, args.mmlu_limit = data / "mmlu_sample", 2
    if not args.text and not args.mmlu:
        ap.error("give --text FILE... and/or --mmlu DIR")
    if args.mmlu and not args.mmlu.is_dir():  # before the text runs, not after
        ap.error(f"--mmlu {args.mmlu} is not a directory")
    checkpoint = args.checkpoint or "builtin"
    variants = {v.name: v for v in (E.REFERENCE, *E.VARIANTS)}
    mesh = jaxfire.make_mesh() if args.mesh else None
    status = 0
    try:
        if args.text:
            text = E.read_texts(args.text)
            t0 = time.perf_counter()
            rows = E.compare_variants(args.checkpoint, text, [variants[n] for n in args.variants],
                                      window=args.window, max_tokens=args.max_tokens, batch=args.batch, mesh=mesh,
                                      progress=lambda it, name: tqdm(it, desc=name, leave=False))
            seconds = time.perf_counter() - t0
            label = _text_label(args.text)
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            for r in rows:
                r.update(checkpoint=checkpoint, text=label, text_sha256=digest, window=args.window,
                         max_tokens=args.max_tokens, ppl_change_pct=100 * r["ppl_change"])
            print(f"{checkpoint} on {label}: {rows[0]['tokens']} predictions in windows of {args.window} tokens, "
                  f"{seconds:.0f}s")
            print_table(rows, ["variant", "perplexity", "ppl_change_pct", "kl", "kl_max", "top1_agreement"])
            if not args.smoke:
                print(f"wrote {write_results('quality', rows, args.out_dir)}")
        if args.mmlu:
            rows = []
            loaded: dict[str, jaxfire.Model] = {}
            for name in args.mmlu_variants:
                v = variants[name]
                if v.weights not in loaded:
                    loaded.clear()  # one precision's weights in memory at a time
                    loaded[v.weights] = jaxfire.load(args.checkpoint, dtype=v.weights, mesh=mesh)
                model = v.apply(loaded[v.weights])
                t0 = time.perf_counter()
                res = E.evaluate_mmlu(model, args.mmlu, shots=args.mmlu_shots, limit=args.mmlu_limit,
                                      progress=lambda it: tqdm(it, desc=f"MMLU {name}", leave=False))
                rows.append({"checkpoint": checkpoint, "benchmark": "mmlu", "data": args.mmlu.as_posix(),
                             "variant": name, "shots": res["shots"], "questions": res["questions"],
                             "accuracy": res["accuracy"], "macro_accuracy": res["macro_accuracy"],
                             "truncated": res["truncated"], "seconds": time.perf_counter() - t0,
                             "subjects": {s: d["accuracy"] for s, d in res["subjects"].items()}})
            print_table(rows, ["variant", "questions", "accuracy", "macro_accuracy", "truncated"])
            if not args.smoke:
                print(f"wrote {write_results('quality_mmlu', rows, args.out_dir)}")
    except jaxfire.JaxfireError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
