"""The test instrumentation refuses to patch what is not there (so a rename fails the tests that
depend on it instead of silently checking nothing)."""

import pytest

from abdist.engine import trainer
from abdist.methods.autobalance import AutoBalance
from abdist.methods.erm import ERM
from tests.patching import replace


class Target:
    def hook(self):
        return "original"


def test_replace_returns_the_original_and_installs_the_new():
    original = replace(Target, "hook", lambda self: "new")
    try:
        assert Target().hook() == "new" and original(Target()) == "original"
    finally:
        replace(Target, "hook", original)


def test_replace_refuses_a_missing_name():
    with pytest.raises(AttributeError, match="has no 'hooks' to replace"):
        replace(Target, "hooks", lambda self: None)
    assert not hasattr(Target, "hooks")


@pytest.mark.parametrize(
    "owner,name",
    [(AutoBalance, "hyper_step"), (AutoBalance, "sample_batches"), (AutoBalance, "after_step"),
     (ERM, "after_step"), (trainer, "evaluate"), (trainer, "loss_through")],
)  # fmt: skip
def test_what_dist_helper_patches_exists(owner, name):
    assert callable(getattr(owner, name))
