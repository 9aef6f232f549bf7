"""Run on every rank by test_engine.py: our PipelineEngine against
DeepSpeed's on the same model, seeds and data."""
import os

import deepspeed
import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule as DSPipelineModule

import deepspeed_pipe_ext as dpe
from deepspeed_pipe_ext import engine as dpe_engine


def mlp_specs(spec):
    return [spec(nn.Linear, 8, 16), nn.ReLU(), spec(nn.Linear, 16, 16), nn.Tanh(), spec(nn.Linear, 16, 16),
            nn.ReLU(), spec(nn.Linear, 16, 4)]


def batches(seed, count, micro_batch=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(micro_batch, 8, generator=g), torch.randn(micro_batch, 4, generator=g)) for _ in range(count)]


def _train(module_cls, spec, make_engine, num_stages, steps, micro_batches, seed, extra_config=None):
    torch.manual_seed(seed)
    net = module_cls(layers=mlp_specs(spec), num_stages=num_stages, loss_fn=nn.MSELoss())
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": micro_batches,
              "steps_per_print": 10**9, **(extra_config or {})}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    engine, _, _, _ = make_engine(model=net, config=config, optimizer=optimizer, model_parameters=net.parameters())
    # The same batch every step (different per data-parallel rank), so the loss must fall.
    # bf16 models take bf16 inputs (neither engine casts the data).
    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32
    cast = lambda data: [(x.to(dtype), y.to(dtype)) for x, y in data]
    data = iter(cast(batches(100 + engine.grid.data_parallel_id, micro_batches)) * steps)
    losses = [engine.train_batch(data_iter=data).item() for _ in range(steps)]
    from deepspeed_pipe_ext.schedule import OPS  # F forward, B backward, I backward (input), W backward (weight)
    passes = "".join(OPS[code].letter for _, _, code, _, _ in getattr(engine, "last_timeline", []))
    buffer_usage = dict(getattr(engine, "last_buffer_usage", {}))
    evals = engine.eval_batch(iter(cast(batches(7, micro_batches))), return_logits=True)
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return losses, weights, evals, type(engine), passes, buffer_usage


def train_both(rank, world_size, num_stages, steps=20, micro_batches=4, seed=3, extra_config=None, timeline=False):
    """DeepSpeed's module and engine against ours, both built by deepspeed.initialize
    (with `timeline`, also our last train_batch's compute passes as a string of
    F, B and W, and its buffer usage)."""
    from deepspeed import initialize as ds_initialize
    from deepspeed.runtime.pipe.engine import PipelineEngine as DSPipelineEngine
    theirs = _train(DSPipelineModule, deepspeed.pipe.LayerSpec, ds_initialize, num_stages, steps, micro_batches,
                    seed, extra_config)
    ours = _train(dpe.PipelineModule, dpe.LayerSpec, ds_initialize, num_stages, steps, micro_batches, seed,
                  extra_config)
    assert theirs[3] is DSPipelineEngine and ours[3] is dpe_engine.PipelineEngine, (theirs[3], ours[3])
    if timeline:
        return theirs[:3], ours[:3], ours[4], ours[5]
    return theirs[:3], ours[:3]


