"""Talk to a trained model in the harmony format.

    python -m engine.chat MODEL [--adapter DIR] [--reasoning low|medium|high] [--tools tools.json]
                                [--prompt "..."] [--system "..."] [--max-new-tokens N] [--temperature T]

MODEL: a run folder, a training checkpoint or an HF folder (engine.inference.loading); `--adapter` adds a PEFT
adapter to an HF base. The conversation is rendered by the data pipeline's harmony renderer (the text
the model was trained on) followed by `<|start|>assistant`; the answer streams as it is generated:
the analysis channel dimmed, the final answer plain, tool calls (`to=functions.NAME`, ended by
`<|call|>`) printed with their arguments. Generation stops at `<|return|>` or `<|call|>`.
`--prompt` answers once and exits; without it, an interactive loop (empty line or Ctrl-D ends it).
Greedy by default; `--temperature` > 0 samples.
"""

from __future__ import annotations

import argparse
import sys

from engine.inference.chat import answer, read_tools


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m engine.chat", description="Talk to a trained model in the harmony format."
    )
    p.add_argument("model", help="run folder, training checkpoint, or HF checkpoint folder")
    p.add_argument("--adapter", help="PEFT adapter folder to apply to an HF model")
    p.add_argument(
        "--expert-weights",
        choices=["dense", "mxfp4"],
        default="dense",
        help="mxfp4: keep an MXFP4 HF checkpoint's experts packed (the adapter runs unmerged)",
    )
    p.add_argument("--reasoning", choices=["low", "medium", "high"], default="medium")
    p.add_argument("--tools", help="JSON file: a list of function tools the model may call")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="instructions (the developer message)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)
    from engine.inference.loading import load_for_inference

    try:
        tools = read_tools(args.tools)
        loaded = load_for_inference(
            args.model, adapter=args.adapter, device=args.device, expert_weights=args.expert_weights
        )
        print(f"model: {loaded.source}", file=sys.stderr)
        history = [{"role": "developer", "content": args.system}] if args.system else []
        turns = [args.prompt] if args.prompt is not None else None
        while True:
            if turns is not None:
                if not turns:
                    return 0
                user = turns.pop()
            else:
                try:
                    user = input("> ")
                except EOFError:
                    return 0
                if not user.strip():
                    return 0
            history.append({"role": "user", "content": user})
            history.append(
                answer(
                    loaded.model,
                    loaded.tokenizer,
                    history,
                    reasoning=args.reasoning,
                    tools=tools,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    seed=args.seed,
                    out=sys.stdout,
                )
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"chat error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
