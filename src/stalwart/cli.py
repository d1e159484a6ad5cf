"""The ``stalwart`` command.

Subcommands are imported lazily so that ``stalwart job ...`` on a laptop does not import torch.
``stalwart run`` takes torchrun's flags, parsed by torchrun's own argparse parser.
"""

from __future__ import annotations

import importlib
import sys

import click

from stalwart import __version__
from stalwart.errors import StalwartError

# name -> ("module:attribute", one-line help)
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("stalwart.launcher.cli:run", "Run a training script: a drop-in for torchrun."),
    "events": ("stalwart.agent.timeline:events_command", "Print the recovery timeline of a log dir."),
    "doctor": ("stalwart.launcher.doctor:doctor_command", "Show GPUs, EFA, NCCL/torch and warnings."),
    "ckpt": ("stalwart.checkpoint.cli:ckpt", "List, inspect, verify and clean checkpoints."),
    "health": ("stalwart.health.cli:health", "Check health rules and probes."),
    "job": ("stalwart.job.cli:job", "Create, watch and manage jobs (local or Kubernetes)."),
    "rdzv-store": ("stalwart.job.store:rdzv_store_command", "Serve a job's rendezvous store (its own pod)."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _SUBCOMMANDS:
            return None
        target, _ = _SUBCOMMANDS[name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("stalwart"):
                return _unavailable(name, str(exc))
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in _SUBCOMMANDS.items()])


def _unavailable(name: str, why: str) -> click.Command:
    @click.command(name=name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def _cmd(args: tuple[str, ...]) -> None:
        raise click.ClickException(f"'stalwart {name}' is not available in this build: {why}")

    return _cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stalwart")
def cli() -> None:
    """stalwart keeps PyTorch training jobs running through faults."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entrypoint: maps ``StalwartError`` to a clear message and exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="stalwart", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except StalwartError as exc:
        click.echo(f"stalwart: error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
