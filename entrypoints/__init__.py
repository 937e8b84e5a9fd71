"""MLflow project entry points (see MLproject); each is also an `em` sub-command."""
