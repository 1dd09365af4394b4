"""LoRA recovery: prune with a gradient-based method, then fine-tune LoRA adapters to win back quality.

The adapters are trained on the pruned model and merged into its weights, so the result is as
small and as fast as before fine-tuning. Perplexity is measured before pruning, after pruning
and after recovery (WikiText-2 test split, 128-token windows; calibration and training use the
train split).

With ``--reconstruct N`` the layers that lose inputs are first refit by least squares on N windows
of the calibration text (``compile(..., reconstruct=...)``), so that recovery starts nearer the dense model.

Run it:  python examples/lora_recovery.py [--model PATH] [--ratio 0.5] [--steps 100] [--reconstruct 128]
Quick:   python examples/lora_recovery.py --steps 5 --eval-tokens 4096 --calib-samples 4
"""
from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

import graphprune
from graphprune.data import data_dir
from graphprune.evaluate import perplexity
from graphprune.finetune import finetune


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(data_dir() / "models" / "stories260K"))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--method", default="taylor")
    parser.add_argument("--data", default="wikitext2", help="calibration and fine-tuning text")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows for the scoring pass")
    parser.add_argument("--reconstruct", type=int, default=0, metavar="N", help="refit the layers that lose inputs on N windows (0: no)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-tokens", type=int, default=None, help="score only the first N tokens (quick runs)")
    parser.add_argument("--out", default="out/recovered")
    args = parser.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def ppl(m) -> float:  # a bar per model: the whole test split takes a while on a CPU
        return perplexity(m, tokenizer, "wikitext2", seq_len=128, max_tokens=args.eval_tokens, progress=True).ppl

    small = graphprune.compile(model, ratio=args.ratio, method=args.method, calib=args.data, tokenizer=tokenizer,
                                n_samples=args.calib_samples,
                                reconstruct={"n_samples": args.reconstruct} if args.reconstruct else False)
    print(small.report)
    tuned = finetune(small, args.data, args.steps, tokenizer=tokenizer, lr=args.lr, seq_len=128)
    print(f"fine-tuning: {tuned.finetune_info.backend} back-end, loss {tuned.finetune_info.losses[0]:.3f} -> "
          f"{tuned.finetune_info.losses[-1]:.3f} in {tuned.finetune_info.seconds:.1f}s")
    print(f"WikiText-2 perplexity: dense {ppl(model):.2f}, pruned {ppl(small):.2f}, recovered {ppl(tuned):.2f}")
    tuned.save(args.out)  # the merged weights: a transformers checkpoint too, ready for more peft/Trainer
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
