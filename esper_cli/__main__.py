"""`python -m esper_cli` runs the `simic` command line."""

from .cli import main

if __name__ == "__main__":
    main()
