#!/usr/bin/env bash
# The GPU check, in one run: versions, every step's smoke test, the fused ring-attention kernels and
# torch's context_parallel against them (cp), course vs transformers (eager and compiled), and train.py --compile.
#
#   bash step07_4d_combined/tools/gpu_check.sh OUT [PART ...]     # on the GPU machine, from the repo root
#   CHECK_DEVICE=cpu bash step07_4d_combined/tools/gpu_check.sh OUT  # the same parts, tiny, on a CPU
#
# PARTS (default: all, in this order): versions smoke ring cp bench compiled train summary.
# Each part writes OUT/PART.log (benchmarks: OUT/bench_*.json, train: OUT/train.jsonl and
# OUT/profile/rank0.json.gz); OUT/status.txt gets one "PART ok|FAIL seconds" line per part and a
# failed part does not stop the others; OUT/summary.md is the table for step07's REFERENCE.md.
# On an H200 the parts take about: smoke 2 min, ring 0.5, cp 0.5 (not yet timed), bench 1, compiled 3, train 2.
#
# No `datasets` on the GPU machine? Bring wheels for Python 3.12 in .whl/ (git-ignored), made here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1
# (datasets needs pyarrow >= 24; the pyarrow wheel is used only if the machine's is older.)
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT [PART ...]}
shift
parts=${*:-versions smoke ring cp bench compiled train summary}
for part in $parts; do
  case " versions smoke ring cp bench compiled train summary " in
    *" $part "*) ;;
    *) echo "error: unknown part $part; parts: versions smoke ring cp bench compiled train summary"; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."  # the repository root
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-/tmp/course_datasets}  # the token files of this run

if ! python3 -c "import datasets" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  wheels=(.whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl)
  python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null \
    || wheels+=(.whl/pyarrow-*.whl)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "${CHECK_DEVICE:-cuda}" = cpu ]; then  # the same parts, tiny, so that the script is tried first
  dev=(--device cpu) model=tiny seq=64 mbs=2 steps=3 extra=(--peak-tflops 1)
else
  dev=() model=smollm-1.7b seq=2048 mbs=4 steps=10 extra=()
fi
bench=(python3 step07_4d_combined/tools/benchmark.py "${dev[@]}" --model $model --seq-len $seq
       --micro-batch-size $mbs --steps $steps "${extra[@]}")

run_part() {  # run_part NAME LIMIT_S CMD...: its output to OUT/NAME.log, one line to OUT/status.txt
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -n 25 "$out/$name.log"
  [ $rc = 0 ] || failed+=("$name")
  echo "$name $([ $rc = 0 ] && echo ok || echo "FAIL(rc=$rc)") $((SECONDS - t0))s" | tee -a "$out/status.txt"
}
failed=()
echo "# $(date -u +%FT%TZ) parts: $parts" >> "$out/status.txt"

for part in $parts; do
  case $part in
    versions) run_part versions 60 python3 -c "
import platform, subprocess, torch, transformers
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| transformers', transformers.__version__)
try:
    import datasets; print('datasets', datasets.__version__, datasets.__file__)
except ImportError as e: print('datasets: missing', e)
if torch.cuda.is_available():
    print('gpu', torch.cuda.get_device_name(), '| capability', torch.cuda.get_device_capability(),
          '| nccl', torch.cuda.nccl.version(), '| memory GiB', round(torch.cuda.mem_get_info()[1] / 2**30, 1))
    print(subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True).stdout.strip())
else:
    print('no CUDA device')
" ;;
    smoke) run_part smoke 300 python3 step07_4d_combined/tools/gpu_smoke.py "${dev[@]}" --max-steps 3 --timeout 120 ;;
    ring) run_part ring 120 python3 step07_4d_combined/tools/ring_check.py "${dev[@]}" ;;
    cp) run_part cp 180 python3 -m torch.distributed.run --standalone --nproc_per_node 2 tests/workers/native_cp_gpu.py ;;
    bench) run_part bench 240 sh -c '"$@" > "$0"' "$out/bench_eager.json" "${bench[@]}" ;;
    compiled) run_part compiled 420 sh -c '"$@" > "$0"' "$out/bench_compiled.json" "${bench[@]}" --compile ;;
    train) rm -rf "$out/profile"
      run_part train 420 python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
        step07_4d_combined/train.py "${dev[@]}" --model $model --seq-len $seq --micro-batch-size $mbs \
        --grad-acc-steps 1 --max-steps $((steps + 5)) --compile --log-file "$out/train.jsonl" \
        --profile "$out/profile" "${extra[@]}"
      gzip -f "$out"/profile/*.json 2>/dev/null ;;
    summary) run_part summary 60 python3 - "$out" <<'EOF'
import datetime, json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
eager, comp = load("bench_eager.json"), load("bench_compiled.json")
first = eager or comp
if first is None:
    sys.exit("no benchmark results in " + str(out))
print(f"{first['model']}, seq {first['seq_len']}, mbs {first['micro_batch_size']}, {first['dtype']}, "
      f"{first['device']}, {datetime.date.today()}\n")
print("| what | tokens/s | MFU | peak memory |\n|---|---|---|---|")
rows = {}
for res, mode in ((eager, "eager"), (comp, "compiled")):
    for who in ("transformers", "course"):
        r = (res or {}).get(who)
        if r:
            rows[who, mode] = r["tokens_per_s"]
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            print(f"| {who} ({'benchmark.py' if who == 'course' else 'LlamaForCausalLM'}), {mode} | "
                  f"{r['tokens_per_s']:,.0f} | {mfu} | {r.get('peak_mem_gib', '-')} GiB |")
try:
    log = [json.loads(l) for l in (out / "train.jsonl").read_text().splitlines() if '"step"' in l]
except OSError:
    log = []
if len(log) > 5:
    late = log[5:]  # after compilation (step 0), the profiled steps (1-3) and the trace's export (4)
    tps = statistics.median(r["tokens_per_s"] for r in late)
    mfu = f"{statistics.median(r['mfu'] for r in late):.1%}" if late[0].get("mfu") is not None else "-"
    mem = max(r["mem_gib"] for r in late)
    rows["train", "compiled"] = tps
    print(f"| course train.py 1x1x1x1 --compile (median of steps 5-{log[-1]['step']}) | {tps:,.0f} | "
          f"{mfu} | {mem:.1f} GiB |")
if ("transformers", "compiled") in rows:
    base = rows["transformers", "compiled"]
    for key in (("course", "compiled"), ("train", "compiled")):
        if key in rows:
            print(f"\n{key[0]} compiled / transformers compiled: {rows[key] / base:.3f}x (goal >= 1.15x)")
EOF
      cp "$out/summary.log" "$out/summary.md"
      ;;
  esac
done
echo "=== status"; cat "$out/status.txt"
[ ${#failed[@]} = 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
