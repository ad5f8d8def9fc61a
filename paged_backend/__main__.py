"""`python -m paged_backend ...` runs the CLI."""

from paged_backend.entrypoints.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
