"""streamprune: run Video-LLMs and VLAs on visual streams, fast, by pruning and caching visual tokens.

`streamprune.cli` is the one entry point and the only place that wires things together.

The parser is built from each command's config dataclass (streamprune/config.py); a command's
module (streamprune/commands/NAME.py, a `run(config) -> int`) is imported only when it runs, so
`--help` loads neither torch nor transformers.

Exit codes: 0 success; 2 bad input or usage (missing/invalid file, flag out of range, unknown
method or model); 3 a batch finished with some inputs failed; 130 interrupted.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass

from streamprune import config as configs
from streamprune.cliargs import OneLineParser, add_config_arguments, config_from_args
from streamprune.config.commands import BenchLiveConfig
from streamprune.config.data import BenchRedundancyConfig
from streamprune.config.eval import EvalConfig
from streamprune.config.serve import BenchServeConfig, ServeConfig
from streamprune.errors import StreampruneError

EPILOG = "exit codes: 0 ok, 2 bad input or usage, 3 batch finished with failures, 130 interrupted"


@dataclass(frozen=True)
class Command:
    """A subcommand: its config class (flags, defaults, help), the module and function that run it."""

    config: type
    module: str
    function: str = "run"
    help: str = ""


COMMANDS: dict[str, Command] = {
    "demo": Command(configs.DemoConfig, "streamprune.commands.demo",
                    help="answer a few held-out synthetic questions (start here)"),
    "ask": Command(configs.AskConfig, "streamprune.commands.ask", help="answer a question about a video file"),
    "methods": Command(configs.MethodsConfig, "streamprune.commands.methods",
                       help="list pruning methods and recipes with their defaults"),
    "viz": Command(configs.VizConfig, "streamprune.commands.viz", help="draw the tokens a method keeps on each frame"),
    "batch": Command(configs.BatchConfig, "streamprune.commands.batch",
                     help="answer questions over many videos on Ray (resumable)"),
    "live": Command(configs.LiveConfig, "streamprune.commands.live",
                    help="answer questions about a live stream (stdin questions)"),
    "publish": Command(configs.PublishConfig, "streamprune.commands.live", "run_publish",
                       help="publish a camera or file as a zmq frame stream"),
    "robot": Command(configs.RobotConfig, "streamprune.commands.robot",
                     help="closed-loop episodes of a VLA policy in a gymnasium env"),
    "eval": Command(EvalConfig, "streamprune.commands.eval",
                    help="multiple-choice video benchmarks (lmms-eval scoring), every method x retain"),
    "serve": Command(ServeConfig, "streamprune.commands.serve",
                     help="OpenAI-compatible video API with pruning per request, live streams and a web page"),
    "serve-policy": Command(configs.ServePolicyConfig, "streamprune.commands.robot", "run_serve",
                            help="serve a VLA policy to robot clients (zmq, or openpi's websocket protocol)"),
}
BENCHES: dict[str, Command] = {
    "accuracy": Command(configs.BenchAccuracyConfig, "streamprune.commands.bench", "run_accuracy",
                        help="every method at every budget, in one run, on the held-out set"),
    "decode": Command(configs.BenchDecodeConfig, "streamprune.commands.bench", "run_decode",
                      help="our PyAV decoding vs `ffmpeg -i FILE -f null -`"),
    "live": Command(BenchLiveConfig, "streamprune.commands.bench", "run_live",
                    help="a real-time stream per method: sustained fps, answer latency, drops, memory"),
    "redundancy": Command(BenchRedundancyConfig, "streamprune.commands.bench", "run_redundancy",
                          help="how static the benchmark data is, beside real footage, through one encoder"),
    "robot": Command(configs.BenchRobotConfig, "streamprune.commands.bench", "run_robot",
                     help="success and control rate per method x budget"),
    "serve": Command(BenchServeConfig, "streamprune.commands.bench", "run_serve",
                     help="chat completions over HTTP, N at once: requests/s, p50/p99 latency"),
    "speed": Command(configs.BenchSpeedConfig, "streamprune.commands.bench", "run_speed",
                     help="phase-by-phase speed at a public checkpoint's shapes, beside the FLOPs ratio"),
}
# configs/pipelines/NAME.yaml that may override a command's defaults
DEFAULTS_FILE = {"ask": "ask", "batch": "batch"}


def _defaults(name: str, command: Command):
    file = DEFAULTS_FILE.get(name)
    return configs.load_command_defaults(command.config, file) if file else command.config()


def _add(sub, name: str, command: Command, dest: str) -> None:
    description = (command.config.__doc__ or "").split("\n\n")[0]
    description = description.split(": ", 1)[-1].replace("\n    ", " ").strip()
    description = description[:1].upper() + description[1:]
    parser = sub.add_parser(name, help=command.help, description=description, epilog=EPILOG)
    parser.set_defaults(**{dest: name})
    add_config_arguments(parser, _defaults(name, command))


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="streamprune", description=__doc__.split("\n")[0], epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, command in COMMANDS.items():
        _add(sub, name, command, "command")
    bench = sub.add_parser("bench", help="benchmarks (accuracy vs retention, decoding, robot control)",
                           epilog=EPILOG)
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=OneLineParser)
    for name, command in BENCHES.items():
        _add(bench_sub, name, command, "bench")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    name = args.bench if args.command == "bench" else args.command
    command = BENCHES[name] if args.command == "bench" else COMMANDS[name]
    try:
        config = config_from_args(_defaults(name, command), args)
        run = getattr(importlib.import_module(command.module), command.function)
        return run(config)
    except StreampruneError as err:
        sys.stderr.write(f"streamprune: error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        resume = "; re-run to resume" if name == "batch" else ""
        sys.stderr.write(f"streamprune: interrupted{resume}\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
