"""The pieces of multi-node support that need no second node: content-keyed model copies, AWS keys
set aside when joining, pool sizing, and a pool larger than the cluster that still finishes."""

import os

import pytest

from mmdist import ray_runtime, ray_work


def test_a_model_rewritten_in_place_gets_a_fresh_copy_not_the_cached_one(bucket, tmp_path, monkeypatch):
    """finetune --overwrite on s3:// must not leave nodes sampling the old weights."""
    import s3fs
    from helpers import tiny_dit

    from mmdist.model_folders import local_folder
    from mmdist.models import diffusion

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # this "node's" cache
    fs = s3fs.S3FileSystem()
    uri = f"{bucket}/run/finetune/model_ema"
    fs.put(tiny_dit(str(tmp_path / "a"), seed=0), uri.removeprefix("s3://"), recursive=True)
    first = local_folder(uri)
    assert local_folder(uri) == first  # unchanged content: the same copy, no download
    fs.rm(uri.removeprefix("s3://"), recursive=True)
    fs.put(tiny_dit(str(tmp_path / "b"), seed=1), uri.removeprefix("s3://"), recursive=True)
    second = local_folder(uri)
    assert second != first
    new = diffusion.load_dit(second).state_dict()
    want = diffusion.load_dit(str(tmp_path / "b")).state_dict()
    assert all((new[k] == want[k]).all() for k in want)


def test_a_folder_without_config_is_refused(bucket):
    import s3fs

    from mmdist.errors import ArtifactError
    from mmdist.model_folders import local_folder

    s3fs.S3FileSystem().pipe(f"{bucket.removeprefix('s3://')}/empty/weights.bin", b"x")
    with pytest.raises(ArtifactError, match="no config.json"):
        local_folder(f"{bucket}/empty")


def test_aws_keys_are_set_aside_when_joining_a_cluster(monkeypatch, caplog):
    for k in ray_runtime.AWS_KEYS:
        monkeypatch.setenv(k, f"value-of-{k}")
    monkeypatch.setenv("AWS_PROFILE", "kept")
    removed = ray_runtime.set_aside_aws_keys("10.0.0.1:6379")
    assert removed == list(ray_runtime.AWS_KEYS)
    assert not any(k in os.environ for k in ray_runtime.AWS_KEYS) and os.environ["AWS_PROFILE"] == "kept"
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "AWS_SESSION_TOKEN" in message and "instance role" in message
    assert not any(f"value-of-{k}" in message for k in ray_runtime.AWS_KEYS)


def test_a_laptop_is_sized_from_its_cpus(ray_cluster):
    assert ray_runtime.laptop_cpus() == 2.0  # one node, no autoscaler
    assert ray_runtime.actor_pool(0, 5, 0.0) == (2, 2, 0.75)  # one actor per CPU, room for data tasks
    assert ray_runtime.actor_pool(3, 2, 0.0)[:2] == (2, 2)  # configured, capped by the work
    assert ray_runtime.worker_cpus(None, 2) == 0.5 and ray_runtime.worker_cpus(1.5, 2) == 1.5
    assert ray_runtime.trial_cpus(None, 6) == 0.5


def test_a_pool_larger_than_the_cluster_still_finishes(ray_cluster):
    """Four 1-CPU actors on a 2-CPU cluster: two start, the work goes to them, nothing waits forever."""
    import ray

    @ray.remote(num_cpus=1)
    class Square:
        def run(self, x):
            return x * x, ray.get_runtime_context().get_actor_id()

    actors = [Square.options(scheduling_strategy="DEFAULT").remote() for _ in range(4)]
    try:
        results = list(ray_work.elastic_map(actors, lambda a, x: a.run.remote(x), list(range(10))))
    finally:
        for a in actors:
            ray.kill(a)
    assert sorted(r for r, _ in results) == [x * x for x in range(10)]
    assert len({actor for _, actor in results}) <= 2  # only the actors that fit did any work


def test_an_item_whose_actor_died_mid_task_is_done_again(ray_cluster, tmp_path):
    """Ray retries no task here (max_task_retries=0), as when its own retries ran out while the
    actor was restarting on another node: the item goes back in the queue and the restarted actor
    does it."""
    import ray

    flag = str(tmp_path / "died-once")

    @ray.remote(num_cpus=0.25, max_restarts=1, max_task_retries=0)
    class Fragile:
        def run(self, x):
            if x == 3 and not os.path.exists(flag):
                open(flag, "w").close()
                os._exit(1)  # the process goes, as with a lost node
            return x * x

    actors = [Fragile.options(scheduling_strategy="DEFAULT").remote()]
    try:
        results = list(ray_work.elastic_map(actors, lambda a, x: a.run.remote(x), list(range(6))))
    finally:
        for a in actors:
            ray.kill(a)
    assert os.path.exists(flag)  # the actor did die mid-task
    assert sorted(results) == [x * x for x in range(6)]
