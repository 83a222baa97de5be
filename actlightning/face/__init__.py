"""The face: the command line and its verbs, logging, the progress bar and the demo. It wires the
stages together; nothing imports it."""
