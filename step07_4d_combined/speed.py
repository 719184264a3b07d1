"""Speed: compile the decoder layers (--compile) and see where a step's time goes (--profile DIR).

--compile. Each decoder layer is handed to torch.compile in place (nn.Module.compile): the
module tree, the parameter names (and so the Hugging Face mapping and the checkpoints), the
gradient hooks of data parallelism and the pipeline's split are those of the eager run; only
what runs inside a layer's forward and backward changes. Inductor fuses the elementwise ops
between the matmuls (RMSNorm, RoPE, SwiGLU, the residual adds) into a few kernels, which is
where an eager bf16 step loses most of its time on a GPU. All the layers of a model have the
same code and shapes, so the first one compiles and the others reuse its graph (the first step
is slow: minutes for a big model on a GPU, tens of seconds for `tiny` on a CPU).
  - Every dimension works. tp's all-reduces (Megatron's f and g) and sp's all-gather and
    reduce-scatter, called inside autograd Functions, are traced into the layer's graph as
    functional collectives: one graph per layer, forward and backward. cp's ring attention
    posts point-to-point ops in a loop, which Dynamo cannot trace: it runs eager between the
    compiled parts of the layer (a graph break). Losses equal the eager run's (tests).
  - --recompute: the checkpointed layer is compiled, and its recomputation runs the compiled
    forward again.
  - Refused: --memory-report (it counts what eager autograd saves; a compiled graph saves its
    own choice of tensors) and --zero 3 (zero.py), each with a one-line error.
  - The embedding, the head and the loss stay eager: the loss is vocab-parallel under tp, and
    the head's matmul is one big kernel already.

--profile DIR. torch.profiler records steps start+1 .. start+3 (step start is the warm-up:
allocation, compilation) of every rank, CPU ops and, on a GPU, CUDA kernels, and writes
DIR/rank{R}.json, a Chrome trace: open it in https://ui.perfetto.dev (or chrome://tracing).
Each rank's file shows its forward and backward ops, the NCCL/gloo collectives, the optimizer;
the gaps are the time waiting for other ranks.
"""
from pathlib import Path

import torch


def add_speed_args(parser):
    a = parser.add_argument
    a("--compile", action="store_true", help="torch.compile each decoder layer (in place: same parameter names)")
    a("--profile", default=None, metavar="DIR", help="write a torch.profiler trace of steps 1-3 to DIR/rank{R}.json")


def compile_layers(model, args):
    """--compile: each decoder layer of this stage compiled in place. -> model"""
    if args.memory_report:
        raise ValueError("--memory-report counts what eager autograd saves for backward; "
                         "drop --compile (or --memory-report)")
    if args.zero == 3:
        raise ValueError("--zero 3 gathers each layer's weights in module hooks, which torch.compile does not "
                         "trace; drop --compile or use --zero 2")
    for layer in model.model.layers.values():
        layer.compile()  # nn.Module.compile: wraps the call, keeps the module, its names and hooks
    return model


class Profiler:
    """--profile DIR: record a few steps with torch.profiler; a no-op without it. Call step() after
    every optimizer step and stop() after the loop."""

    def __init__(self, out_dir, rank, device, steps):
        self.prof = None
        if not out_dir:
            return
        if steps < 2:
            raise ValueError(f"--profile records the steps after the first, and this run has {steps}; "
                             f"raise --max-steps")
        self.path = Path(out_dir) / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities, record_shapes=True,
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=min(3, steps - 1), repeat=1),
            on_trace_ready=lambda prof: prof.export_chrome_trace(str(self.path)))
        self.prof.start()

    def step(self):
        if self.prof is not None:
            self.prof.step()

    def stop(self):
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
