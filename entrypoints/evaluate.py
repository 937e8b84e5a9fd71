"""MLproject's `evaluate` entry point (`python -m entrypoints.evaluate` from the project root): a thin
wrapper of em_core.commands.evaluate, which `em evaluate` runs too."""
import sys

from em_core.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
