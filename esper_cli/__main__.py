"""`python -m esper_cli` and the `simic` console script: run the command line."""

from .cli.interrupt import exit_on_interrupt


def main() -> None:
    """Console-script entry point: a Ctrl-C while the command starts up exits 130, not a traceback."""
    exit_on_interrupt()
    from .cli.main import main as run

    run()


if __name__ == "__main__":
    main()
