"""`stemqa`: one subcommand per stage (the stage's own arguments, `stemqa.cli.stage`), the pipeline, sweeps,
and the tools around them. `python -m jobs.<stage>` (what `ray job submit` runs) is the same code."""
from __future__ import annotations

import importlib
import sys

from stemqa.config.schema import PIPELINE, known_stages

# The tools besides the stages: command -> ("module:function", help). A stage's command is its name (every module
# of stemqa/stages is one, found without importing it), except `quantize`: `quant` is the quantization tools.
RENAMED = {"quant": "quantize"}
TOOLS = {
    "pipeline": ("stemqa.cli.pipeline:main", "run every stage on Ray, then serve and answer a question (the main job)"),
    "quant": ("stemqa.cli.quant:main", "quantization tools: `quant report` = accuracy / memory / speed table + figure"),
    "config": ("stemqa.cli.config:main", "show a preset or config file, or the documented schema"),
    "sweep": ("stemqa.cli.sweep:main", "Ray Tune sweep over a search space (stemqa/tune/spaces/*.yaml) with ASHA"),
    "runs": ("stemqa.cli.runs:main", "list runs, or show one run's stages, configs, artifacts and lineage"),
    "report": ("stemqa.cli.report:main", "write a self-contained HTML report of a run"),
    "submit": ("stemqa.cli.submit:main", "submit a stage or the pipeline to a Ray cluster (ray job submit), follow its logs"),
    "jobs": ("stemqa.cli.submit:list_main", "list the Ray jobs on a cluster and their status"),
    "stop": ("stemqa.cli.submit:stop_main", "stop a Ray job by id"),
}
STAGE_COMMANDS = {RENAMED.get(s, s): s for s in sorted(known_stages(), key=lambda s: (
    PIPELINE.index(s) if s in PIPELINE else len(PIPELINE), s))}  # command -> stage, in the pipeline's order
COMMANDS = [*STAGE_COMMANDS, *TOOLS]


def usage() -> str:
    from stemqa.stages import get

    helps = {cmd: get(stage).description for cmd, stage in STAGE_COMMANDS.items()}
    helps.update({cmd: help_ for cmd, (_, help_) in TOOLS.items()})
    lines = ["usage: stemqa <command> [options]   (stemqa <command> --help for each)", "", "commands:"]
    lines += [f"  {name:<10} {helps[name]}" for name in ["pipeline", *STAGE_COMMANDS, *[t for t in TOOLS if t != "pipeline"]]]
    lines += ["", "Every command takes --config <preset|file.yaml> and --set path=value overrides.",
              "Presets: demo (offline, this machine, minutes), qwen3-0.6b (GPU cluster settings)."]
    return "\n".join(lines)


def command_main(cmd: str):
    """The `main(argv) -> exit status` of a command; user errors exit 2 with one line (SystemExit)."""
    from stemqa.cli.common import user_errors

    def main(argv=None) -> int:
        with user_errors():
            if cmd in STAGE_COMMANDS:
                from stemqa.cli.stage import stage_main

                return stage_main(STAGE_COMMANDS[cmd], argv, prog=f"stemqa {cmd}")
            module_name, _, func = TOOLS[cmd][0].partition(":")
            return getattr(importlib.import_module(module_name), func)(argv)
    return main


def main(argv=None) -> None:
    from stemqa.ray_utils import load_cluster_env

    load_cluster_env()  # before anything imports ray: the local cluster's client settings (token auth)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"stemqa: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    sys.exit(command_main(cmd)(rest) or 0)


if __name__ == "__main__":
    main()