def engine_selection(rank, world_size):
    """Which engine deepspeed.initialize builds: ours for our module (fp16
    too), DeepSpeed's for theirs unless adopted."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.pipe.engine import PipelineEngine as DSPipelineEngine
    ours = dpe.PipelineModule(layers=mlp_specs(dpe.LayerSpec), num_stages=2)
    theirs = DSPipelineModule(layers=mlp_specs(deepspeed.pipe.LayerSpec), num_stages=2, loss_fn=nn.MSELoss())
    base = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2}
    fp32 = DeepSpeedConfig(base, ours.mpu())
    bf16 = DeepSpeedConfig({**base, "bf16": {"enabled": True}}, ours.mpu())
    fp16 = DeepSpeedConfig({**base, "fp16": {"enabled": True}}, ours.mpu())
    choices = {"ours": dpe_engine.engine_class_for(ours, fp32), "theirs": dpe_engine.engine_class_for(theirs, fp32),
               "ours_bf16": dpe_engine.engine_class_for(ours, bf16),
               "ours_fp16": dpe_engine.engine_class_for(ours, fp16)}
    dpe.run_deepspeed_pipelines_on_this_engine()
    try:
        choices["theirs_adopted"] = dpe_engine.engine_class_for(theirs, fp32)
        torch.manual_seed(0)
        engine, _, _, _ = deepspeed.initialize(model=theirs, config=base, model_parameters=theirs.parameters(),
                                               optimizer=torch.optim.SGD(theirs.parameters(), lr=0.1))
        choices["theirs_adopted_built"] = type(engine)
        engine.train_batch(data_iter=iter([(torch.randn(1, 8), torch.randn(1, 4))] * 2))
    finally:
        dpe.run_deepspeed_pipelines_on_this_engine(False)
    expected = {"ours": dpe_engine.PipelineEngine, "theirs": DSPipelineEngine, "ours_bf16": dpe_engine.PipelineEngine,
                "ours_fp16": dpe_engine.PipelineEngine,
                "theirs_adopted": dpe_engine.PipelineEngine, "theirs_adopted_built": dpe_engine.PipelineEngine}
    return {k: choices[k] is v for k, v in expected.items()}


def gradient_accumulation(rank, world_size):
    """Two 1x1 linear layers with weight 1, SGD lr 0.1, two micro-batches of
    (1 -> 0) with MSE: the weights after one train_batch, both engines."""
    from deepspeed import initialize as ds_initialize
    out = []
    for module_cls, spec, make in ((DSPipelineModule, deepspeed.pipe.LayerSpec, ds_initialize),
                                   (dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize)):
        net = module_cls(layers=[spec(nn.Linear, 1, 1, bias=False), spec(nn.Linear, 1, 1, bias=False)],
                         num_stages=2, loss_fn=nn.MSELoss())
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(1.0)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "steps_per_print": 10**9}
        engine, _, _, _ = make(model=net, config=config, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                               model_parameters=net.parameters())
        data = iter([(torch.ones(1, 1), torch.zeros(1, 1))] * 2)
        loss = engine.train_batch(data_iter=data).item()
        out.append((loss, [p.item() for p in net.parameters()]))
    return out


class Embed(nn.Module):
    """(ids, mask) -> (hidden, mask, positions): a float tensor that needs grad,
    a bool mask and an integer tensor that needs none."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)

    def forward(self, inputs):
        ids, mask = inputs
        positions = torch.arange(ids.shape[1], dtype=torch.int64, device=ids.device).expand_as(ids).contiguous()
        return self.emb(ids), mask, positions


class MaskedBlock(nn.Module):

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, inputs):
        hidden, mask, positions = inputs
        update = torch.tanh(self.lin(hidden)) * mask.unsqueeze(-1) + 0.01 * positions.unsqueeze(-1)
        return hidden + update, mask, positions


class Head(nn.Module):

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, inputs):
        hidden, mask, _ = inputs
        return self.lin((hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True))


def transformer_specs(spec):
    return [spec(Embed), spec(MaskedBlock), spec(MaskedBlock), spec(MaskedBlock), spec(Head)]


def token_batches(seed, count, micro_batch=2, length=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 32, (micro_batch, length), generator=g)
        mask = torch.rand(micro_batch, length, generator=g) > 0.3
        mask[:, 0] = True
        out.append(((ids, mask), torch.randint(0, 3, (micro_batch, ), generator=g)))
    return out


def tied_specs(spec, tied):
    return [tied("shared", nn.Linear, 8, 8, bias=False), nn.Tanh(), spec(nn.Linear, 8, 8), nn.ReLU(),
            spec(nn.Linear, 8, 8), tied("shared", nn.Linear, 8, 8, bias=False)]


class TokenAndPositionEmbedding(nn.Module):
    """Megatron-DeepSpeed's EmbeddingPipe in small: the first stage adds word
    and position embeddings; the last stage reuses only the word embedding as
    its output head, so its copy of the position embedding gets no gradient
    (DeepSpeed's gradient all-reduce gives it a zero one, and weight decay
    then moves it)."""

    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(32, 8)
        self.position = nn.Embedding(5, 8)

    def forward(self, ids):
        return self.word(ids) + self.position(torch.arange(ids.shape[1]))


def logits_from_the_tied_embedding(embedding, hidden):
    return hidden @ embedding.word.weight.t()


def token_cross_entropy(logits, labels):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def tied_unused_specs(spec, tied):
    return [tied("embed", TokenAndPositionEmbedding, tied_weight_attr="word.weight"), spec(nn.Linear, 8, 8),
            nn.Tanh(), spec(nn.Linear, 8, 8),
            tied("embed", TokenAndPositionEmbedding, forward_fn=logits_from_the_tied_embedding,
                 tied_weight_attr="word.weight")]


def token_sequences(seed, count, micro_batch=2, length=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 32, (micro_batch, length), generator=g),
             torch.randint(0, 32, (micro_batch, length), generator=g)) for _ in range(count)]


