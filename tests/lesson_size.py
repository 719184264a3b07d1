"""How long each lesson is to read, in lines: the course's own figure for "a lesson holds its lesson".

    python tests/lesson_size.py

step01 is read whole: every .py file, split into those a learner must read and those whose
docstring opens with "You can skip this on first reading". Every later lesson is its diff against
the step before, `diff -ruN stepNN stepNN+1`: the lines it adds to .py files (a new file adds all
of its lines), with step07's stand-alone programs (tools/) counted apart.
"""
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = sorted(p.name for p in REPO.glob("step0*") if p.is_dir())
SKIPPABLE = "You can skip this on first reading"


def first_reading(step=STEPS[0]):
    """{file: lines} of a step's .py files -> (must read, may skip)."""
    must, skip = {}, {}
    for f in sorted((REPO / step).glob("*.py")):
        text = f.read_text()
        (skip if text.lstrip().lstrip('"').startswith(SKIPPABLE) else must)[f.name] = len(text.splitlines())
    return must, skip


def added_lines(prev, step):
    """{file: lines added} of the .py files in `diff -ruN prev step`, file as a path inside `step`."""
    diff = subprocess.run(["diff", "-ruN", "-x", "__pycache__", prev, step], cwd=REPO, capture_output=True,
                          text=True).stdout
    added, current = {}, None
    for line in diff.splitlines():
        if line.startswith("+++ "):
            path = line[4:].split("\t")[0]
            current = Path(path).relative_to(step).as_posix() if path.endswith(".py") else None
        elif current and line.startswith("+"):
            added[current] = added.get(current, 0) + 1
    return added


def lessons():
    """[(lesson, read-lines, tools/ read-lines)] for every lesson after step01."""
    out = []
    for prev, step in zip(STEPS, STEPS[1:]):
        added = added_lines(prev, step)
        tools = sum(n for f, n in added.items() if f.startswith("tools/"))
        out.append((f"{prev[:6]} -> {step}", sum(added.values()) - tools, tools))
    return out


def report():
    must, skip = first_reading()
    show = lambda files: ", ".join(f"{f} {n}" for f, n in files.items())  # noqa: E731
    lines = ["read-lines per lesson: step01 whole; later lessons: lines `diff -ruN` adds to .py files",
             f"{STEPS[0]:36s} must read {sum(must.values()):5,} ({show(must)})",
             f"{'':36s} may skip  {sum(skip.values()):5,} ({show(skip)})"]
    for name, n, tools in lessons():
        lines.append(f"{name:36s} {n:5,}" + (f" (+ tools/ {tools:,})" if tools else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
