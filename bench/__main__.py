"""``vmae-bench COMMAND [options]`` (= ``python -m bench COMMAND``): every benchmark by one name,
from any directory once vmae-fast is installed."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .common.paths import results_help

# command -> (module:function, what it does); a command's module is imported only when it runs,
# so --help answers without importing torch.
COMMANDS = {
    "dual-masking": ("bench.dual_masking.cli:cli",
                     "dual vs encoder-only masking, vmae_fast vs reference, MFU/HFU (make bench)"),
    "memory": ("bench.memory:main", "exact train-step memory per checkpointing policy, largest batch per GPU"),
    "kernels": ("bench.kernels:main", "fused ops vs eager / compiled references; --compile-only for sm_80/sm_90"),
    "attention": ("bench.attention:main", "attention backends at the encoder and decoder shapes"),
    "loader": ("bench.loader:main", "data loading, ours vs the restated official pipeline, per decoder"),
    "worker-batch": ("bench.worker_batch:main", "a DataLoader worker's batch hand-over: /dev/shm vs memfd"),
    "gpu-check": ("bench.gpu_check.cli:cli", "every GPU goal met or missed in under 8 minutes (make gpu-check; "
                                             "--dry-run: toy sizes on CPU)"),
}


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    epilog = "commands:\n" + "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()) \
        + f"\n\n'vmae-bench COMMAND --help' lists a command's options.\nresults: {results_help()}"
    p = argparse.ArgumentParser(prog="vmae-bench", usage="vmae-bench [-h] COMMAND [options]",
                                description="Run a vmae-fast benchmark (the same as python -m bench.<module>).",
                                epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands below")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The ``vmae-bench`` console script: the command's exit status (0 where it returns a result)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0] not in COMMANDS and not argv[0].startswith("-")):
        got = f"got {argv[0]!r}" if argv else "got none"
        print(f"vmae-bench: error: COMMAND must be one of {', '.join(COMMANDS)}; {got} "
              f"(see vmae-bench --help)", file=sys.stderr)
        raise SystemExit(2)  # as a usage error of a command below
    # Only the first word is ours: the rest, --help included, is the command's.
    command = _parser().parse_args(argv[:1]).command
    module, function = COMMANDS[command][0].split(":")
    from vmae_fast.errors import EXIT_USAGE
    from vmae_fast.cli import run_cli  # (here: vmae-bench --help imports no torch)

    from .common import cli as common_cli

    prog = common_cli.INVOKED_AS = f"{_parser().prog} {command}"  # its usage and errors say vmae-bench ...
    try:
        status = run_cli(getattr(importlib.import_module(module), function), prog, argv[1:])
    finally:
        common_cli.INVOKED_AS = None
    if status == EXIT_USAGE:  # said in one line by run_cli; the exit status argparse gives
        raise SystemExit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
