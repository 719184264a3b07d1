"""Every command the course shows runs as written, and every layout it shows equals step01 (issue 30).

The documents are README.md, the step READMEs and notebooks/README.md. Each `python` and `torchrun`
command in them (in a fenced block, backslash continuations joined, or in inline code) runs from the
root of a throw-away copy of the repository, in the order the documents give them (a later command
may read what an earlier one wrote: a trace folder, ckpt/, my.json), with trainers cut to
`--max-steps 2` (4 with `--resume`: two steps more than the run that saved). Checked for each:
exit 0, no traceback, no warning on stderr. For a trainer of steps 02-07, step01 run with the same
model and data flags at the same global batch (micro-batch x grad-acc x dp sequences) gives the same
per-step losses (rel 1e-4), and that global batch is step01's default, 8, unless the command's own
comment says why not (a comment that names the "global batch").

A command that cannot run here ends with a marker comment, visible in the document: `# GPU`,
`# needs the hub`, `# slow` (minutes of CPU: what a reader may run, CI cannot afford). Only marked
commands are skipped, and they are counted; an unmarked command that fails, fails the test.
Runs are on the CPU (gloo, float32) also where a GPU is present, like every equivalence test.
"""
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import REPO, STEPS, assert_same_losses, child_env, free_port, read_metrics

DOCS = ["README.md", *(f"{s}/README.md" for s in STEPS), "notebooks/README.md"]
MARKERS = ("# GPU", "# needs the hub", "# slow")
STEP01, STEP01_BATCH = "step01_single_gpu", 8
TRAINER = re.compile(r"^(step0\d_[a-z0-9_]+)/train\.py$")
FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # a code span may wrap onto the next line
# flags of step01 that are not the model and data: the batch (compared as G) and what a run writes
NOT_MODEL = {"micro_batch_size", "grad_acc_steps", "max_steps", "log_file", "dump_params"}


# --- finding the commands ---
def split_comment(line):
    """(code, comment): the comment starts at the first '#' outside quotes that follows a space."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:].strip()
    return line.rstrip(), ""


def is_command(code):
    words = code.split()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the program
        words = words[1:]
    return len(words) > 1 and words[0] in ("python", "torchrun")  # a program and what it runs


def commands(text):
    """[(command, comment)] of a Markdown text, in order: fenced lines, then the inline code around them."""
    found = []
    for block in FENCE.finditer(text):
        lines, joined = block.group(1).splitlines(), []
        while lines:
            line = lines.pop(0)
            while line.rstrip().endswith("\\") and lines:  # a backslash continues the command
                line = line.rstrip()[:-1].rstrip() + " " + lines.pop(0).strip()
            joined.append((block.start(), line.strip()))
        for pos, line in joined:
            code, comment = split_comment(line)
            for part in code.split("&&"):  # `pip install ... && python ...`: the python part
                if is_command(part.strip()):
                    found.append((pos, part.strip(), comment))
    prose = FENCE.sub(lambda m: " " * len(m.group(0)), text)  # keep positions, drop the blocks
    for span in INLINE.finditer(prose):
        code, comment = split_comment(" ".join(span.group(1).split()))
        if is_command(code):
            found.append((span.start(), code, comment))
    return [(code, comment) for _, code, comment in sorted(found, key=lambda f: f[0])]


def marker(comment):
    return next((m for m in MARKERS if comment == m or comment.startswith(m + ":") or
                 comment.startswith(m + " ")), None)


# --- what a command is ---
def parse_flags(tokens):
    """['--dp', '2', '--sp'] -> {'dp': '2', 'sp': True} (dashes become underscores)."""
    flags, i = {}, 0
    while i < len(tokens):
        t = tokens[i]
        if t.startswith("--"):
            key = t[2:].replace("-", "_")
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                flags[key], i = tokens[i + 1], i + 2
                continue
            flags[key] = True
        i += 1
    return flags


def trainer_of(tokens):
    """(step, index of train.py in tokens) for a step's trainer, also run under notebooks/trace.py."""
    for i, t in enumerate(tokens):
        m = TRAINER.match(t)
        if m:
            return m[1], i
    return None, None


def effective_flags(args, copy):
    """The trainer's flags with a --config file's values under them (the command line wins)."""
    flags = parse_flags(args)
    if "config" in flags:
        raw = json.loads((copy / flags["config"]).read_text())
        base = {}
        for key, value in raw.items():
            for k, v in (value.items() if isinstance(value, dict) else [(key, value)]):
                base[k.replace("-", "_")] = v
        flags = {**{k: v for k, v in base.items() if v not in (False, None)}, **flags}
    return flags


