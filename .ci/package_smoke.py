"""Run from outside the repository with an installed deepspeed_pipe_ext (a
wheel or an sdist): import it from site-packages and train one step of a
2-stage pipeline on 2 processes over gloo. Used by `make package-check`."""
import os
import socket
import sys

import torch
import torch.multiprocessing as mp


def train_one_step(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    import deepspeed
    import torch.nn as nn

    import deepspeed_pipe_ext as dpe
    from deepspeed_pipe_ext.engine import PipelineEngine
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    net = dpe.PipelineModule(layers=[dpe.LayerSpec(nn.Linear, 8, 16), nn.ReLU(), dpe.LayerSpec(nn.Linear, 16, 4)],
                             num_stages=2, loss_fn=nn.MSELoss())
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                           optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                           config={"train_micro_batch_size_per_gpu": 2,
                                                   "gradient_accumulation_steps": 2, "steps_per_print": 10**9})
    assert type(engine) is PipelineEngine, type(engine)
    before = [p.detach().clone() for p in net.parameters()]
    loss = engine.train_batch(data_iter=iter([(torch.randn(2, 8), torch.randn(2, 4))] * 2))
    moved = any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert torch.isfinite(loss) and moved, (loss, moved)
    if rank == 0:
        print(f"deepspeed_pipe_ext {dpe.__version__} from {os.path.dirname(dpe.__file__)}: "
              f"one 2-stage step, loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    import deepspeed_pipe_ext
    if os.path.abspath(os.getcwd()) == os.path.dirname(os.path.dirname(os.path.abspath(deepspeed_pipe_ext.__file__))):
        sys.exit("run this from outside the repository, so the installed package is imported")
    if "site-packages" not in deepspeed_pipe_ext.__file__:
        sys.exit(f"deepspeed_pipe_ext was imported from {deepspeed_pipe_ext.__file__}, not from an installed package")
    # The typing of the compiled module ships with it (PEP 561).
    installed = os.path.dirname(deepspeed_pipe_ext.__file__)
    missing = [f for f in ("_C.pyi", "py.typed") if not os.path.isfile(os.path.join(installed, f))]
    if missing:
        sys.exit(f"the installed package lacks {missing}")
    from importlib.metadata import version
    if version("deepspeed_pipe_ext") != deepspeed_pipe_ext.__version__:
        sys.exit(f"the package's metadata says {version('deepspeed_pipe_ext')}, "
                 f"the module {deepspeed_pipe_ext.__version__}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(train_one_step, args=(port, ), nprocs=2)
