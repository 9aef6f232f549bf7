"""Virtual pipeline stages, in one process: the stage programs of several
model chunks per rank. (Trained on real processes, against DeepSpeed's 1F1B:
tests/distributed/test_virtual_stages.py.)"""


def test_programs_that_hung_under_nccl_rules_with_dynamic_shapes_now_plan():
    """Holding a send back until a receive whose shapes are unknown made
    some interleaved programs with dynamic shapes deadlock under NCCL's rules
    (they were refused); taking that receive's meta first orders them all
    (the core tests check every one up to 8 stages, 4 chunks, 24 micro-batches)."""
    from deepspeed_pipe_ext._native import _C
    program = _C.StageProgram("interleaved-1f1b", 4, 3, 0, True, 2)
    assert program.num_buffers > 0 and program.receives_after_meta > 0
    assert _C.StageProgram("zb-v", 6, 2, 1, True, 2).receives_after_meta > 0
