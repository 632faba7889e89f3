"""The `lfm-edge` command: `lfm-edge <subcommand> ...` or `python -m lfm_edge ...`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import LfmEdgeError

# subcommand -> (module, one-line help)
COMMANDS = {
    "chat": ("lfm_edge.commands.chat", "chat with a model in the terminal"),
    "run": ("lfm_edge.commands.run", "generate a reply to one prompt, for scripts"),
    "info": ("lfm_edge.commands.info", "describe a GGUF model file"),
    "demo-model": ("lfm_edge.commands.demo_model", "write a tiny random model to try lfm-edge offline"),
    "quantize": ("lfm_edge.quantize", "convert a Hugging Face checkpoint to GGUF"),
    "bench": ("lfm_edge.commands.bench", "measure prompt and generation speed (like llama-bench)"),
    "serve": ("lfm_edge.commands.serve", "serve a model over an OpenAI-compatible HTTP API"),
}


def version_string() -> str:
    try:
        from . import native

        isa = native.isa()
    except LfmEdgeError as e:
        isa = f"unavailable ({e})"
    return f"lfm-edge {__version__} (kernels: {isa})"


class Parser(argparse.ArgumentParser):
    """Argument errors in one line that says where the full usage is, not the whole usage text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--temp` must not quietly mean `--temperature`
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = Parser(prog="lfm-edge", description="Run Liquid AI LFM2 models on the CPU.")
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    modules = {}
    parser.commands = {}  # name -> its parser, to report errors as `lfm-edge CMD: ...`
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        parser.commands[name] = sub.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(parser.commands[name])
        modules[name] = module
    return parser, modules


def kernels_problem() -> LfmEdgeError | None:
    """Why the compiled kernels cannot load (e.g. Python runs in the source folder), if they cannot."""
    try:
        from . import native  # noqa: F401
    except LfmEdgeError as e:
        return e
    return None


def finish_saves() -> None:
    """Says so when the process is about to wait for a first save of packed weights (a
    one-shot `run` ends before it does), then waits."""
    cache_module = sys.modules.get("lfm_edge.weight_cache")  # not imported: nothing was loaded
    for cache in cache_module.saves_in_progress() if cache_module else []:
        print(f"note: finishing the save of the packed weights to {cache.path} (once)", file=sys.stderr)
        cache.wait()


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            parser, modules = build_parser()
        except ImportError:  # a part of the package is missing: say why, if the kernels are the reason
            problem = kernels_problem()
            if problem is None:
                raise
            raise problem from None
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser, which knows where its --help is
            parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command is None:
            parser.print_help()
            return 2
        status = modules[args.command].main(args) or 0
        finish_saves()
        return status
    except LfmEdgeError as e:
        print(f"lfm-edge: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `lfm-edge bench | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except OSError as e:  # a file we were told to read or write
        where = f"{e.filename}: " if e.filename else ""
        print(f"lfm-edge: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lfm-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