def train_model_both(rank, world_size, model, num_stages, steps=20, micro_batches=4, extra_config=None,
                     module_kwargs=None, ours_module_kwargs=None):
    """`model`: 'transformer' (tuple activations with bool and int tensors),
    'tied' (a weight shared by the first and last stage) or 'tied_unused' (a
    tied module whose other weights the last stage never uses, trained with
    AdamW's weight decay). `extra_config` goes
    to both engines (DeepSpeed's ignores a "pipeline": {"schedule"}),
    `module_kwargs` to both modules, `ours_module_kwargs` to ours only."""
    from deepspeed import initialize as ds_initialize
    results = []
    for module_cls, spec, tied, make in (
        (DSPipelineModule, deepspeed.pipe.LayerSpec, deepspeed.pipe.TiedLayerSpec, ds_initialize),
        (dpe.PipelineModule, dpe.LayerSpec, dpe.TiedLayerSpec, dpe_engine.initialize)):
        torch.manual_seed(11)
        kwargs = dict(module_kwargs or {})
        if module_cls is dpe.PipelineModule:
            kwargs.update(ours_module_kwargs or {})
        if model == "transformer":
            net = module_cls(layers=transformer_specs(spec), num_stages=num_stages, loss_fn=nn.CrossEntropyLoss(),
                             partition_method="uniform", **kwargs)
            data_for = lambda seed, n: token_batches(seed, n)
        elif model == "tied_unused":
            net = module_cls(layers=tied_unused_specs(spec, tied), num_stages=num_stages,
                             loss_fn=token_cross_entropy, partition_method="uniform", **kwargs)
            data_for = lambda seed, n: token_sequences(seed, n)
        else:
            net = module_cls(layers=tied_specs(spec, tied), num_stages=num_stages, loss_fn=nn.MSELoss(),
                             partition_method="uniform", **kwargs)
            data_for = lambda seed, n: [(x[:, :8], y.repeat(1, 2)) for x, y in batches(seed, n)]
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": micro_batches,
                  "steps_per_print": 10**9, **(extra_config or {})}
        optimizer = (torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.1) if model == "tied_unused" else
                     torch.optim.Adam(net.parameters(), lr=0.01))
        engine, _, _, _ = make(model=net, config=config, optimizer=optimizer, model_parameters=net.parameters())
        data = iter(data_for(100 + engine.grid.data_parallel_id, micro_batches) * steps)
        losses = [engine.train_batch(data_iter=data).item() for _ in range(steps)]
        evals = engine.eval_batch(iter(data_for(5, micro_batches)), return_logits=True)
        weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
        results.append((losses, weights, evals))
    return results[0], results[1]


