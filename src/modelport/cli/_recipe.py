"""The recipe of an ``export`` or ``rebuild``: Python that runs the same command line again
(the example inputs ``--input`` makes are seeded, so the same command gives the same
tensors). The report (``--report``) and the model card (``--card``) both show it."""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Final

# the options that decide what OUT holds, as the command line spells them (attribute, flag)
RECIPE_OPTIONS: Final = (
    ("model", "--model"),
    ("init", "--init"),
    ("weights", "--weights"),
    ("example_inputs", "--example-inputs"),
    ("inputs", "--input"),
    ("dynamic", "--dynamic"),
    ("to", "--to"),
    ("opset", "--opset"),
    ("exporter", "--exporter"),
    ("input_names", "--input-names"),
    ("output_names", "--output-names"),
    ("external_data", "--external-data"),
    ("rtol", "--rtol"),
    ("atol", "--atol"),
    ("trust_code", "--trust-code"),
    ("allow_unsafe", "--allow-unsafe"),
)
DEFAULTS: Final = {"exporter": "dynamo"}  # left out of the recipe


def export_recipe(args: argparse.Namespace) -> str:
    return command_line("export", args, [str(args.output)], weights=True)


def rebuild_recipe(args: argparse.Namespace) -> str:
    """Rebuild takes its weights as a positional argument, not as ``--weights``."""
    return command_line("rebuild", args, [str(args.weights), str(args.output)], weights=False)


def command_line(
    command: str, args: argparse.Namespace, positionals: list[str], *, weights: bool
) -> str:
    """The command line, run by modelport's ``main``, with the shell spelling above it."""
    words = [command]
    for attribute, flag in RECIPE_OPTIONS:
        value = getattr(args, attribute, None)
        if value in (None, False, []) or DEFAULTS.get(attribute) == value:
            continue
        if attribute == "weights" and not weights:
            continue
        if attribute.endswith("_names"):
            words += [flag, ",".join(value)]
        elif isinstance(value, list):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag] if value is True else [flag, str(value)]
    if getattr(args, "verify", True) is False:
        words.append("--no-verify")
    argv = [*words, *positionals]
    shell = " ".join(shlex.join(["modelport", *argv]).splitlines())  # one comment line
    return f"# {shell}\nfrom modelport.cli.main import main\n\nmain({json.dumps(argv)})\n"
