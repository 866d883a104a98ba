"""``modelport check``: will these weights load into this model (strict), and if not, why?"""

from __future__ import annotations

import argparse
import json
from typing import Any

from modelport.cli.cmd_export import add_model_arguments
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.torch_models.checking import check
from modelport.torch_models.model_spec import check_model_spec

EXAMPLES = """examples:
  modelport check --model mypkg.nets:ResNet --init '{"classes": 10}' ckpt.pt
  modelport check --model ./my-hf-model model.safetensors
  modelport check --model mypkg.nets:ResNet ddp_ckpt.pt --fix fixed.safetensors
  modelport check --model mypkg.nets:ResNet ckpt.pt --json

exit codes: 0 the weights fit (or --fix wrote a file that fits), 1 they do not, 2 error
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "check",
        help=COMMANDS["check"].help,
        description="Compare the names and shapes in WEIGHTS (read by content, no tensor "
        "data) with the state_dict of the model you name, as load_state_dict(strict=True) "
        "would, and name the likely cause of any difference. --model imports and calls "
        "your own code (pkg.module:Name), or builds a Hugging Face model from a directory's "
        "config.json without downloading anything. Nothing stored in WEIGHTS is executed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("weights", help="weights file or directory")
    add_model_arguments(parser)
    parser.add_argument(
        "--fix", metavar="OUT", help="write the weights renamed so that they fit (prefix shifts)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="check a file the scanner judged unsafe (still executes nothing in it)",
    )
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="allow a whole-model pickle as --model: loading it RUNS CODE from that file",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_model_spec(args.model)  # a typo costs milliseconds, not torch's import
    report = check(
        args.weights,
        args.model,
        init=args.init,
        fix=args.fix,
        allow_unsafe=args.allow_unsafe,
        trust_code=args.trust_code,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(report.lines()))
    return ExitCode.OK if report.ok or report.fixed_ok else ExitCode.NO