def peer_never_answers(rank, world_size, die):
    """Rank 1 builds its engine, then never trains (or exits): rank 0's
    train_batch must fail within the p2p timeout, naming itself and the peer."""
    import os
    import time
    torch.manual_seed(0)
    net = dpe.PipelineModule(layers=mlp_specs(dpe.LayerSpec), num_stages=2, loss_fn=nn.MSELoss())
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**9,
              "pipeline": {"p2p_timeout": 3}}
    engine, _, _, _ = dpe_engine.initialize(model=net, config=config, model_parameters=net.parameters(),
                                            optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    if rank == 1:
        if die:
            os._exit(0)
        time.sleep(10)
        return None
    start = time.monotonic()
    try:
        engine.train_batch(data_iter=iter(batches(0, 4)))
    except RuntimeError as err:
        return str(err), time.monotonic() - start
    return "no error", time.monotonic() - start


def engine_errors(rank, world_size):
    """Bad configurations and calls end in clear errors on every rank."""
    def attempt(config, **module_kw):
        torch.manual_seed(0)
        net = dpe.PipelineModule(layers=mlp_specs(dpe.LayerSpec), num_stages=2, loss_fn=nn.MSELoss(), **module_kw)
        try:
            engine, _, _, _ = dpe_engine.initialize(model=net, config=config, model_parameters=net.parameters(),
                                                    optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return engine

    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**9,
            "pipeline": {"p2p_timeout": 20}}
    out = {
        "zero2": attempt({**base, "zero_optimization": {"stage": 2}}),
        "fp16": attempt({**base, "fp16": {"enabled": True}}),
        "schedule": attempt({**base, "pipeline": {"schedule": "interleaved-1f1b", "p2p_timeout": 20}}),
        "zb_zero1": attempt({**base, "pipeline": {"schedule": "zb-h1"}, "zero_optimization": {"stage": 1},
                             "zero_allow_untested_optimizer": True}),
        "zb_bf16": attempt({**base, "pipeline": {"schedule": "zb-h1"}, "bf16": {"enabled": True}}),
        "batch_size": attempt({**base, "train_batch_size": 6}),
    }
    engine = attempt(base)
    for name in ("forward", "backward", "step"):
        try:
            getattr(engine, name)(torch.zeros(1))
            out[name] = None
        except Exception as err:
            out[name] = f"{type(err).__name__}: {err}"
    # set_batch_fn post-processes every loaded batch (here: doubles the targets).
    seen = []
    engine.set_batch_fn(lambda batch: (seen.append(1), (batch[0], batch[1] * 2))[1])
    engine.train_batch(data_iter=iter(batches(0, 2)))
    out["batch_fn_calls"] = len(seen)
    # A user's forward hook on the module still runs (the plain path calls
    # module.forward directly only while DeepSpeed's own hooks are the only ones).
    hook_calls = []
    handle = engine.module.register_forward_hook(lambda module, inputs, output: hook_calls.append(1))
    engine.train_batch(data_iter=iter(batches(0, 2)))
    handle.remove()
    out["user_hook_calls"] = len(hook_calls)
    engine.train_batch(data_iter=iter(batches(0, 2)))  # the hook gone: the direct path again
    out["engine_children"] = ",".join(name for name, _ in engine.named_children())
    from deepspeed_pipe_ext import schedule
    out["timeline"] = ",".join(f"{schedule.OP_NAMES[code]}:{mb}" for _, _, code, mb, _ in engine.last_timeline)
    out["buffer_usage"] = dict(engine.last_buffer_usage)
    # steps_per_print: rank 0 prints DeepSpeed's progress line.
    import contextlib
    import io
    printing = attempt({**base, "steps_per_print": 1})
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        printing.train_batch(data_iter=iter(batches(0, 2)))
    out["progress"] = captured.getvalue()
    # Without data: every rank fails at once (here both lack it), and the engine then refuses.
    no_data = attempt(base)
    for name in ("no_data", "after_no_data"):
        out[name] = None
        try:
            no_data.train_batch()
        except Exception as err:
            out[name] = f"{type(err).__name__}: {err}"
    return {k: (v if isinstance(v, (str, int, dict)) or v is None else "engine") for k, v in out.items()}


class DropoutBlock(MaskedBlock):
    """MaskedBlock with dropout: checkpointing must replay the same masks."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, inputs):
        hidden, mask, positions = inputs
        update = self.drop(torch.tanh(self.lin(hidden))) * mask.unsqueeze(-1) + 0.01 * positions.unsqueeze(-1)
        return hidden + update, mask, positions


def train_checkpointed(rank, world_size, model, num_stages, interval, reentrant, schedule="1f1b", steps=20,
                       micro_batches=4):
    """DeepSpeed's engine with activation checkpointing, ours with it, and ours
    without it, on a model with dropout. Halfway through, set_checkpoint_interval
    changes the interval (on all three, so the runs stay comparable). Ours run
    `schedule` (DeepSpeed's engine ignores the key and runs its 1F1B)."""
    from deepspeed import initialize as ds_initialize
    runs = ((DSPipelineModule, deepspeed.pipe.LayerSpec, ds_initialize, interval),
            (dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, interval),
            (dpe.PipelineModule, dpe.LayerSpec, dpe_engine.initialize, 0))
    results = []
    for module_cls, spec, make, run_interval in runs:
        torch.manual_seed(21)
        if model == "dropout_mlp":
            layers = [spec(nn.Linear, 8, 16), spec(nn.Dropout, 0.2), nn.ReLU(), spec(nn.Linear, 16, 16),
                      spec(nn.Dropout, 0.2), nn.Tanh(), spec(nn.Linear, 16, 16), nn.ReLU(), spec(nn.Linear, 16, 4)]
            net = module_cls(layers=layers, num_stages=num_stages, loss_fn=nn.MSELoss())
            data_for = batches
        else:
            layers = [spec(Embed), spec(DropoutBlock), spec(DropoutBlock), spec(DropoutBlock), spec(Head)]
            # Only the blocks: with reentrant checkpointing a checkpointed embedding would get no gradient.
            net = module_cls(layers=layers, num_stages=num_stages, loss_fn=nn.CrossEntropyLoss(),
                             partition_method="uniform", checkpointable_layers=["DropoutBlock"])
            data_for = token_batches
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": micro_batches,
                  "steps_per_print": 10**9,
                  "pipeline": {"activation_checkpoint_interval": run_interval, "use_reentrant": reentrant,
                               "schedule": schedule}}
        engine, _, _, _ = make(model=net, config=config, optimizer=torch.optim.Adam(net.parameters(), lr=0.01),
                               model_parameters=net.parameters())
        torch.manual_seed(1000 + rank)  # dropout masks differ per rank, the same in every run
        data = iter(data_for(100 + engine.grid.data_parallel_id, micro_batches) * steps)
        losses = []
        for step in range(steps):
            if step == steps // 2 and run_interval > 0:
                net.set_checkpoint_interval(run_interval + 1)
            losses.append(engine.train_batch(data_iter=data).item())
        evals = engine.eval_batch(iter(data_for(5, micro_batches)), return_logits=True)
        weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
        results.append((losses, weights, evals))
    return tuple(results)


class SquarePair(nn.Module):
    """x -> (x, x * x): the multiplication keeps x itself for its backward, so
    the sent output x must keep its storage."""

    def forward(self, x):
        return x, x * x


class Combine(nn.Module):

    def forward(self, inputs):
        a, b = inputs
        return a + 0.1 * b


def released_outputs(rank, world_size):
    """Ours with sent outputs released and kept (losses, weights, the activation
    bytes the stage held at its fullest), and DeepSpeed's engine against ours
    on a stage whose output is also saved by its own graph."""
    from deepspeed import initialize as ds_initialize
    out = {}
    for release in (True, False):
        torch.manual_seed(3)
        net = dpe.PipelineModule(layers=mlp_specs(dpe.LayerSpec), num_stages=2, loss_fn=nn.MSELoss())
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**9,
                  "pipeline": {"deallocate_outputs": release}}
        engine, _, _, _ = dpe_engine.initialize(model=net, config=config, model_parameters=net.parameters(),
                                                optimizer=torch.optim.SGD(net.parameters(), lr=0.05))
        data = iter(batches(9, 4) * 3)
        losses = [engine.train_batch(data_iter=data).item() for _ in range(3)]
        out[release] = (losses, [p.detach().clone() for p in net.parameters()],
                        engine.last_buffer_usage["peak_activation_bytes"])
    results = []
    for module_cls, make in ((DSPipelineModule, ds_initialize), (dpe.PipelineModule, dpe_engine.initialize)):
        torch.manual_seed(4)
        layers = [nn.Linear(8, 8), SquarePair(), Combine(), nn.Linear(8, 4)]
        net = module_cls(layers=layers, num_stages=2, loss_fn=nn.MSELoss(), partition_method="uniform")
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**9}
        engine, _, _, _ = make(model=net, config=config, model_parameters=net.parameters(),
                               optimizer=torch.optim.SGD(net.parameters(), lr=0.05))
        data = iter(batches(10, 4) * 3)
        results.append([engine.train_batch(data_iter=data).item() for _ in range(3)])
    out["saved_output"] = results
    return out


