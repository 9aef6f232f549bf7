"""Schedule helpers that tests of both tiers use: tests/unit/test_schedule.py
(orders simulated) and tests/distributed/test_virtual_stages.py (orders run)."""


def torch_zbv_rows(stages, micro_batches):
    """torch.distributed.pipelining's ZBV zero-bubble order (its own
    generator, without building pipeline stages), as rows of action tokens."""
    from torch.distributed.pipelining import schedules as torch_schedules
    schedule = object.__new__(torch_schedules.ScheduleZBVZeroBubble)
    schedule.pp_group_size, schedule._n_microbatches, schedule.n_local_stages = stages, micro_batches, 2
    schedule._num_stages = schedule.num_stages = 2 * stages
    schedule.stage_index_to_group_rank = torch_schedules.generate_stage_to_rank_mapping(stages, 2 * stages, style="v")
    return [[str(action) for action in schedule._calculate_single_rank_operations(rank) if action is not None]
            for rank in range(stages)]
