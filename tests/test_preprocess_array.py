"""Tokenizing across nodes (phi4.data.array): `phi4-data preprocess --tasks N --submit` on the
two-node test SLURM cluster runs an array of preprocess tasks on both nodes, one shard each, then
the manifest job; the shards read in order hold exactly the ids a one-process run of the same files
writes, and training reads the manifest as the source. A rerun skips done shards; an unfinished
one stops the manifest by its task number."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, gpt_samples
from phi4.data.array import read_input_list, task_groups
from phi4.errors import ConfigError

PHI4_DATA = Path(sys.executable).parent / "phi4-data"
TASKS = 4  # the two nodes' four CPUs: every task runs at once, on both nodes


def test_the_inputs_split_into_contiguous_groups_of_about_equal_bytes():
    assert task_groups([10] * 6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    assert task_groups([100, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]  # none empty
    assert task_groups([1, 1, 1, 100], 2) == [range(0, 3), range(3, 4)]
    assert task_groups([5, 0, 0], 1) == [range(0, 3)]
    groups = task_groups([7, 3, 9, 1, 4, 4, 8, 2, 6, 5] * 10, 7)
    assert [i for g in groups for i in g] == list(range(100)) and all(groups)
    sizes = [sum(([7, 3, 9, 1, 4, 4, 8, 2, 6, 5] * 10)[i] for i in g) for g in groups]
    assert max(sizes) - min(sizes) <= 9  # within one file's size of each other
    with pytest.raises(ConfigError, match=r"^--tasks=4 is more than the 3 input files; give at most 3$"):
        task_groups([1, 2, 3], 4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Seven JSONL files of different sizes (one gzip-compressed), listed in a file."""
    import gzip

    from phi4.data.synth import write_synthetic_jsonl

    root = tmp_path_factory.mktemp("array")
    files = []
    for i, count in enumerate([120, 40, 200, 60, 90, 30, 150]):
        path = root / "in" / f"part{i}.jsonl"
        path.parent.mkdir(exist_ok=True)
        write_synthetic_jsonl(path, count, seed=10 + i)
        if i == 3:
            Path(f"{path}.gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
            path = Path(f"{path}.gz")
        files.append(path)
    listed = root / "inputs.txt"
    listed.write_text("# the corpus, in order\n" + "".join(f"in/{p.name}\n" for p in files))
    assert read_input_list(listed) == files  # relative to the list's directory
    return root, listed, files


@pytest.fixture(scope="module")
def array_run(two_node_cluster, corpus):
    cluster = two_node_cluster
    root, listed, _ = corpus
    settings = yaml.safe_load((ROOT / "conf/cluster/local_cpu.yaml").read_text())
    settings["python"] = sys.executable
    cluster_file = root / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(settings))
    prefix = root / "out" / "web"
    out = subprocess.run([str(PHI4_DATA), "preprocess", "--input-list", str(listed), "--output-prefix", str(prefix),
                          "--tasks", str(TASKS), "--submit", "--cluster", str(cluster_file)],
                         env={**cluster.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    array_id, manifest_id = out.stdout.split()[2], out.stdout.split("manifest job ")[1].split()[0]
    # the manifest job runs after every task (afterok); a pending array is one record until it starts
    states = cluster.wait([manifest_id], timeout=300, poll=0.5)
    tasks = [j for j in cluster.jobs() if j.fields.get("ArrayJobId") == array_id]
    states.update(cluster.wait([j.job_id for j in tasks], timeout=60))
    logs = {p.name: p.read_text()[-2000:] for p in (root / "out" / "logs").glob("*.out")}
    return dict(prefix=prefix, states=states, logs=logs, cluster=cluster, tasks=tasks)


def test_an_array_on_two_nodes_writes_the_shards_of_a_one_process_run(array_run, corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from phi4.data.preprocess import preprocess
    from phi4.data.shards import ShardedDocuments, shard_prefixes

    assert set(array_run["states"].values()) == {"COMPLETED"}, (array_run["states"], array_run["logs"])
    assert len(array_run["tasks"]) == TASKS
    nodes = {node for job in array_run["tasks"]
             for node in array_run["cluster"].run(["scontrol", "show", "hostnames", job.fields["NodeList"]],
                                                  check=True).stdout.split()}
    assert nodes == {"n1", "n2"}, [job.fields["NodeList"] for job in array_run["tasks"]]

    prefix = array_run["prefix"]
    manifest = json.loads(Path(f"{prefix}.manifest.json").read_text())
    assert [s["prefix"] for s in manifest["shards"]] == [f"web_{t:05d}" for t in range(TASKS)]
    _, _, files = corpus
    assert [i for s in manifest["shards"] for i in s["inputs"]] == [str(p.resolve()) for p in files]
    preprocess(files, tmp_path / "one", workers=1, progress=False)
    one = IndexedDataset(str(tmp_path / "one"))
    shards = ShardedDocuments(shard_prefixes(f"{prefix}.manifest.json", "data.sources.web.path"), "web")
    assert len(shards) == len(one) == manifest["documents"]
    assert all(shards.get(i).tolist() == one[i].tolist() for i in range(len(one)))
    assert manifest["tokens"] == int(one.sequence_lengths.sum())
    # a training source named by the manifest: the samples of the one-process prefix
    from phi4.settings import Source

    by_manifest = gpt_samples([Source(name="web", path=f"{prefix}.manifest.json", weight=1.0)], tmp_path / "a")
    assert by_manifest == gpt_samples([Source(name="web", path=str(tmp_path / "one"), weight=1.0)], tmp_path / "b")


def test_a_rerun_skips_done_shards_and_the_manifest_names_an_unfinished_one(array_run, corpus, capsys, monkeypatch):
    from phi4.cli.data import main

    prefix, (_, listed, _) = array_run["prefix"], corpus
    args = ["--input-list", str(listed), "--output-prefix", str(prefix), "--tasks", str(TASKS)]
    main(["preprocess", *args, "--task", "1", "--no-progress"])  # done, same inputs: nothing tokenized
    assert capsys.readouterr().out.startswith(f"task 1 of {TASKS}: {prefix}_00001.bin/.idx already done for the "
                                              f"same inputs: skipped (")

    Path(f"{prefix}_00002.done.json").unlink()  # as if task 2 had been killed before it finished
    with pytest.raises(SystemExit) as stop:
        main(["manifest", "--output-prefix", str(prefix)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"phi4-data: error: 1 of the {TASKS} shards of {prefix} are not done (tasks 2); rerun them "
        f"(sbatch --array=2 ..., or phi4-data preprocess ... --task N): done shards are skipped")
    main(["preprocess", *args, "--task", "2", "--no-progress", "--workers", "1"])  # its rerun makes it again
    assert capsys.readouterr().out.startswith(f"task 2 of {TASKS}: wrote {prefix}_00002.bin/.idx (")
    main(["manifest", "--output-prefix", str(prefix)])
    assert capsys.readouterr().out.startswith(f"wrote {prefix}.manifest.json: {TASKS} shards, ")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)

    for bad, message in ((["--task", "0"], "--task goes with --tasks N (the array's size)"),
                         (["--tasks", "9", "--task", "0"], "--tasks=9 is more than the 7 input files; give at most 7"),
                         (["--tasks", "2", "--task", "2"], "--task=2: valid 0-1 (--tasks=2)"),
                         (["--tasks", "2"], "--tasks without --task: give --task I, or run it as a task of a "
                                            "SLURM array (SLURM_ARRAY_TASK_ID is not set)")):
        with pytest.raises(SystemExit) as stop:
            main(["preprocess", "--input-list", str(listed), "--output-prefix", str(prefix.parent / "x"), *bad])
        assert stop.value.code == 2 and capsys.readouterr().err.strip() == f"phi4-data: error: {message}"
    assert not list(prefix.parent.glob("x*"))
