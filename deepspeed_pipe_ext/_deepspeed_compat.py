"""The private names of torch (and DeepSpeed) this package relies on, in one
place: an upgrade that removes one fails here, by name, and
tests/test_compat.py checks that each still exists in the installed version."""
import torch.distributed as dist
from torch.distributed import distributed_c10d

# (module, attribute) for every private name used below.
PRIVATE_NAMES = (
    (distributed_c10d, "_get_default_store"),
    (distributed_c10d, "_set_pg_timeout"),
)


def default_store():
    """The rendezvous store the default process group was created with
    (a c10d Store every process of the job shares)."""
    return distributed_c10d._get_default_store()


def set_group_timeout(group, timeout):
    """Sets how long collectives on `group` (a c10d ProcessGroup) wait before
    failing; `timeout` is a datetime.timedelta."""
    if group is None or group == dist.GroupMember.NON_GROUP_MEMBER:
        return
    distributed_c10d._set_pg_timeout(timeout, group)