def fp16_both(rank, world_size, num_stages, fp16_configs, steps=6):
    """DeepSpeed's engine and ours with fp16 (DeepSpeed's loss scaler), for
    each (fp16 config, label scale): losses, weights, skipped steps and the
    final loss scale (larger labels, larger gradients: overflows).
    DeepSpeed refuses fp16 where its accelerator reports no fp16 support (this
    CPU); the half-precision arithmetic itself runs on the CPU, so both engines
    are told it is supported (until this function returns: it may share its
    processes with other cases)."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    previous = vars(accelerator).get("is_fp16_supported")  # None: the class's method
    accelerator.is_fp16_supported = lambda: True
    try:
        return _fp16_runs(fp16_configs, num_stages, steps)
    finally:
        if previous is None:
            del accelerator.is_fp16_supported
        else:
            accelerator.is_fp16_supported = previous


def _fp16_runs(fp16_configs, num_stages, steps):
    from deepspeed import initialize as ds_initialize
    out = []
    for fp16, label_scale in fp16_configs:
        runs = []
        for module_cls, spec, make in ((DSPipelineModule, deepspeed.pipe.LayerSpec, ds_initialize),
                                       (dpe.PipelineModule, dpe.LayerSpec, ds_initialize)):
            torch.manual_seed(3)
            net = module_cls(layers=mlp_specs(spec), num_stages=num_stages, loss_fn=nn.MSELoss())
            config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                      "steps_per_print": 10**9, "fp16": fp16}
            engine, _, _, _ = make(model=net, config=config, model_parameters=net.parameters(),
                                   optimizer=torch.optim.SGD(net.parameters(), lr=0.5))  # updates fp16 can see
            half = [(x.half(), (label_scale * y).half()) for x, y in batches(100 + engine.grid.data_parallel_id, 4)]
            data = iter(half * steps)
            losses = [engine.train_batch(data_iter=data).item() for _ in range(steps)]
            weights = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
            runs.append((type(engine).__module__, losses, weights, engine.skipped_steps,
                         float(engine.optimizer.loss_scale_config.cur_scale)))
        out.append(runs)
    return out


def profiled_pass_names(rank, world_size):
    """Names torch.profiler records for one train_batch of ours at S=2."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(3)
    net = dpe.PipelineModule(layers=mlp_specs(dpe.LayerSpec), num_stages=2, loss_fn=nn.MSELoss())
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**9}
    engine, _, _, _ = dpe_engine.initialize(model=net, config=config, model_parameters=net.parameters(),
                                            optimizer=torch.optim.SGD(net.parameters(), lr=0.05))
    data = iter(batches(1, 2) * 2)
    engine.train_batch(data_iter=data)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.train_batch(data_iter=data)
    return sorted({e.name for e in prof.events() if e.name.startswith("pipe stage")})


