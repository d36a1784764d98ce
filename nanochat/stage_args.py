"""
Stage arguments: reference-style flags, plus --config FILE (what the runner writes) whose keys are argparse
dest names. The config installs defaults, then the command line is parsed again so explicit flags win.
Kept free of torch: a stage parses its flags (--dtype sets NANOCHAT_DTYPE) before nanochat.common is imported.
"""

import json


def parse_args_with_config(parser, argv=None, ignore=(), required=()):
    """Parse argv with `parser`, taking defaults from --config JSON. Unknown config keys (other than `ignore`)
    and `required` dests left empty by both are a one-line error with exit status 2 (argparse's error())."""
    args, _ = parser.parse_known_args(argv)
    if getattr(args, "config", None):
        try:
            with open(args.config) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--config {args.config}: {e}")
        if not isinstance(config, dict):
            parser.error(f"--config {args.config}: expected a JSON object of flag values")
        dests = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - dests - set(ignore))
        if unknown:
            parser.error(f"--config {args.config}: unknown keys {unknown} (use argparse dest names)")
        parser.set_defaults(**{k: v for k, v in config.items() if k in dests and k != "config"})
    args = parser.parse_args(argv)
    for name in required:
        if not getattr(args, name):
            parser.error(f"--{name.replace('_', '-')} is required (or '{name}' in --config)")
    return args
