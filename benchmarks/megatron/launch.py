"""Run an unmodified Megatron-DeepSpeed script on one pipeline engine (one process of a torchrun job).

    launch.py --engine deepspeed|ours --record DIR SCRIPT [SCRIPT ARGS...]

`--engine ours` imports deepspeed_pipe_ext and calls run_deepspeed_pipelines_on_this_engine()
before the script runs; that is the only difference between the two engines' runs. Both record the
engine's class, and the exact (float.hex) training losses, gradient norms and validation losses each
rank sees, to DIR/losses_rank<R>.jsonl, by observing megatron.training.train_step and evaluate
(arguments and return values only, nothing changed).
"""
import argparse
import json
import os
import runpy
import sys


def record(path):
    import megatron.training as training

    def write(kind, **entry):
        with open(path, "a") as out:
            out.write(json.dumps({"kind": kind, **entry}) + "\n")

    train_step, evaluate = training.train_step, training.evaluate

    def observed_train_step(forward_step_func, data_iterator, model, *args, **kwargs):
        if not os.path.exists(path):
            engine = type(model[0])
            write("engine", engine=f"{engine.__module__}.{engine.__qualname__}")
        result = train_step(forward_step_func, data_iterator, model, *args, **kwargs)
        loss_dict, grad_norm = result[0], result[2]
        values = dict(loss_dict, **({} if grad_norm is None else {"grad norm": grad_norm}))
        write("train", **{k: float(v).hex() for k, v in values.items()})
        return result

    def observed_evaluate(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        write("eval", **{k: float(v).hex() for k, v in result[0].items()})
        return result

    training.train_step, training.evaluate = observed_train_step, observed_evaluate


def main():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--engine", choices=["deepspeed", "ours"], required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.engine == "ours":
        import deepspeed_pipe_ext
        deepspeed_pipe_ext.run_deepspeed_pipelines_on_this_engine()
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    record(os.path.join(args.record, f"losses_rank{os.environ.get('RANK', '0')}.jsonl"))
    sys.argv = [args.script] + args.script_args
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
