"""The helper every distributed test uses reports a failing rank."""

import pytest
import torch
import torch.distributed as dist
from gloo_group import GLOO, run_gloo

pytestmark = GLOO


def _fails_on_rank_1(rank, world):
    dist.all_reduce(torch.ones(1))  # the group works
    if rank == 1:
        raise ArithmeticError("injected on rank 1")


def test_a_failing_rank_fails_the_test_with_its_traceback():
    with pytest.raises(Exception, match="injected on rank 1"):
        run_gloo(_fails_on_rank_1, 2, deadline=60, group_timeout=10)