def global_batch(flags):
    return (int(flags.get("micro_batch_size", 8)) * int(flags.get("grad_acc_steps", 1))
            * int(flags.get("dp", 1)))


def step01_flags():
    """The flags step01 has: its train.py takes exactly utils.base_parser's."""
    code = (f"import sys; sys.path.insert(0, {str(REPO / STEP01)!r}); import utils; "
            "print(' '.join(a.dest for a in utils.base_parser('')._actions if a.option_strings))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split()) - {"help"}


def as_argv(flags):
    out = []
    for k, v in sorted(flags.items()):
        out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return out


# --- running them ---
class Runner:
    def __init__(self, copy, logs):
        self.copy, self.logs, self.n = copy, logs, 0
        self.model_flags = step01_flags() - NOT_MODEL
        self.refs = {}  # (model and data flags, G, max_steps) -> step01's metrics

    def argv(self, code):
        """The command as the subprocess runs it: python -> this interpreter, torchrun -> its module on a
        free port; a trainer cut to 2 steps (4 with --resume) and logging to a file of ours."""
        words = shlex.split(code)
        env = {}
        while "=" in words[0] and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        prog, rest = words[0], words[1:]
        head = [sys.executable] if prog == "python" else [
            sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        step, i = trainer_of(rest)
        log = None
        if step:
            pre, args = rest[:i + 1], rest[i + 1:]
            if "--max-steps" in args:
                j = args.index("--max-steps")
                args = args[:j] + args[j + 2:]
            steps = 4 if "--resume" in args else 2
            self.n += 1
            log = self.logs / f"run{self.n}.jsonl"
            if "--log-file" in args:
                log = self.copy / args[args.index("--log-file") + 1]
            else:
                args = [*args, "--log-file", str(log)]
            rest = [*pre, *args, "--max-steps", str(steps)]
        return head + rest, env, step, log, rest

    def run(self, argv, env):
        env = child_env({"CUDA_VISIBLE_DEVICES": "", **env})  # the CPU path, as every equivalence test
        try:
            return subprocess.run(argv, cwd=self.copy, env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return None

    def reference(self, flags, G, max_steps):
        """step01's metrics for these model and data flags at global batch G (one run per key)."""
        model = {k: v for k, v in flags.items() if k in self.model_flags}
        key = (tuple(as_argv(model)), G, max_steps)
        if key not in self.refs:
            self.n += 1
            log = self.logs / f"step01_ref{self.n}.jsonl"
            proc = self.run([sys.executable, f"{STEP01}/train.py", *key[0], "--micro-batch-size", str(G),
                             "--grad-acc-steps", "1", "--max-steps", str(max_steps), "--log-file", str(log)], {})
            assert proc is not None and proc.returncode == 0, f"step01 reference {key}: {proc and proc.stderr[-2000:]}"
            self.refs[key] = read_metrics(log)
        return self.refs[key]

    def note_reference(self, flags, max_steps, log):
        """A documented step01 command is a reference too: no second step01 run for the same key."""
        model = {k: v for k, v in flags.items() if k in self.model_flags}
        self.refs.setdefault((tuple(as_argv(model)), global_batch(flags), max_steps), read_metrics(log))


def problems_of(proc):
    """What is wrong with a finished command: [] when it exited 0, printed no traceback and no warning."""
    if proc is None:
        return ["timed out after 300 s"]
    out = []
    if proc.returncode != 0:
        out.append(f"exit {proc.returncode}")
    if "Traceback (most recent call last)" in proc.stdout + proc.stderr:
        out.append("a traceback")
    warn = [line for line in proc.stderr.splitlines() if re.search(r"warn", line, re.I)]
    if warn:
        out.append(f"a warning on stderr: {warn[0].strip()[:200]}")
    if out:
        out.append(f"stderr tail:\n{proc.stderr[-1500:]}")
    return out


def copy_repo(dest):
    """The repository as git sees it (tracked and untracked, not ignored), else the whole folder."""
    ls = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    if ls.returncode == 0 and ls.stdout:
        for rel in filter(None, ls.stdout.decode().split("\0")):
            src = REPO / rel
            if src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:
        shutil.copytree(REPO, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "__pycache__"))


# --- the tests ---
def test_commands_are_found_in_blocks_continuations_and_inline_code():
    text = ("Run `python a.py --x 1` first, or `torchrun --nproc_per_node 2\n  b.py`; not `train.py --y`.\n\n"
            "```bash\n# a comment line\npip install -r r.txt && python c.py\n"
            "torchrun --nproc_per_node 4 step02_data_parallel/train.py \\\n    --dp 4 --micro-batch-size 2\n"
            "python -c \"print('# not a comment')\"   # GPU: one device\nCONFIG=x.json sbatch s.sh\n"
            "FOO=1 python d.py  # the same\n```\n\n```\nstep    0 | loss 6.9348\n```\n"
            "and `python e.py  # needs the hub` last.\n")
    assert commands(text) == [
        ("python a.py --x 1", ""), ("torchrun --nproc_per_node 2 b.py", ""),
        ("python c.py", ""), ("torchrun --nproc_per_node 4 step02_data_parallel/train.py --dp 4 --micro-batch-size 2", ""),
        ("python -c \"print('# not a comment')\"", "# GPU: one device"), ("FOO=1 python d.py", "# the same"),
        ("python e.py", "# needs the hub")]
    assert [marker(c) for _, c in commands(text)] == [None, None, None, None, "# GPU", None, "# needs the hub"]
    assert global_batch(parse_flags(["--dp", "4", "--micro-batch-size", "2", "--sp"])) == 8
    assert parse_flags(["--tp", "2", "--sp", "--cp", "2"]) == {"tp": "2", "sp": True, "cp": "2"}


def test_every_documented_command_runs_and_every_layout_equals_step01(tmp_path):
    copy, logs = tmp_path / "repo", tmp_path / "logs"
    copy.mkdir()
    logs.mkdir()
    copy_repo(copy)
    runner = Runner(copy, logs)
    seen, marked, failures, ran, compared, took = {}, {}, [], 0, 0, []
    found = [(doc, code, comment) for doc in DOCS for code, comment in commands((REPO / doc).read_text())]
    assert len(found) > 30, f"only {len(found)} commands found in {DOCS}: is the extraction broken?"
    for doc, code, comment in found:
        what = f"{doc}: {code}"
        m = marker(comment)
        if m:
            marked.setdefault(m, []).append(what)
            continue
        argv, env, step, log, rest = runner.argv(code)
        key = (tuple(rest), tuple(sorted(env.items())))
        key = tuple(str(logs) if str(a).startswith(str(logs)) else a for a in key[0]), key[1]
        if key in seen:  # the same command again (the course table repeats the step READMEs)
            continue
        t0 = time.perf_counter()
        proc = runner.run(argv, env)
        took.append((time.perf_counter() - t0, what))
        ran += 1
        seen[key] = proc
        bad = problems_of(proc)
        if bad:
            failures.append(f"{what}\n  " + "\n  ".join(bad))
            continue
        if not step:
            continue
        i = next(j for j, t in enumerate(rest) if TRAINER.match(t))
        flags = effective_flags(rest[i + 1:], copy)
        G, max_steps = global_batch(flags), int(flags["max_steps"])
        if step == STEP01:
            runner.note_reference(flags, max_steps, log)
            continue
        if G != STEP01_BATCH and "global batch" not in comment:
            failures.append(f"{what}\n  trains a global batch of {G} sequences, step01's default is {STEP01_BATCH}: "
                            f"fix the flags, or say beside the command why (a comment naming the global batch)")
        try:
            got = read_metrics(log)
            ref = {r["step"]: r for r in runner.reference(flags, G, max_steps)}
            assert got, "no steps logged"
            assert_same_losses([ref[r["step"]] for r in got], got, what=what)
            compared += 1
        except (AssertionError, KeyError) as e:
            failures.append(f"{what}\n  not step01's losses at global batch {G}: {e}")
    counts = ", ".join(f"{len(v)} marked {k!r}" for k, v in marked.items())
    print(f"\ndocs: {len(found)} commands, {ran} run ({compared} layouts against step01, "
          f"{len(runner.refs)} step01 references), {counts}")
    for k, v in marked.items():
        print(f"  skipped, {k}:\n    " + "\n    ".join(v))
    print(f"  {sum(s for s, _ in took):.0f} s in the documented commands (this machine's load: say so), slowest:\n    "
          + "\n    ".join(f"{s:5.1f} s  {w}" for s, w in sorted(took, reverse=True)[:8]))
    assert not failures, f"{len(failures)} documented command(s) do not run as written:\n\n" + "\n\n".join(failures)
