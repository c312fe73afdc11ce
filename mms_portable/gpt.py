"""A GPT-style decoder-only language model (the GPT-2 architecture: pre-norm blocks, learned
positions, GELU MLP, output layer tied to the token embedding).

How it fits the zoo's (batch, in_features) -> logits contract: a data row is a window of
``in_features`` token ids (ingest's builtin://pystdlib) and ``n_classes`` is the vocabulary.
``model(idx)`` returns logits shaped (batch, vocab, seq): the class dimension second, as
``F.cross_entropy`` and segmentation models have it, so ``argmax(1)`` is the predicted next token
at every position. A training step calls ``model(idx, targets)`` instead, which also returns the
mean loss: computing it inside the forward lets ``torch.compile`` fuse the output layer with the
cross-entropy instead of writing fp32 logits (batch x seq x vocab) to memory.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mms_portable.errors import PortableModelError

# (n_layer, n_head, n_embd). The gpt2* rows are the published GPT-2 sizes (124M .. 1.5B with the
# 50257-token vocabulary and 1024 positions); tiny and mini are for CPUs and tests.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 2, 64),
    "mini": (4, 4, 256),
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


@dataclass(frozen=True)
class GPTConfig:
    """Shape and options of a :class:`GPT`."""

    n_classes: int  # token ids the data uses (0..n_classes-1); logits are returned for these
    vocab_rows: int  # rows of the embedding (>= n_classes; rounded up for faster matmuls)
    block_size: int  # the longest sequence: rows of the position embedding
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    compile: bool = False


class SelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention`` (flash kernels on GPUs)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        # (b, t, 3c) -> three (b, heads, t, head_dim) tensors
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer over token ids; see the module docstring for its call forms."""

    causal_lm = True  # the training loop passes targets to models that say so (loop.forward_loss)

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_rows, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.apply(_init_weights)
        for block in self.blocks:  # GPT-2: residual branches scaled down with depth
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, n_classes, seq) of ``idx`` (batch, seq); with ``targets`` (batch, seq),
        the pair (logits, mean cross-entropy). Ids may arrive as floats (the shard format)."""
        if self.config.compile and self.training and idx.is_cuda:
            # Compiled for training on CUDA only: evaluation shapes and CPU serving stay eager, so
            # they never pay for (re)compiling.
            return _compiled_forward()(self, idx, targets)
        return _forward(self, idx, targets)

    def num_params(self, *, matmul_only: bool = True) -> int:
        """Parameters; ``matmul_only`` leaves out the position table (a lookup, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if matmul_only else n

    def flops_per_token(self, *, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention's
        scores and weighted sum, 12 * layers * width * seq (as in PaLM's MFU, appendix B)."""
        t = seq_len or self.config.block_size
        return 6.0 * self.num_params() + 12.0 * self.config.n_layer * self.config.n_embd * t


def _forward(model: GPT, idx: torch.Tensor, targets: torch.Tensor | None):
    idx = idx.long()
    pos = torch.arange(idx.shape[1], device=idx.device)
    x = model.drop(model.wte(idx) + model.wpe(pos))
    for block in model.blocks:
        x = block(x)
    logits = F.linear(model.ln_f(x), model.wte.weight)  # tied: one matrix, one state-dict entry
    out = logits[..., : model.config.n_classes].transpose(1, 2)  # rows past n_classes are padding
    if targets is None:
        return out
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long())
    return out, loss


@functools.cache
def _compiled_forward():
    # Made on first use: even wrapping a function in torch.compile imports dynamo (seconds).
    return torch.compile(_forward)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def gpt(
    *,
    in_features: int,
    n_classes: int,
    size: str = "tiny",
    n_layer: int | None = None,
    n_head: int | None = None,
    n_embd: int | None = None,
    dropout: float = 0.0,
    bias: bool = True,
    pad_vocab_to: int = 64,
    vocab_size: int | None = None,
    compile: bool = False,
) -> GPT:
    """Build a GPT for windows of ``in_features`` tokens over a vocabulary of ``n_classes``.

    Args:
        in_features: Sequence length (the data's window; also the position table's size).
        n_classes: Vocabulary size of the data (ids 0..n_classes-1).
        size: One of :data:`SIZES`; ``n_layer``, ``n_head``, ``n_embd`` override its entries.
        dropout: Dropout on embeddings, attention and residual branches (0: none, as for pretraining).
        bias: Biases in Linear and LayerNorm layers (GPT-2 has them; without is a little faster).
        pad_vocab_to: Round the embedding rows up to a multiple of this (matmul-friendly shapes).
        vocab_size: Embedding rows, at least ``n_classes``: e.g. 50304 to give a byte-level model
            GPT-2's output-layer cost, for throughput figures comparable with GPT-2-small.
        compile: ``torch.compile`` the training forward (and loss) when it runs on CUDA.
    """
    if size not in SIZES:
        raise PortableModelError(
            f"unknown GPT size {size!r}; use one of {sorted(SIZES)} or set n_layer/n_head/n_embd"
        )
    layers, heads, width = SIZES[size]
    layers, heads, width = n_layer or layers, n_head or heads, n_embd or width
    if width % heads:
        raise PortableModelError(f"GPT n_embd={width} must be a multiple of n_head={heads}")
    rows = max(vocab_size or n_classes, n_classes)
    rows = -(-rows // pad_vocab_to) * pad_vocab_to if pad_vocab_to > 1 else rows
    cfg = GPTConfig(
        n_classes=n_classes,
        vocab_rows=rows,
        block_size=in_features,
        n_layer=layers,
        n_head=heads,
        n_embd=width,
        dropout=dropout,
        bias=bias,
        compile=compile,
    )
    return GPT(cfg)
