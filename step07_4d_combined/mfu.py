"""Model FLOPs utilisation: how much of the hardware's peak the training run turns into model math.

Problem: tokens/s alone does not say whether a run is fast. MFU (Chowdhery et al. 2022, PaLM,
Appendix B) divides the FLOPs the MODEL needs per second by the peak the GPUs could do:
    mfu = flops_per_token x tokens_per_s / (n_gpus x peak_flops_per_gpu)
It counts only the model's math: recomputation, communication, pipeline bubbles and padding
are overheads, so they lower MFU instead of raising it.

FLOPs per token, forward + backward (Kaplan et al. 2020, Sec. 2.1; Narayanan et al. 2021):
    6 x N  +  12 x L x (H x hd) x T
  N: parameters that take part in a matmul: every decoder linear (q, k, v, o, gate, up, down)
     and the output head (V x D). A (m, n) weight costs 2mn FLOPs per token forward and 4mn
     backward (grad wrt input and wrt weight): 6mn. Not counted: the embedding lookup (a
     gather, no multiply), the norm gains and the linears' biases (attention_bias, mlp_bias:
     elementwise adds, O(m) per token, not matmul FLOPs).
     Tied embeddings: the one (V, D) matrix is counted once, as the head it multiplies with;
     untied, the head is counted and the embedding table is not. So N (and the head's
     6 x V x D per token) is the same with or without tying, as it must be: the math is the same.
  12 x L x (H x hd) x T: attention scores q k^T and the weighted sum p v, 2 x T x (H x hd)
     FLOPs each per token and layer forward, x3 with backward. H x hd is the real q width:
     hidden_size for most models, not where config.json sets its own head_dim (q and o are then
     (H hd, D) and (D, H hd), which N counts as they are).
     T is the training sequence length. No discount for the causal mask: the convention of the
     papers above, and what a dense kernel would do (flash attention skips about half).
Peak: dense bf16 tensor-core FLOP/s from the table below, looked up by the GPU's name, or
--peak-tflops. On a CPU there is no meaningful table entry: MFU only with --peak-tflops.
"""
import re

import torch

from utils import positive_float

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets.
# First match wins, so the more specific names come first.
PEAK_TFLOPS = [
    (r"GH200|H200", 989.5),
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.5),
    (r"H100|H800", 989.5),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"\bL40S\b", 362.05),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"RTX 4090", 165.2),
    (r"MI300X", 1307.4),
]


def add_mfu_args(parser):
    parser.add_argument("--peak-tflops", type=positive_float, default=None,
                        help="peak FLOP/s per device in TFLOP/s for MFU (default: looked up from the GPU's name)")


def matmul_params(config):
    """N: weights that take part in matmuls, per the module docstring (head yes, lookup no, tied once)."""
    D, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    hd = getattr(config, "head_dim", None) or D // config.num_attention_heads
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    per_layer = D * q + 2 * D * kv + q * D + 3 * D * I  # q, k, v, o + gate, up, down
    return L * per_layer + V * D  # + the output head


def flops_per_token(config, seq_len):
    """Training FLOPs (forward + backward) per token: 6 N + 12 L (H hd) T."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * hd * seq_len
    return 6 * matmul_params(config) + attn


def peak_tflops(device_name):
    """Dense bf16 TFLOP/s of a GPU from its name (torch.cuda.get_device_name()), or None."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


class MFU:
    """Per-step throughput numbers for the log: mfu (%) and tokens_per_s_per_gpu."""

    def __init__(self, config, seq_len, n_devices, device, override_tflops=None):
        self.flops_per_token = flops_per_token(config, seq_len)
        self.n_devices = n_devices
        self.device_name = torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"
        tflops = override_tflops
        if tflops is None and self.device_name != "cpu":
            tflops = peak_tflops(self.device_name)
        self.peak = tflops * 1e12 if tflops else None  # FLOP/s per device; None: MFU not reported

    def __call__(self, tokens_per_s):
        """tokens_per_s over the whole job -> dict for Metrics.log (mfu only with a known peak)."""
        per_device = tokens_per_s / self.n_devices
        out = {"tokens_per_s_per_gpu": round(per_device, 1)}
        if self.peak:
            out["mfu"] = round(100.0 * self.flops_per_token * per_device / self.peak, 2)
        return out

    def describe(self):
        peak = f"{self.peak / 1e12:g} TFLOP/s peak per device" if self.peak else "MFU off (no --peak-tflops)"
        return f"{self.flops_per_token / 1e9:.3g} GFLOP per token | {self.device_name}: {peak}"
