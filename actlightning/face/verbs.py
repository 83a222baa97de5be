"""``python -m actlightning VERB ...``: one command, several verbs. Only ``predict`` imports Lightning
and transformers; the others start in a fraction of its time."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# verb -> (module, what it does). Each module has ``main(argv)``; predict's takes its own verb too.
VERBS = {
    "predict": (
        "actlightning.face.cli",
        "run an export (settings: --config FILE, --section.key value; see predict --help)",
    ),
    "shuffle": ("actlightning.face.shuffle", "a global seeded shuffle of an export's token rows (for training)"),
    "publish": ("actlightning.face.publish", "upload an export to a Hugging Face dataset repository"),
    "inspect": ("actlightning.face.inspect", "what an export holds, read from its manifest (--json for a JSON object)"),
    "report": ("actlightning.read.report", "a picture of an export's activation norms (needs matplotlib)"),
}


def usage() -> str:
    width = max(len(verb) for verb in VERBS)
    lines = [f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items()]
    return (
        "usage: actlightning VERB [ARGS ...]\n\n"
        "Export the hidden states of a HuggingFace causal LM over a HuggingFace dataset to sharded Parquet,\n"
        "and work with the exports. Verbs:\n" + "\n".join(lines) + "\n\n`actlightning VERB --help` describes each.\n"
    )


def resolve(argv: list[str]) -> tuple[Callable[[list[str]], None], list[str]]:
    """The verb's ``main`` (its module imported) and the arguments it takes; prints the usage and
    exits for ``--help`` or no verb, and refuses an unknown verb in one line (exit code 2)."""
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        sys.exit(0 if argv else 2)
    verb = argv[0]
    if verb not in VERBS:
        sys.stderr.write(f"actlightning: error: unknown verb {verb!r}; the verbs are {', '.join(VERBS)}\n")
        sys.exit(2)
    module = importlib.import_module(VERBS[verb][0])
    return module.main, (argv if verb == "predict" else argv[1:])


def main(argv: list[str] | None = None) -> None:
    function, args = resolve(list(sys.argv[1:] if argv is None else argv))
    function(args)
