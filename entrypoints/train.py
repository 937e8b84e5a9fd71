"""MLproject's `train` entry point (`python -m entrypoints.train` from the project root): a thin
wrapper of em_core.commands.train, which `em train` runs too."""
import sys

from em_core.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
