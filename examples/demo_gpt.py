"""The demo's character-level GPT for 3D parallelism: pipeline stages of
transformer blocks whose attention heads and MLP units are split across the
tensor-parallel ranks (Megatron's column- then row-parallel linears, one
all-reduce each), a token embedding tied to the output head across the first
and last stage, and (hidden states, a bool mask) passed between stages.

It reads text that ships with every Python: the standard library's source."""
import glob
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from deepspeed_pipe_ext import LayerSpec, TiedLayerSpec

SEQ = 64  # characters a sample sees
PAD = " "


def stdlib_text(max_chars=400_000):
    """Python source from the standard library (printable ASCII; other
    characters become '?')."""
    paths = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    chunks, size = [], 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        chunks.append(text)
        size += len(text)
        if size >= max_chars:
            break
    text = "".join(chunks)[:max_chars]
    return "".join(c if (32 <= ord(c) < 127 or c == "\n") else "?" for c in text)


class Vocabulary:
    def __init__(self, text):
        self.chars = sorted(set(text) | {PAD})
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text):
        return torch.tensor([self.index.get(c, self.index["?"]) for c in text], dtype=torch.long)

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


class TensorParallel:
    """The tensor-parallel group of this process (set once the module and its
    grid exist: layers are built inside PipelineModule, before the grid)."""
    group = None


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; the gradient is summed over the tensor-parallel ranks."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=TensorParallel.group)
        return grad


class _SumOverTensorParallel(torch.autograd.Function):
    """Sums the ranks' partial results; the gradient passes through."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, group=TensorParallel.group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def copy_to_tensor_parallel(x):
    """x, whose gradient is summed over the tensor-parallel ranks (the input
    of a column-parallel linear)."""
    return _CopyToTensorParallel.apply(x)


def sum_over_tensor_parallel(x):
    """The sum of every tensor-parallel rank's x (the output of a
    row-parallel linear)."""
    return _SumOverTensorParallel.apply(x)


class TokenEmbedding(nn.Module):
    def __init__(self, vocab, hidden):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden) * 0.02)
        self.position = nn.Parameter(torch.randn(SEQ, hidden) * 0.01)

    def forward(self, tokens):
        # The mask is all True here (every position holds a character); it
        # travels between stages as a bool tensor, as a padded batch's would.
        return self.weight[tokens] + self.position[:tokens.shape[1]], torch.ones_like(tokens, dtype=torch.bool)


def output_head(embedding, hidden):
    return hidden @ embedding.weight.t()


class TransformerBlock(nn.Module):
    """Pre-norm causal self-attention and MLP with 1/tp of the heads and of
    the MLP's units on each tensor-parallel rank."""

    def __init__(self, hidden, heads, tp):
        super().__init__()
        if heads % tp:
            raise ValueError(f"{heads} attention heads do not split over {tp} tensor-parallel ranks")
        self.tp, self.heads, self.head_dim = tp, heads // tp, hidden // heads
        local = self.heads * self.head_dim
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * local, bias=False)  # column-parallel
        self.proj = nn.Linear(local, hidden, bias=False)  # row-parallel
        self.up = nn.Linear(hidden, 4 * hidden // tp, bias=False)  # column-parallel
        self.down = nn.Linear(4 * hidden // tp, hidden, bias=False)  # row-parallel
        for linear in (self.qkv, self.proj, self.up, self.down):
            # Megatron's mark: a shard, not a copy (gradient clipping counts it on every tensor-parallel rank).
            linear.weight.tensor_model_parallel = True
        # Each rank's own shards: the same seed on every tensor-parallel rank
        # would make its heads copies of the others'. (Data-parallel replicas
        # differ too until DeepSpeed broadcasts the model at initialize.)
        seed = int(torch.randint(2**31, (1, ))) + 7919 * (dist.get_rank() if dist.is_initialized() else 0)
        self._init_shards(seed)

    def _init_shards(self, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for linear in (self.qkv, self.proj, self.up, self.down):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * linear.in_features**-0.5)
            self.proj.weight.mul_(0.5)
            self.down.weight.mul_(0.5)

    def _check_group(self):
        group = TensorParallel.group
        if group is None:
            raise RuntimeError("demo_gpt.TensorParallel.group is not set: after building the PipelineModule, set it "
                               "to net.mpu().get_slice_parallel_group()")
        size = dist.get_world_size(group)
        if size != self.tp:
            raise ValueError(f"this TransformerBlock holds 1/{self.tp} of its heads (tp={self.tp}) but the topology's "
                             f"tensor-parallel group has {size} rank(s): build the layers with tp={size}, or use a "
                             f"topology with num_mp={self.tp} (PipeModelDataParallelTopology)")

    def forward(self, inputs):
        self._check_group()  # a dictionary lookup: cheap beside the block
        h, mask = inputs
        b, t, _ = h.shape
        x = copy_to_tensor_parallel(self.norm1(h))
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril() & mask[:, None, None, :]
        context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        h = h + sum_over_tensor_parallel(self.proj(context.transpose(1, 2).reshape(b, t, -1)))
        x = copy_to_tensor_parallel(self.norm2(h))
        return h + sum_over_tensor_parallel(self.down(nn.functional.gelu(self.up(x)))), mask


class FinalNorm(nn.LayerNorm):
    def forward(self, inputs):
        return super().forward(inputs[0])


def layers(vocab, hidden=64, heads=4, blocks=4, tp=1):
    return ([TiedLayerSpec("embed", TokenEmbedding, vocab, hidden)] +
            [LayerSpec(TransformerBlock, hidden, heads, tp) for _ in range(blocks)] +
            [LayerSpec(FinalNorm, hidden),
             TiedLayerSpec("embed", TokenEmbedding, vocab, hidden, forward_fn=output_head, tied_weight_attr="weight")])


def loss_fn(logits, labels):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def windows(ids, micro_batch, seed):
    """Random (input, next-character) windows of the text, forever."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(ids) - SEQ - 1, (micro_batch, ), generator=g)
        chunk = torch.stack([ids[s:s + SEQ + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def generate(engine, vocab, prompt, length, sampler, seed=0, temperature=0.8):
    """Samples `length` characters after `prompt`, one pipeline forward
    (eval_batch) each; every rank calls it and gets the same text. `sampler`:
    the global rank (one of the last stage's) that draws each character."""
    g = torch.Generator().manual_seed(seed)
    ids = vocab.encode(prompt).tolist()
    for _ in range(length):
        context = ids[-SEQ:]
        tokens = torch.tensor([context + [vocab.index[PAD]] * (SEQ - len(context))])
        _, logits = engine.eval_batch(iter([(tokens, tokens)]), return_logits=True, compute_loss=False,
                                      bcast_loss=False, num_micro_batches=1)
        choice = torch.zeros(1, dtype=torch.long)
        if dist.get_rank() == sampler:
            probs = torch.softmax(logits[0, len(context) - 1].float() / temperature, dim=-1)
            choice[0] = torch.multinomial(probs, 1, generator=g)[0]
        dist.broadcast(choice, src=sampler)
        ids.append(int(choice))
    return vocab.decode(ids)
