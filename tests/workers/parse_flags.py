"""Run many command lines of the steps' train.py in this one process, up to their first real work.

    python tests/workers/parse_flags.py CASES.json OUT.json

CASES.json: [[step, [flag, value, ...], whole], ...]. Each case runs train.main() with those flags
as one process (world 1). Unless `whole` is true it stops where the model's weights would be
allocated (train.materialize), so what it checks is everything a run checks before it trains:
the flags' ranges, the layout against the world size, the model's config; with `whole` it runs
to the end (a resume, a few steps). OUT.json: for each case {"exit": the SystemExit message, or
null if it got that far or finished; "traceback": the formatted exception if anything else was
raised}. One start of Python and torch instead of one per case: a flag case costs milliseconds.
"""
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


class Reached(Exception):
    """The case got past every check made before the weights exist."""


def run_case(train, argv):
    sys.argv = ["train.py", *argv]
    try:
        train.main()
    except Reached:
        return {"exit": None}
    except SystemExit as e:
        return {"exit": None if e.code in (0, None) else str(e.code)}
    except BaseException:
        return {"exit": None, "traceback": traceback.format_exc()[-3000:]}
    return {"exit": None}


def load_step(step):
    folder = REPO / step
    for name in [m for m, mod in sys.modules.items() if getattr(mod, "__file__", None)
                 and Path(mod.__file__).parent.name.startswith("step0")]:
        del sys.modules[name]  # every step has its own utils, model, ...: import this step's
    sys.path[:] = [p for p in sys.path if not Path(p).name.startswith("step0")]
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"train_{step}", folder / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    def stop(*_, **__):
        raise Reached

    train.whole, train.stop = train.materialize, stop
    make = train.base_parser

    def recorded(*a, **kw):  # the parser main() builds: which numeric flags have no range
        parser = train.parser = make(*a, **kw)
        return parser

    train.base_parser = recorded
    if hasattr(train, "init_distributed"):  # one gloo group of 1 for every case
        import torch.distributed as dist

        first = train.init_distributed
        train.init_distributed = lambda device: (0, 1) if dist.is_initialized() else first(device)
    return train


def main():
    cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_PORT", "29400")
    results, loaded = [], {}
    for step, argv, whole in cases:
        if step not in loaded:
            loaded.clear()
            loaded[step] = load_step(step)
        train = loaded[step]
        train.materialize = train.whole if whole else train.stop
        results.append(run_case(train, argv))
        results[-1]["unchecked"] = sorted(a.option_strings[0] for a in train.parser._actions
                                          if a.type in (int, float) and not a.choices)  # a number without a Range
    out.write_text(json.dumps(results))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
