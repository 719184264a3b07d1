"""Config files: one JSON per experiment instead of a long command line.

The file has sections (distributed, model, training, data, checkpoint, logging) whose keys
are train.py's flags (dashes or underscores). train.py reads it with apply_config_file:
the values become the parser's defaults, so any flag given on the command line still wins.
Unknown keys are an error, not silently ignored (a typo would otherwise train something else).
tools/config_maker.py writes such a file.
"""
import json
from pathlib import Path


def read_config(path, known):
    """Flatten a config file into {dest: value}; die on keys train.py does not have."""
    from utils import die

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        die(f"--config {path}: {str(e).splitlines()[0]}")
    flat = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]  # a section, or a flag
        for k, v in items:
            flat[k.replace("-", "_")] = v
    unknown = sorted(set(flat) - set(known) - {"config"})
    if unknown:
        die(f"--config {path}: unknown key(s) {', '.join(unknown)}; keys are train.py's flags")
    return flat


def apply_config_file(parser, argv=None):
    """Add --config; if given, its values become defaults (so command-line flags override them)."""
    parser.add_argument("--config", default=None, help="JSON file of flag values (see tools/config_maker.py); "
                                                       "flags on the command line override it")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        known = vars(parser.parse_args([]))  # every dest the trainer has, with its built-in default
        parser.set_defaults(**read_config(pre.config, known))
