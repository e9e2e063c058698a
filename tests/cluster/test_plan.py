"""Placement: the plan of each layout, the start-up check, and real placement on a local Ray
that declares GPUs it does not have (Ray schedules logical resources)."""
import pytest

from grpo_ray.cluster.plan import PlacementError, check_fits, plan_placement
from grpo_ray.config import load_config


def cfg(*overrides):
    return load_config("configs/tiny-cpu.yaml", list(overrides))


def test_cpu_plan():
    plan = plan_placement(cfg("rollout.num_engines=2"), use_gpu=False)
    assert plan.layout == "cpu"
    assert plan.bundles == [{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert plan.engine_bundles == [1, 2] and plan.learner_bundle == 0
    assert plan.total() == {"CPU": 2.0}  # + 2 reward workers x 0.25


def test_dedicated_plan_gives_each_engine_its_own_gpus():
    plan = plan_placement(cfg("rollout.num_engines=3", "rollout.prompts_per_step=3",
                              "rollout.gpus_per_engine=2", "learner.num_gpus=1"), use_gpu=True)
    assert plan.layout == "dedicated"
    assert [b["GPU"] for b in plan.bundles] == [1, 2, 2, 2]
    assert plan.total()["GPU"] == 7


def test_colocated_plan_shares_one_gpu():
    plan = plan_placement(cfg("cluster.colocate=true", "learner.num_gpus=0.4"), use_gpu=True)
    assert plan.layout == "colocated" and len(plan.bundles) == 1
    assert plan.bundles[0]["GPU"] == 1.0
    assert plan.learner["GPU"] + plan.engine["GPU"] == pytest.approx(1.0)
    assert plan.engine_bundles == [0] and plan.learner_bundle == 0


def test_colocated_plan_puts_every_engine_on_the_shared_gpu():
    plan = plan_placement(cfg("cluster.colocate=true", "learner.num_gpus=0.4",
                              "rollout.num_engines=2", "rollout.prompts_per_step=2"), use_gpu=True)
    assert len(plan.bundles) == 1 and plan.engine_bundles == [0, 0]
    assert plan.learner["GPU"] + 2 * plan.engine["GPU"] == pytest.approx(1.0)
    assert plan.bundles[0]["CPU"] == pytest.approx(plan.learner["CPU"] + 2 * plan.engine["CPU"])


def test_check_fits_refuses_too_few_gpus_with_what_is_missing():
    plan = plan_placement(cfg("rollout.num_engines=2", "learner.num_gpus=1"), use_gpu=True)
    with pytest.raises(PlacementError) as e:
        check_fits(plan, [{"CPU": 16, "GPU": 2}])
    msg = str(e.value)
    assert "3 GPU in all" in msg and "the cluster has 16 CPU, 2 GPU" in msg
    assert "cluster.colocate=true" in msg


def test_check_fits_needs_a_bundle_on_one_node():
    # 2 GPUs in all, but one engine needs 2 GPUs on one node (tensor parallel)
    plan = plan_placement(cfg("rollout.gpus_per_engine=2", "learner.num_gpus=1"), use_gpu=True)
    with pytest.raises(PlacementError, match="rollout engine 0"):
        check_fits(plan, [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}])
    check_fits(plan, [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 2}])


def test_check_fits_spreads_engines_over_nodes():
    plan = plan_placement(cfg("rollout.num_engines=4", "rollout.prompts_per_step=4"), use_gpu=True)
    where = check_fits(plan, [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 1}])
    # the learner and 4 engines, a GPU each: every node is used, none beyond its GPUs
    assert sorted(where) == [0, 0, 1, 1, 2] and plan.labels[0] == "learner"


def test_check_fits_counts_reward_workers():
    plan = plan_placement(cfg("reward.num_workers=8"), use_gpu=False)
    with pytest.raises(PlacementError, match="reward workers"):
        check_fits(plan, [{"CPU": 2}])
