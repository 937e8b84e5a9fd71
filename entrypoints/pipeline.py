"""MLproject's `pipeline` entry point (`python -m entrypoints.pipeline` from the project root): a thin
wrapper of em_core.commands.pipeline, which `em pipeline` runs too."""
import sys

from em_core.commands.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
