"""MLflow project entry points (see MLproject): thin wrappers of em_core.commands, run from the
project root. Not installed: a wheel holds only em_core (`em <step>` reaches the same code)."""
