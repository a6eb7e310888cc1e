"""PartitionConfig's nested and score_loss fields: defaults, accepted values, and one-line errors naming the field."""

import pytest

from pad_moe.config import PartitionConfig, load_config


def test_defaults_follow_the_paper():
    cfg = PartitionConfig()
    assert cfg.nested is True and cfg.score_loss == "task"
    loaded = load_config(None, ["partition.score_loss=task+aux", "partition.nested=false"])
    assert loaded.partition.score_loss == "task+aux" and loaded.partition.nested is False


@pytest.mark.parametrize("build", [lambda: PartitionConfig(score_loss="aux"),
                                   lambda: load_config(None, ["partition.score_loss=aux"])], ids=["direct", "override"])
def test_bad_score_loss_is_refused_naming_the_field(build):
    with pytest.raises(ValueError, match=r"partition\.score_loss='aux' is not allowed; choose one of task, task\+aux"
                       ) as err:
        build()
    assert "\n" not in str(err.value)


def test_bad_nested_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="partition.nested='maybe' is not true/false"):
        load_config(None, ["partition.nested=maybe"])