class Detach(nn.Module):
    """Passes its input on for the first 4 micro-batches (one good batch), then detaches it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x if self.calls <= 4 else x.detach()


class ReturnsNone(Detach):
    """Passes its input on for the first 4 micro-batches, then returns None."""

    def forward(self, x):
        self.calls += 1
        return x if self.calls <= 4 else None


def failed_batches(rank, world_size):
    import time
    """What a failing batch leaves behind, on each rank: the error it raised
    (type, message, notes), whether the weights moved, and what the next
    train_batch says. Also p2p_timeout validation."""
    out = {"timeouts": {}}
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**9}
    for value in (float("inf"), float("nan"), 0, -1, 1e16, "soon"):
        net = dpe.PipelineModule(layers=mlp_specs(dpe.LayerSpec), num_stages=2, loss_fn=nn.MSELoss())
        try:
            dpe_engine.initialize(model=net, config={**base, "pipeline": {"p2p_timeout": value}},
                                  model_parameters=net.parameters(),
                                  optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
            out["timeouts"][str(value)] = "accepted"
        except ValueError as err:
            out["timeouts"][str(value)] = str(err)

    def attempt(layers, data, name, stall_loss_broadcast=False):
        torch.manual_seed(2)
        net = dpe.PipelineModule(layers=layers, num_stages=2, loss_fn=nn.MSELoss(), partition_method="uniform")
        engine, _, _, _ = dpe_engine.initialize(model=net, config={**base, "pipeline": {"p2p_timeout": 3}},
                                                model_parameters=net.parameters(),
                                                optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        engine.train_batch(data_iter=iter(batches(1, 4)))  # one good batch first
        before = [p.detach().clone() for p in net.parameters()]
        result = {}
        if stall_loss_broadcast and rank == 1:  # the last stage never joins the loss broadcast
            def stall():
                time.sleep(6)
                raise RuntimeError("stalled before the loss broadcast")
            engine._aggregate_total_loss = stall
        start = time.monotonic()
        try:
            engine.train_batch(data_iter=iter(data))
            result["error"] = None
        except BaseException as err:
            result["error"] = (type(err).__name__, str(err), list(getattr(err, "__notes__", [])))
        result["seconds"] = time.monotonic() - start
        result["weights_unchanged"] = all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
        try:
            engine.train_batch(data_iter=iter(batches(1, 4)))
            result["next"] = None
        except BaseException as err:
            result["next"] = (type(err).__name__, str(err))
        out[name] = result

    linear = lambda: [nn.Linear(8, 8), nn.Linear(8, 4)]
    attempt(linear(), batches(1, 3), "exhausted")  # 3 micro-batches for 4: StopIteration mid-batch
    attempt([nn.Linear(8, 8), Detach(), nn.Linear(8, 8), nn.Linear(8, 4)], batches(1, 4), "detached")
    attempt([nn.Linear(8, 8), ReturnsNone(), nn.Linear(8, 8), nn.Linear(8, 4)], batches(1, 4), "none")
    attempt(linear(), batches(1, 4), "stalled", stall_loss_broadcast=True)  # last: it may leave the group broken
    return out


def set_schedule_cases(rank, world_size):
    """engine.set_schedule: a built-in order as a ComputeOrder gives that
    schedule's losses; an order for another micro-batch count, an unknown
    name and a deadlocking order are refused."""
    import torch.nn as nn

    from deepspeed_pipe_ext import schedule
    out = {}

    def engine():
        torch.manual_seed(3)
        net = dpe.PipelineModule(layers=mlp_specs(dpe.LayerSpec), num_stages=2, loss_fn=nn.MSELoss())
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**9}
        eng, _, _, _ = dpe_engine.initialize(model=net, config=config, model_parameters=net.parameters(),
                                      optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        return eng

    losses = []
    for chosen in ("zb-h1", schedule.ComputeOrder.builtin("zb-h1", 4, 2)):
        eng = engine()
        eng.set_schedule(chosen)
        losses.append([eng.train_batch(data_iter=iter(batches(5 + s, 4))).item() for s in range(3)])
    out["losses_equal"] = losses[0] == losses[1]
    for name, chosen in (("wrong_size", schedule.ComputeOrder.builtin("gpipe", 3, 2)), ("unknown", "2f2b"),
                         ("deadlock", schedule.ComputeOrder([["0F0", "0B0", "0F1", "0B1", "0F2", "0B2", "0F3", "0B3"],
                                                             ["1F1", "1B1", "1F0", "1B0", "1F2", "1B2", "1F3",
                                                              "1B3"]]))):
        eng = engine()
        try:
            eng.set_schedule(chosen)
            eng.train_batch(data_iter=iter(batches(5, 4)))
            out[name] = None
        except Exception as err:
            out[name] = f"{type(err).__name__}: {err}"
    return out


class GPipeInDeepSpeedInstructions(deepspeed.runtime.pipe.schedule.PipeSchedule):
    """A user's schedule written as DeepSpeed's tutorial describes: a
    PipeSchedule subclass yielding DeepSpeed's instructions (every forward,
    then every backward)."""

    def steps(self):
        from deepspeed.runtime.pipe import schedule as ds
        for mb in range(self.micro_batches):
            cmds = [ds.LoadMicroBatch(mb)] if self.is_first_stage or self.is_last_stage else []
            if not self.is_first_stage:
                cmds.append(ds.RecvActivation(mb))
            cmds.append(ds.ForwardPass(mb))
            if not self.is_last_stage:
                cmds.append(ds.SendActivation(mb))
            yield cmds
        for mb in range(self.micro_batches):
            cmds = [] if self.is_last_stage else [ds.RecvGrad(mb)]
            cmds.append(ds.BackwardPass(mb))
            if not self.is_first_stage:
                cmds.append(ds.SendGrad(mb))
            yield cmds
        yield [ds.ReduceTiedGrads(), ds.ReduceGrads(), ds.OptimizerStep()]

    def num_pipe_buffers(self):
        return self.micro_batches


def train_with_a_pipe_schedule_class(rank, world_size, num_stages, steps=20, micro_batches=4, seed=3):
    """DeepSpeed's engine (its 1F1B) against ours running
    GPipeInDeepSpeedInstructions through engine.set_schedule; and our compute passes."""
    from deepspeed import initialize as ds_initialize

    def ours_with_schedule(**kwargs):
        made = ds_initialize(**kwargs)
        made[0].set_schedule(GPipeInDeepSpeedInstructions)
        return made

    theirs = _train(DSPipelineModule, deepspeed.pipe.LayerSpec, ds_initialize, num_stages, steps, micro_batches, seed)
    ours = _train(dpe.PipelineModule, dpe.LayerSpec, ours_with_schedule, num_stages, steps, micro_batches, seed)
    return theirs[:3], ours[:3], ours[4]


def deep_mlp_specs(spec, depth=8):
    layers = [spec(nn.Linear, 8, 8)]
    for _ in range(depth - 2):
        layers += [spec(nn.Linear, 8, 8), nn.Tanh()]
    return layers + [spec(nn.Linear, 8, 4)]


def train_interleaved(rank, world_size, num_stages, chunks, steps=10, micro_batches=4, seed=3, extra_config=None,
                      record=False, schedule="interleaved-1f1b", layout=None):
    """DeepSpeed's engine (1F1B over num_stages stages) against ours with
    `chunks` model chunks per rank under interleaved-1f1b (or zb-v, chunks in
    a V); per-layer seeds make the two layouts start from the same weights.
    Returns each engine's losses, eval loss and this rank's weights (by layer
    number), and our engine's compute passes."""
    from deepspeed import initialize as ds_initialize
    out = []
    for kind in ("deepspeed", "ours"):
        torch.manual_seed(seed)
        if kind == "deepspeed":
            net = DSPipelineModule(layers=deep_mlp_specs(deepspeed.pipe.LayerSpec), num_stages=num_stages,
                                   loss_fn=nn.MSELoss(), seed_layers=True, partition_method="uniform")
            pipeline = {}
        else:
            layout = layout or dpe.schedule.ScheduleKind.parse(schedule).layout.config_name
            net = dpe.PipelineModule(layers=deep_mlp_specs(dpe.LayerSpec), num_stages=num_stages,
                                     virtual_stages=chunks, loss_fn=nn.MSELoss(), seed_layers=True,
                                     partition_method="uniform", virtual_layout=layout)
            pipeline = {"schedule": schedule}
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": micro_batches,
                  "steps_per_print": 10**9, "pipeline": pipeline, **(extra_config or {})}
        engine, _, _, _ = ds_initialize(model=net, config=config, model_parameters=net.parameters(),
                                        optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
        if record and kind == "ours":  # every transfer on one tag: gloo matches in issue order, as NCCL does
            engine.p2p.set_single_tag(True)
            engine.p2p.set_recording(True)
        dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32
        cast = lambda data: [(x.to(dtype), y.to(dtype)) for x, y in data]
        data = cast(batches(100 + engine.grid.data_parallel_id, micro_batches))
        losses = [engine.train_batch(data_iter=iter(data)).item() for _ in range(steps)]
        from deepspeed_pipe_ext.schedule import OPS  # the last train batch's passes
        passes = [f"{OPS[code].letter}{mb}.{chunk}" for _, _, code, mb, chunk in getattr(engine, "last_timeline", [])]
        evals = engine.eval_batch(iter(cast(batches(7, micro_batches)))).item()
        weights = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
        out.append({"losses": losses, "eval": evals, "weights": weights, "passes": passes,
                    "partition": net.describe_partition() if kind == "ours" else None,
                    "trace": list(engine.p2p.trace) if record and kind == "ours" else None,
                    "pipe": (engine.grid.data_parallel_id, engine.stage_id)})
    return out


def virtual_stage_mismatches(rank, world_size):
    """What each mismatch between virtual stages and the schedule says."""
    from deepspeed import initialize as ds_initialize
    out = {}

    def attempt(name, make):
        try:
            make()
            out[name] = None
        except Exception as err:
            out[name] = f"{type(err).__name__}: {err}"

    def engine(chunks, schedule, layout="interleaved"):
        net = dpe.PipelineModule(layers=deep_mlp_specs(dpe.LayerSpec), num_stages=2, virtual_stages=chunks,
                                 loss_fn=nn.MSELoss(), virtual_layout=layout)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                  "steps_per_print": 10**9, "pipeline": {"schedule": schedule}}
        return ds_initialize(model=net, config=config, model_parameters=net.parameters(),
                             optimizer=torch.optim.SGD(net.parameters(), lr=0.1))[0]

    attempt("chunks_with_1f1b", lambda: engine(2, "1f1b"))
    attempt("interleaved_without_chunks", lambda: engine(1, "interleaved-1f1b"))
    attempt("v_layout_three_chunks", lambda: dpe.PipelineModule(layers=deep_mlp_specs(dpe.LayerSpec), num_stages=2,
                                                                virtual_stages=3, virtual_layout="v"))
    attempt("zb_v_on_interleaved", lambda: engine(2, "zb-v"))
    attempt("interleaved_on_v", lambda: engine(2, "interleaved-1f1b", "v"))
    attempt("v_with_gpipe", lambda: engine(2, "gpipe", "v"))
    ok = engine(2, "interleaved-1f1b")
    attempt("set_schedule", lambda: ok.set_schedule("gpipe"))
    out["partition"] = ok.module.describe_partition()
    # Compute orders must name the module's chunks, in its layout.
    import tempfile

    from deepspeed_pipe_ext import schedule as dpe_schedule
    folder = tempfile.mkdtemp()
    orders = {"one": dpe_schedule.ComputeOrder.builtin("1f1b", 4, 2),
              "zbv": dpe_schedule.ComputeOrder.builtin("zb-v", 4, 2, 2)}
    for name, order in orders.items():
        with open(os.path.join(folder, f"{name}.csv"), "w") as f:
            f.write(order.to_csv())
    attempt("one_chunk_order_on_v", lambda: engine(2, os.path.join(folder, "one.csv"), "v"))
    attempt("v_order_on_interleaved", lambda: engine(2, os.path.join(folder, "zbv.csv")))
    v = engine(2, "zb-v", "v")
    out["v_partition"] = v.module.describe_partition()
    attempt("v_set_interleaved", lambda: v.set_schedule("interleaved-1f1b"))
    return out


