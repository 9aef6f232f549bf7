"""3D parallelism, run on every rank by test_tensor_parallel.py: a
Megatron-style tensor-parallel MLP (column- then row-parallel linears over the
stage's tensor-parallel group) in a pipeline, on DeepSpeed's engine and ours.
Its tensor-parallel primitives are the GPT example's (examples/demo_gpt.py)."""
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.pipe import PipelineModule as DSPipelineModule

import deepspeed_pipe_ext as dpe
from deepspeed_pipe_ext.topology import PipeModelDataParallelTopology

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
from demo_gpt import TensorParallel, copy_to_tensor_parallel, sum_over_tensor_parallel  # noqa: E402


class TensorParallelMLP(nn.Module):
    """h + Row(gelu(Column(h))): each tensor-parallel rank holds 1/TP of the
    hidden units; the full weights come from one seed, so any TP size gives
    the same function."""

    def __init__(self, hidden, ffn, seed, tp_size=2, tp_rank=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w1, w2 = torch.randn(ffn, hidden, generator=g) / hidden**0.5, torch.randn(hidden, ffn, generator=g) / ffn**0.5
        self.tp_size, self.tp_rank, self.shard = tp_size, tp_rank, ffn // tp_size
        self.w1_full, self.w2_full = w1, w2  # sliced on first use, when the group is known
        self.w1 = nn.Parameter(torch.empty(self.shard, hidden))
        self.w2 = nn.Parameter(torch.empty(hidden, self.shard))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.w1.tensor_model_parallel = self.w2.tensor_model_parallel = True  # Megatron's mark for shards
        self._sliced = False

    def slice_for(self, tp_rank):
        with torch.no_grad():
            self.w1.copy_(self.w1_full[tp_rank * self.shard:(tp_rank + 1) * self.shard])
            self.w2.copy_(self.w2_full[:, tp_rank * self.shard:(tp_rank + 1) * self.shard])

    def forward(self, h):
        x = copy_to_tensor_parallel(h)
        x = nn.functional.gelu(x @ self.w1.t())
        return h + sum_over_tensor_parallel(x @ self.w2.t()) + self.bias


def mlp_layers(spec, hidden, ffn):
    return [spec(nn.Linear, 6, hidden), spec(TensorParallelMLP, hidden, ffn, 1),
            spec(TensorParallelMLP, hidden, ffn, 2),
            spec(nn.Linear, hidden, 3)]


def build(kind, world_size, hidden=4, micro_batch=3, micro_batches=3, pipeline=None, extra_config=None, seed=7,
          module_kwargs=None):
    """DeepSpeed's module and engine ('deepspeed') or ours ('ours') on
    PP=2 x TP=2 (x DP=2 with 8 ranks), through deepspeed.initialize."""
    from deepspeed import initialize as ds_initialize
    module_cls, spec = ((DSPipelineModule, deepspeed.pipe.LayerSpec) if kind == "deepspeed" else
                        (dpe.PipelineModule, dpe.LayerSpec))
    torch.manual_seed(seed)
    topology = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=world_size // 4)
    net = module_cls(layers=mlp_layers(spec, hidden, 8), topology=topology, loss_fn=nn.MSELoss(),
                     partition_method="uniform", **(module_kwargs or {}))
    TensorParallel.group = net.mpu().get_slice_parallel_group()
    for layer in net.forward_funcs:
        if isinstance(layer, TensorParallelMLP):
            layer.slice_for(dist.get_rank(TensorParallel.group))
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": micro_batches,
              "steps_per_print": 10**9, "gradient_clipping": 1.0, "pipeline": dict(pipeline or {}),
              **(extra_config or {})}
    engine, _, _, _ = ds_initialize(model=net, config=config, model_parameters=net.parameters(),
                                    optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    assert (type(engine).__module__ == "deepspeed_pipe_ext.engine") == (kind == "ours"), type(engine)
    return engine, net


def batches(engine, step, micro_batch=3, micro_batches=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(50 + 1000 * step + engine.grid.data_parallel_id)
    return [(torch.randn(micro_batch, 6, generator=g).to(dtype), torch.randn(micro_batch, 3, generator=g).to(dtype))
            for _ in range(micro_batches)]


def train(rank, world_size, pipeline_configs, hidden=4, micro_batch=3, steps=10, micro_batches=3, engines="both",
          extra_config=None):
    """Per pipeline config: DeepSpeed's engine and ours (or only ours); the
    losses, weights, eval loss and, for ours, the bytes of stage 0's
    activation sends."""
    out = []
    dtype = torch.bfloat16 if (extra_config or {}).get("bf16", {}).get("enabled") else torch.float32
    for pipeline in pipeline_configs:
        pair = []
        for kind in (("deepspeed", "ours") if engines == "both" else ("ours", )):
            engine, net = build(kind, world_size, hidden, micro_batch, micro_batches, pipeline, extra_config)
            data = batches(engine, 0, micro_batch, micro_batches, dtype)
            losses = [engine.train_batch(data_iter=iter(data)).item() for _ in range(steps)]
            sent = None
            if kind == "ours":  # one more batch on every rank; stage 0 records its sends
                engine.p2p.set_recording(engine.stage_id == 0)
                engine.train_batch(data_iter=iter(data))
                if engine.stage_id == 0:
                    sent = sorted({size for op, _, size, what in engine.p2p.trace
                                   if op == "send" and "SendActivation" in what and "(meta)" not in what})
                engine.p2p.set_recording(False)
            else:
                engine.train_batch(data_iter=iter(data))
            evals = engine.eval_batch(iter(data)).item()
            weights = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
            pair.append({"losses": losses, "weights": weights, "eval": evals, "sent": sent,
                         "flags": (engine.is_model_parallel, engine.is_pipe_partitioned, engine.is_grad_partitioned)})
        out.append(pair)
    return out


def checkpoint_interop(rank, world_size, directory):
    """Saved by one engine after 3 steps, loaded by a fresh engine of the
    other kind: its next 2 steps give the losses of the saver's next 2; and
    the file names in the tag directory (on rank 0)."""
    import os
    results = {}
    for saver, loader in (("ours", "deepspeed"), ("deepspeed", "ours")):
        path = os.path.join(directory, f"{saver}_to_{loader}")
        engine, _ = build(saver, world_size)
        for step in range(3):
            engine.train_batch(data_iter=iter(batches(engine, step)))
        engine.save_checkpoint(path, tag="t")
        continued = [engine.train_batch(data_iter=iter(batches(engine, step))).item() for step in (3, 4)]
        other, _ = build(loader, world_size, seed=99)
        other.load_checkpoint(path, tag="t")
        resumed = [other.train_batch(data_iter=iter(batches(other, step))).item() for step in (3, 4)]
        files = sorted(os.listdir(os.path.join(path, "t"))) if rank == 0 else None
        results[f"{saver}_to_{loader}"] = (continued, resumed, files)
    if rank == 0:  # the export tool takes one tensor-parallel rank's shards, and says so without one
        from deepspeed_pipe_ext._checkpoint_files import CheckpointError, to_sequential_state_dict
        path = os.path.join(directory, "ours_to_deepspeed")
        shards = [to_sequential_state_dict(path, tag="t", model_rank=r) for r in range(2)]
        results["export"] = {"shapes": {k: tuple(v.shape) for k, v in shards[0].items()},
                             "differ": not torch.equal(shards[0]["1.w1"], shards[1]["1.w1"])}
        try:
            to_sequential_state_dict(path, tag="t")
        except CheckpointError as err:
            results["export"]["without_rank"] = str(err)
    return results


# ---------------------------------------------------------------------- a small Megatron-style GPT
VOCAB, HIDDEN, HEADS, SEQ = 16, 8, 2, 6


def _seeded(seed, *shape, scale):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


class Embedding(nn.Module):
    """Token and position embeddings; returns (hidden states, a bool padding
    mask) for the blocks. Its weight is tied to the output head."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(_seeded(100, VOCAB, HIDDEN, scale=0.3))
        self.position = nn.Parameter(_seeded(101, SEQ, HIDDEN, scale=0.1))

    def forward(self, tokens):
        return self.weight[tokens] + self.position, tokens != 0  # token 0 is padding


def lm_head(embedding, hidden):
    return hidden @ embedding.weight.t()


class TransformerBlock(nn.Module):
    """Pre-norm causal self-attention and MLP; the heads and the MLP's hidden
    units are split across the tensor-parallel ranks (column-parallel in,
    row-parallel out, one all-reduce each)."""

    def __init__(self, seed):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.full = {"qkv": _seeded(seed, 3, HEADS, HIDDEN // HEADS, HIDDEN, scale=HIDDEN**-0.5),
                     "out": _seeded(seed + 1, HIDDEN, HEADS, HIDDEN // HEADS, scale=HIDDEN**-0.5),
                     "up": _seeded(seed + 2, 2 * HIDDEN, HIDDEN, scale=HIDDEN**-0.5),
                     "down": _seeded(seed + 3, HIDDEN, 2 * HIDDEN, scale=(2 * HIDDEN)**-0.5)}
        self.qkv = nn.Parameter(torch.empty(3, HEADS // 2, HIDDEN // HEADS, HIDDEN))
        self.out = nn.Parameter(torch.empty(HIDDEN, HEADS // 2, HIDDEN // HEADS))
        self.up = nn.Parameter(torch.empty(HIDDEN, HIDDEN))
        self.down = nn.Parameter(torch.empty(HIDDEN, HIDDEN))
        for shard in (self.qkv, self.out, self.up, self.down):
            shard.tensor_model_parallel = True

    def slice_for(self, tp_rank):
        h, u = HEADS // 2, HIDDEN
        with torch.no_grad():
            self.qkv.copy_(self.full["qkv"][:, tp_rank * h:(tp_rank + 1) * h])
            self.out.copy_(self.full["out"][:, tp_rank * h:(tp_rank + 1) * h])
            self.up.copy_(self.full["up"][tp_rank * u:(tp_rank + 1) * u])
            self.down.copy_(self.full["down"][:, tp_rank * u:(tp_rank + 1) * u])

    def forward(self, inputs):
        h, mask = inputs
        x = copy_to_tensor_parallel(self.norm1(h))
        q, k, v = torch.einsum("bth,nadh->nbatd", x, self.qkv)  # n: q/k/v, a: local heads
        scores = q @ k.transpose(-1, -2) / (HIDDEN // HEADS)**0.5
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        scores = scores.masked_fill(~(causal & mask[:, None, None, :]), -1e4)
        context = torch.softmax(scores, dim=-1) @ v  # b, a, t, d
        h = h + sum_over_tensor_parallel(torch.einsum("batd,had->bth", context, self.out))
        x = copy_to_tensor_parallel(self.norm2(h))
        h = h + sum_over_tensor_parallel(nn.functional.gelu(x @ self.up.t()) @ self.down.t())
        return h, mask


class FinalNorm(nn.LayerNorm):
    def forward(self, inputs):
        return super().forward(inputs[0])


def gpt_layers(spec, tied):
    blocks = [spec(TransformerBlock, 200 + 10 * i) for i in range(4)]
    return [tied("embed", Embedding), *blocks, spec(FinalNorm, HIDDEN),
            tied("embed", Embedding, forward_fn=lm_head, tied_weight_attr="weight")]


class MegatronMpu:
    """What Megatron-DeepSpeed hands deepspeed.checkpointing.configure: the
    tensor-parallel rank, size and group (here from a pipeline grid)."""

    def __init__(self, grid):
        self.grid = grid

    def get_tensor_model_parallel_rank(self):
        return self.grid.get_slice_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.grid.get_slice_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.grid.get_slice_parallel_group()

    def get_data_parallel_rank(self):
        return self.grid.get_data_parallel_rank()


def gpt_loss(logits, labels):
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def gpt_batches(engine, step, micro_batches=2):
    g = torch.Generator().manual_seed(70 + 1000 * step + engine.grid.data_parallel_id)
    out = []
    for _ in range(micro_batches):
        tokens = torch.randint(1, VOCAB, (2, SEQ + 1), generator=g)
        tokens[0, :2] = 0  # a padded row
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def train_gpt(rank, world_size, checkpointing_modes, steps=6, micro_batches=2):
    """The GPT on PP=2 x TP=2 with DeepSpeed's engine and ours, per
    activation-checkpointing mode: None, "deepspeed" (DeepSpeed's
    checkpoint with partition_activations over the tensor-parallel ranks) or
    "ours" (deepspeed_pipe_ext.activation_checkpointing.checkpoint)."""
    from deepspeed import initialize as ds_initialize

    from deepspeed_pipe_ext import activation_checkpointing as ours_checkpointing
    out = {}
    for mode in checkpointing_modes:
        pair = []
        for kind in ("deepspeed", "ours"):
            module_cls, spec, tied = ((DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.pipe.TiedLayerSpec)
                                      if kind == "deepspeed"
                                      else (dpe.PipelineModule, dpe.LayerSpec, dpe.TiedLayerSpec))
            torch.manual_seed(8)
            topology = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=world_size // 4)
            extra = {}
            if mode == "deepspeed":
                extra = {"activation_checkpoint_func": deepspeed.checkpointing.checkpoint}
            elif mode == "ours":
                extra = {"activation_checkpoint_func": ours_checkpointing.checkpoint}
            if mode is not None:  # the blocks only, as Megatron does (the embedding takes integer tokens)
                extra.update(activation_checkpoint_interval=1, checkpointable_layers=["TransformerBlock"])
            net = module_cls(layers=gpt_layers(spec, tied), topology=topology, loss_fn=gpt_loss,
                             partition_method="type:TransformerBlock", **extra)
            TensorParallel.group = net.mpu().get_slice_parallel_group()
            for layer in net.forward_funcs:
                if isinstance(layer, TransformerBlock):
                    layer.slice_for(dist.get_rank(TensorParallel.group))
            if mode == "deepspeed":  # DeepSpeed's own grid lacks get_tensor_model_parallel_group: Megatron's mpu
                deepspeed.checkpointing.configure(net.mpu() if kind == "ours" else MegatronMpu(net.mpu()),
                                                  partition_activations=True)
            config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": micro_batches,
                      "steps_per_print": 10**9, "gradient_clipping": 1.0}
            engine, _, _, _ = ds_initialize(model=net, config=config, model_parameters=net.parameters(),
                                            optimizer=torch.optim.Adam(net.parameters(), lr=0.01))
            engine.set_has_attention_mask(True)  # DeepSpeed's engine needs it to send the bool mask
            losses = [engine.train_batch(data_iter=iter(gpt_batches(engine, s, micro_batches))).item()
                      for s in range(steps)]
            evals = engine.eval_batch(iter(gpt_batches(engine, 99, micro_batches))).item()
            weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
            stage_layers = sorted(type(f).__name__ for f in net.forward_funcs if isinstance(f, nn.Module))
            pair.append({"losses": losses, "weights": weights, "eval": evals, "layers": stage_layers})
        out[str(mode)] = pair
    return out


def recorded_traces(rank, world_size, schedules, steps=2):
    """PP=2 x TP=2 with the split transfers on: per schedule, DeepSpeed's
    losses (its 1F1B) and ours with every transfer on one tag (gloo then
    matches in issue order, as NCCL does) and P2P recording what it issues."""
    out = {}
    for schedule in schedules:
        losses = {}
        for kind in ("deepspeed", "ours"):
            engine, _ = build(kind, world_size, pipeline={"schedule": schedule} if kind == "ours" else None)
            if kind == "ours":
                engine.p2p.set_single_tag(True)
                engine.p2p.set_recording(True)
            losses[kind] = [engine.train_batch(data_iter=iter(batches(engine, s))).item() for s in range(steps)]
            losses[kind].append(engine.eval_batch(iter(batches(engine, 9))).item())
        out[schedule] = {"theirs": losses["deepspeed"], "ours": losses["ours"], "trace": list(engine.p2p.trace),
                         "stage": engine.stage_id, "tp": engine.grid.get_slice_parallel_rank()}
    return out


def train_optimizers(rank, world_size, extra_configs, steps=6):
    """PP=2 x TP=2 with DeepSpeed's optimizer wrappers (ZeRO stage 1, bf16):
    per extra config, DeepSpeed's engine and ours."""
    return [train(rank, world_size, [{}], steps=steps, extra_config=extra)[0] for extra in extra_configs]


def topology_larger_than_the_job(rank, world_size):
    """PP=2 x TP=2 (4 ranks) in a job of `world_size` ranks: the error each rank raises."""
    try:
        dpe.PipelineModule(layers=mlp_layers(dpe.LayerSpec, 4, 8), loss_fn=nn.MSELoss(),
                           topology=PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1))
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def train_virtual(rank, world_size, steps=6, extra_config=None, pipeline=None, layout="interleaved"):
    """PP=2 x TP=2: DeepSpeed's engine (1F1B) against ours with two model
    chunks per rank (interleaved-1f1b, or zb-v in the V layout; split
    transfers on); per-layer seeds give both layouts the same weights.
    Losses, eval loss, this rank's weights."""
    out = []
    schedule = "zb-v" if layout == "v" else "interleaved-1f1b"
    for kind, module_kwargs, pipeline in (("deepspeed", {"seed_layers": True}, None),
                                          ("ours", {"seed_layers": True, "virtual_stages": 2,
                                                    "virtual_layout": layout},
                                           {"schedule": schedule, **(pipeline or {})})):
        if kind == "deepspeed" and pipeline:
            pipeline = {k: v for k, v in pipeline.items() if k != "schedule"}
        engine, net = build(kind, world_size, pipeline=pipeline, module_kwargs=module_kwargs,
                            extra_config=extra_config)
        data = batches(engine, 0)
        losses = [engine.train_batch(data_iter=iter(data)).item() for _ in range(steps)]
        out.append({"losses": losses, "eval": engine.eval_batch(iter(data)).item(),
                    "weights": {k: v.detach().clone() for k, v in net.state_dict().items()}})
    return out
