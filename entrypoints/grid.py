"""MLproject's `grid` entry point (`python -m entrypoints.grid` from the project root): a thin
wrapper of em_core.commands.grid, which `em grid` runs too."""
import sys

from em_core.commands.grid import main

if __name__ == "__main__":
    sys.exit(main())
