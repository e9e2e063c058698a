"""Real placement on a local two-node Ray cluster that declares GPUs it does not have: Ray
schedules logical resources, so distinct GPU ids and node spreading are checked without a GPU."""
import sys
import time

import pytest
import ray
import ray.cloudpickle
from ray.cluster_utils import Cluster

from grpo_ray.cluster.group import MemberRestarted
from grpo_ray.cluster.placement import place_actors
from grpo_ray.cluster.plan import PlacementError
from grpo_ray.config import load_config
from grpo_ray.faults import ActorLostError


class Probe:
    """Stands where the learner, an engine or a reward worker would stand, and says where;
    as a learner it says when it was made and loaded (`LearnerWorker`'s deferred load)."""

    def __init__(self, *args, defer_load=False):
        self.args, self.made, self.loaded = args, time.time(), None
        if not defer_load:
            self.load()

    def load(self):
        self.loaded = time.time()
        return 0.25

    def where(self):
        return ray.get_runtime_context().get_node_id(), tuple(ray.get_gpu_ids())

    def when(self):
        return self.made, self.loaded


class SlowEngine(Probe):
    pause = 1.5  # a vLLM engine's start, in short

    def __init__(self, *args):
        time.sleep(self.pause)
        super().__init__(*args)


class VerySlowEngine(SlowEngine):
    pause = 60.0


class LearnerWithoutItsBackend(Probe):
    def __init__(self, *args, defer_load=False):
        raise ImportError("learner.backend=unsloth: cannot import unsloth (No module named "
                          "'unsloth')")


# test modules are not importable on Ray's workers: ship this one's classes by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def two_nodes():
    ray.shutdown()  # the session's local Ray, if a module before this one started it
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def cfg(*overrides):
    base = ["learner.num_cpus=0.25", "rollout.cpus_per_engine=0.25", "reward.num_workers=2",
            "reward.cpus_per_worker=0.25", "cluster.placement_timeout_s=20"]
    return load_config("configs/tiny-cpu.yaml", base + list(overrides))


def test_learner_and_engines_get_distinct_gpus_across_nodes(two_nodes):
    c = cfg("rollout.num_engines=3", "rollout.prompts_per_step=3", "learner.num_gpus=1")
    actors = place_actors(c, Probe, (), Probe, [(i,) for i in range(3)])
    try:
        assert actors.plan.layout == "dedicated"
        where = ray.get([a.where.remote() for a in [actors.learner.actor, *actors.engines.engines]])
        gpus = [(node, gpu) for node, ids in where for gpu in ids]
        assert all(len(ids) == 1 for _, ids in where)          # one GPU each
        assert len(set(gpus)) == 4                              # no GPU shared
        assert len({node for node, _ in where}) == 2            # 4 GPUs need both nodes
        assert len(actors.reward_workers) == 2
    finally:
        actors.shutdown()


def test_colocated_learner_and_engine_share_one_gpu(two_nodes):
    c = cfg("cluster.colocate=true", "learner.num_gpus=0.5")
    actors = place_actors(c, Probe, (), Probe, [(0,)])
    try:
        (n1, g1), (n2, g2) = ray.get([actors.learner.actor.where.remote(),
                                      actors.engines.engines[0].where.remote()])
        assert (n1, g1) == (n2, g2) and len(g1) == 1
    finally:
        actors.shutdown()

def wait_dead(actor, bound_s: float = 30) -> None:
    """Until a killed actor is gone: `ray.kill` is asynchronous, and a call submitted at once may
    still reach the old process and succeed."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=bound_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the killed actor still answers after {bound_s:g} s")


def test_a_shared_gpus_learner_imports_beside_the_engines_and_loads_after_them(two_nodes):
    # without rollout.kv_cache_gb each engine sizes its KV cache from the memory it sees free
    c = cfg("cluster.colocate=true", "learner.num_gpus=0.5", "rollout.num_engines=2",
            "rollout.prompts_per_step=2")
    actors = place_actors(c, Probe, (), SlowEngine, [(0,), (1,)])
    try:
        (made, loaded), *engines = ray.get([a.when.remote() for a in
                                            [actors.learner.actor, *actors.engines.engines]])
        last_engine_up = max(up for up, _ in engines)
        assert made < last_engine_up < loaded  # made while they started, loaded once all were up
        parts = actors.startup
        assert parts["learner_after_engines"] == 1.0 and parts["learner_s"] == 0.25, parts
        assert 0 < parts["learner_imports_s"] < parts["engines_s"], parts
        ray.kill(actors.learner.actor)  # lost: its replacement loads at once, the engines up
        wait_dead(actors.learner.actor)
        with pytest.raises(MemberRestarted):
            actors.learner.call("a call", "when")
        assert actors.learner.call("a call", "when")[1] is not None
    finally:
        actors.shutdown()


def test_the_learners_import_error_ends_the_start_at_once_and_frees_the_gpu(two_nodes):
    c = cfg("cluster.colocate=true", "learner.num_gpus=0.5")
    start = time.monotonic()
    with pytest.raises(Exception, match="cannot import unsloth"):
        place_actors(c, LearnerWithoutItsBackend, (), VerySlowEngine, [(0,)])
    assert time.monotonic() - start < 30  # not after the engine's 60 s start
    # its placement group went with the error: a start that needs all 4 GPUs gets them
    c = cfg("rollout.num_engines=3", "rollout.prompts_per_step=3", "learner.num_gpus=1")
    place_actors(c, Probe, (), Probe, [(i,) for i in range(3)]).shutdown()


def test_a_constructor_that_hangs_ends_the_start_after_its_deadline_and_frees_the_gpus(two_nodes):
    """Every start-up wait has a deadline (`cluster.restart_timeout_s`): an engine whose
    constructor never returns is named, and its placement group goes with the error."""
    c = cfg("cluster.restart_timeout_s=5", "learner.num_gpus=1")
    start = time.monotonic()
    with pytest.raises(ActorLostError, match=r"^rollout engine 0: not started within "
                                             r"cluster.restart_timeout_s \(hung at start-up"):
        place_actors(c, Probe, (), VerySlowEngine, [(0,)])
    assert time.monotonic() - start < 30
    c = cfg("rollout.num_engines=3", "rollout.prompts_per_step=3", "learner.num_gpus=1")
    place_actors(c, Probe, (), Probe, [(i,) for i in range(3)]).shutdown()


def test_unsatisfiable_placement_is_refused_at_once(two_nodes):
    c = cfg("rollout.num_engines=4", "rollout.prompts_per_step=4", "learner.num_gpus=1")
    with pytest.raises(PlacementError, match="5 GPU in all, the cluster has 4 CPU, 4 GPU on 2 node"):
        place_actors(c, Probe, (), Probe, [(i,) for i in range(4)])


def test_gpu_asked_of_a_cluster_without_gpus_is_refused():
    from grpo_ray.cluster.plan import check_fits, plan_placement

    plan = plan_placement(cfg("learner.num_gpus=1"), use_gpu=True)
    with pytest.raises(PlacementError, match="cannot place"):
        check_fits(plan, [{"CPU": 2}])
