"""MLproject's `probe` entry point (`python -m entrypoints.probe` from the project root): a thin
wrapper of em_core.commands.probe, which `em probe` runs too."""
import sys

from em_core.commands.probe import main

if __name__ == "__main__":
    sys.exit(main())
