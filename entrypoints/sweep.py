"""MLproject's `sweep` entry point (`python -m entrypoints.sweep` from the project root): a thin
wrapper of em_core.commands.sweep, which `em sweep` runs too."""
import sys

from em_core.commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
