"""Hostile tar members: a 3 GiB (sparse) member in a 10 KB shard is skipped from its header
without being read, and a member repeated inside one sample skips the sample; both counted."""
import io
import json
import subprocess
import sys
import tarfile

import pytest

from data.demo_scenes import LABEL_DIM
from data.loader import StreamReader
from data.shards import write_manifest, write_shard
from tests.bad_input_data import IMG_DIM, good_samples
from tests.conftest import REPO, subprocess_env
from tests.loader_util import spec_for, tokenizer

SPARSE_SIZE = 3 << 30


def append_sparse_sample(shard, work, key: str = "huge-0") -> None:
    """Append `<key>.json` and a 3 GiB sparse `<key>.npz` to `shard` with GNU tar (a few KB on disk)."""
    work.mkdir(exist_ok=True)
    (work / f"{key}.json").write_text(json.dumps({"image_id": "huge", "caption": "a red cube"}))
    with open(work / f"{key}.npz", "wb") as f:
        f.truncate(SPARSE_SIZE)
    subprocess.run(["tar", "--sparse", "-rf", str(shard), "-C", str(work), f"{key}.json", f"{key}.npz"],
                   check=True)


@pytest.fixture
def sparse_shards(tmp_path):
    if subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout.find("GNU tar") < 0:
        pytest.skip("needs GNU tar to write a sparse member")
    normal, huge = tmp_path / "normal" / "shard-000000.tar", tmp_path / "huge" / "shard-000000.tar"
    write_shard(normal, good_samples(6))
    write_shard(huge, good_samples(6))
    append_sparse_sample(huge, tmp_path / "work")
    assert huge.stat().st_size < 64 << 10
    for shard, count in ((normal, 6), (huge, 7)):
        write_manifest(shard.parent, [shard], {"img_dim": IMG_DIM, "label_dim": LABEL_DIM}, counts=[count])
    return normal, huge


def read_all(directory):
    reader = StreamReader(spec_for(directory, batch_size=2, shuffle_buffer=0, epochs=1), tokenizer(), 0)
    keys = [s.key for _, _, samples, _ in reader.batches() for s in samples]
    return keys, reader.take_counts()[0]


def test_huge_member_is_skipped_and_counted(sparse_shards):
    _, huge = sparse_shards
    keys, skipped = read_all(huge.parent)
    assert len(keys) == 6 and "huge-0" not in keys
    assert skipped == {"member_too_large": 1}


PEAK_RSS = """
import sys
from data.shards import iter_shard
from tests.adversarial.conftest import own_peak_rss_kb
n = sum(1 for _ in iter_shard(sys.argv[1]))
print(n, own_peak_rss_kb())
"""


def peak_rss_kb(shard) -> tuple[int, int]:
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(shard)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, rss = proc.stdout.split()
    return int(n), int(rss)


def test_huge_member_is_never_read_into_memory(sparse_shards):
    normal, huge = sparse_shards
    n_normal, rss_normal = peak_rss_kb(normal)
    n_huge, rss_huge = peak_rss_kb(huge)
    assert (n_normal, n_huge) == (6, 7)  # the huge sample is still yielded, marked to be skipped
    print(f"peak RSS reading a shard: normal {rss_normal} KB, with a 3 GiB sparse member {rss_huge} KB "
          f"(x{rss_huge / rss_normal:.2f})")
    assert rss_huge <= 1.5 * rss_normal, (rss_normal, rss_huge)


def test_repeated_member_skips_its_sample(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    write_shard(shard, good_samples(4))
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    second_json = members[2][0]  # members go json, npz per sample: sample 1's json
    assert second_json.name.endswith(".json")
    forged = json.dumps({"image_id": "other", "caption": "a forged caption"}).encode()
    with tarfile.open(shard, "w") as tar:  # sample 1's json twice: the second would silently win
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
            if m.name == second_json.name:
                info = tarfile.TarInfo(m.name)
                info.size = len(forged)
                tar.addfile(info, io.BytesIO(forged))
    write_manifest(tmp_path, [shard], {"img_dim": IMG_DIM, "label_dim": LABEL_DIM}, counts=[4])
    keys, skipped = read_all(tmp_path)
    assert len(keys) == 3 and second_json.name.split(".")[0] not in keys
    assert skipped == {"duplicate_member": 1}
