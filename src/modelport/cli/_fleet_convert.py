"""The fleet run of ``convert --from-file`` (``_many_files.convert_plan``): apart from
``_fleet`` so that a scan's, hash's or inspect's run never imports the conversion path the
manifest's options are checked against.
"""

from __future__ import annotations

import argparse

from modelport.cli._fleet import cores
from modelport.cli._many_files import DEFAULT_CONVERT_TIMEOUT
from modelport.conversion.options import ConvertOptions
from modelport.fleet import convert_manifest
from modelport.fleet.inputs import Input
from modelport.fleet.records import Budget
from modelport.fleet.running import Plan


def convert_plan(args: argparse.Namespace, options: ConvertOptions) -> Plan:
    """The run of ``convert --from-file``: every manifest's entries, checked whole before
    any runs (so every machine of a ``--shard`` run refuses the same manifest alike), then
    this shard's, split by target. An entry is an input whose path is its source and whose
    context is its target and its own options, which override the command line's."""
    entries = [item for manifest in args.from_file for item in convert_manifest.read(manifest)]
    convert_manifest.check_outputs(entries)
    inputs = [
        Input(item.source, index, {**item.options, "target": item.target})
        for index, item in enumerate(entries)
        if args.shard is None or args.shard.holds(item.target)
    ]
    jobs = args.jobs or (cores() if len(inputs) > 1 else 1)
    budget = Budget(args.timeout or DEFAULT_CONVERT_TIMEOUT, args.max_memory)
    given = convert_manifest.command_line(options, args.from_tf)
    return Plan("convert", tuple(inputs), budget, given, jobs, args.jsonl, args.scheduler)
