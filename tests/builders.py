"""MAESTDataModule and MAESTModule for tests that build them directly.

The classes have no defaults of their own for what a config key sets (the config scopes in
``configs/ingredients/`` hold them), so a test passes every argument: these helpers fill in the
ones a test does not care about.
"""

from __future__ import annotations

from configs.ingredients.module import module_config
from helpers.datamodule import MAESTDataModule
from helpers.module import MAESTModule

# Small CPU data: no splits unless given, no worker processes, an epoch of one draw per training
# track with replacement, the other keys as the datamodule config scope sets them.
DATAMODULE_ARGUMENTS = dict(
    groundtruth_train=None, groundtruth_val=None, groundtruth_test=None, batch_size_train=12, batch_size_test=20,
    num_workers=0, epoch_length=None, sampler="balanced", sampler_replacement=True, seed=0, teacher_dir=None,
    teacher_threshold=0.45, test_hop="full", pin_memory=False,
)
# The module config scope's recipe (the released models'), with swa_lr=None: the SWA phase follows
# the lr a test sets.
MODULE_ARGUMENTS = {**module_config(), "swa_lr": None}


def maest_datamodule(**arguments) -> MAESTDataModule:
    """A MAESTDataModule of ``arguments`` (base_dir and clip_length at least), the others DATAMODULE_ARGUMENTS."""
    return MAESTDataModule(**{**DATAMODULE_ARGUMENTS, **arguments})


def maest_module(net, **arguments) -> MAESTModule:
    """A MAESTModule of ``net`` with ``arguments``, the others the module config's recipe (MODULE_ARGUMENTS)."""
    return MAESTModule(net, **{**MODULE_ARGUMENTS, **arguments})


def main_not_interrupted(main, argv):
    """``main(argv)`` of a command; a KeyboardInterrupt escaping it fails the test instead of stopping the
    whole session (Ctrl-C would end in a traceback)."""
    import pytest

    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main(): Ctrl-C would end with a traceback")


def count_loader_iterations(monkeypatch) -> list[int]:
    """Make ``helpers.extract``'s DataLoader note each iteration (its ``num_workers``) in the list returned."""
    import helpers.extract

    iterations: list[int] = []

    class CountingLoader(helpers.extract.DataLoader):
        def __iter__(self):
            iterations.append(self.num_workers)
            return super().__iter__()

    monkeypatch.setattr(helpers.extract, "DataLoader", CountingLoader)
    return iterations
