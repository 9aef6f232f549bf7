"""A pipeline checkpoint as one state_dict for deployment.

    python -m deepspeed_pipe_ext.export DIR [--tag TAG] [--model-rank R] --output model.pt

reads the per-layer files of DIR/TAG (TAG: the one in DIR/latest by default),
written by DeepSpeed's PipelineEngine or ours, and saves the state_dict of the
equivalent nn.Sequential(*layers): keys "<layer index>.<name>", so
`nn.Sequential(*layers).load_state_dict(torch.load("model.pt"))` works.
"""
import argparse
import sys
from collections.abc import Sequence

import torch

from ._checkpoint_files import CheckpointError, to_sequential_state_dict


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepspeed_pipe_ext.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="the directory given to save_checkpoint")
    parser.add_argument("--tag", help="the checkpoint's tag (default: the one in DIR/latest)")
    parser.add_argument("--model-rank", type=int, help="with tensor-parallel shards: the model rank to take")
    parser.add_argument("--output", required=True, help="where to save the state_dict (torch.save)")
    args = parser.parse_args(argv)
    try:
        state = to_sequential_state_dict(args.checkpoint_dir, tag=args.tag, model_rank=args.model_rank)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    torch.save(state, args.output)
    layers = sorted({int(key.split(".", 1)[0]) for key in state})
    print(f"wrote {len(state)} tensors of layers {', '.join(map(str, layers))} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
