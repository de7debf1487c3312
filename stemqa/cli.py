"""`stemqa`: one subcommand per stage; each is the same code as `python -m jobs.<stage>` (ray job submit)."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help). Order is the pipeline's.
COMMANDS = {
    "pipeline": ("jobs.pipeline", "run every stage on Ray, then serve and answer a question (the main job)"),
    "data": ("jobs.data", "load and validate MCQ sources; write them as records"),
    "filter": ("jobs.filter", "embed samples with Ray Data and keep those similar to target sets"),
    "sft": ("jobs.sft", "supervised fine-tuning (full or LoRA) on Ray Train + DeepSpeed"),
    "dpo": ("jobs.dpo", "DPO (sigmoid/robust/ipo) on Ray Train + DeepSpeed, reference log-probs precomputed"),
    "quantize": ("jobs.quantize", "quantize a model (GPTQ, SmoothQuant+GPTQ, bitsandbytes, int8, QAT)"),
    "rag": ("jobs.rag", "build the RAG corpus and FAISS index with Ray Data; query it"),
    "eval": ("jobs.eval", "MCQA accuracy by answer-letter log-likelihood (lm-eval compatible)"),
    "serve": ("jobs.serve", "start the Ray Serve app (RAG + model) and answer over HTTP"),
    "config": ("jobs.config", "show a preset or config file, or the documented schema"),
    "sweep": ("jobs.sweep:main", "Ray Tune sweep over a search space (tune_spaces/*.yaml) with ASHA"),
    "runs": ("jobs.runs:main", "list runs, or show one run's stages, configs, artifacts and lineage"),
    "report": ("jobs.report:main", "write a self-contained HTML report of a run"),
    "submit": ("jobs.submit:main", "submit a stage or the pipeline to a Ray cluster (ray job submit), follow its logs"),
    "jobs": ("jobs.submit:list_main", "list the Ray jobs on a cluster and their status"),
    "stop": ("jobs.submit:stop_main", "stop a Ray job by id"),
}


def usage() -> str:
    lines = ["usage: stemqa <command> [options]   (stemqa <command> --help for each)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Every command takes --config <preset|file.yaml> and --set path=value overrides.",
              "Presets: demo (offline, this machine, minutes), qwen3-0.6b (GPU cluster settings)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"stemqa: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module_name, _, func = COMMANDS[cmd][0].partition(":")
    module = importlib.import_module(module_name)
    from jobs.common import run_main

    run_main(getattr(module, func or "main"), rest)


if __name__ == "__main__":
    main()
