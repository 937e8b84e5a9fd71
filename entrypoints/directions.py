"""MLproject's `directions` entry point (`python -m entrypoints.directions` from the project root): a thin
wrapper of em_core.commands.directions, which `em directions` runs too."""
import sys

from em_core.commands.directions import main

if __name__ == "__main__":
    sys.exit(main())