def eval_with_contiguous_checkpointing(rank, world_size, checkpoints=3, micro_batches=4):
    """DeepSpeed's activation checkpointing configured with partitioned,
    contiguous buffers for `checkpoints` checkpoints (as DeepSpeed's own
    TestPipeModuleSequential does): evaluation runs forwards with no backward
    to empty the buffers, so an engine must reset them after each forward.
    DeepSpeed's module on DeepSpeed's engine, then on ours; eval losses."""
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
    results = []
    for adopt in (False, True):
        dpe.run_deepspeed_pipelines_on_this_engine(adopt)
        try:
            torch.manual_seed(5)
            spec = deepspeed.pipe.LayerSpec  # every checkpointed input has one shape, as contiguous buffers need
            layers = [spec(nn.Linear, 8, 8), nn.Tanh(), spec(nn.Linear, 8, 8), nn.ReLU(), spec(nn.Linear, 8, 8),
                      nn.Tanh(), spec(nn.Linear, 8, 4)]
            net = DSPipelineModule(layers=layers, num_stages=2, loss_fn=nn.MSELoss(), activation_checkpoint_interval=1)
            config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": micro_batches,
                      "steps_per_print": 10**9}
            engine, _, _, _ = deepspeed.initialize(model=net, config=config, model_parameters=net.parameters(),
                                                   optimizer=torch.optim.SGD(net.parameters(), lr=0.05))
            ds_checkpointing.configure(None, deepspeed_config=engine.config, partition_activations=True,
                                       contiguous_checkpointing=True, num_checkpoints=checkpoints)
            # More forwards than checkpoints: without a reset after each, the buffers overrun.
            evals = [engine.eval_batch(iter(batches(7 + i, micro_batches))).item() for i in range(2)]
            results.append((type(engine).__module__, evals))
        finally:
            dpe.run_deepspeed_pipelines_on_this_engine(False)
            ds_checkpointing.configure(None, partition_activations=False, contiguous_checkpointing=False)
    return results
