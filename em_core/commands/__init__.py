"""The step commands: `em <step>` and MLproject's entry points (`entrypoints/<step>.py`, thin
wrappers run as `python -m entrypoints.<step>` from the project root) both call `<step>.main`.
Each module also runs as `python -m em_core.commands.<step>` from anywhere (an installed wheel)."""
