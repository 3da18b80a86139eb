"""What ALBEF fine-tuning reads from outside the run, made hostile: the weights `finetune.init_from` and
`vlpt evaluate --checkpoint` name (a state-dict file, ALBEF's `{'model': ...}` file, a run's teacher.pt) never
run a planted pickle, and the picture shards VE joins its examples to never lead a read out of their folder
(a symlink member, a manifest naming a shard elsewhere)."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import torch

from data.shards import PIXEL_FORMAT, write_manifest
from data.tasks.features import PictureStore
from tests.adversarial.conftest import RunsCode
from trainer.config_files import ConfigError
from trainer.models.albef_finetune_load import read_albef_weights
from trainer.models.convert_cli import read_teacher


@pytest.mark.parametrize("wrapped", [False, True], ids=["state-dict", "albef-model-entry"])
def test_a_planted_weights_file_is_refused_and_never_runs(tmp_path, wrapped):
    marker = tmp_path / "ran"
    sd = {"visual_encoder.embeddings.patch_embeddings.projection.weight": torch.zeros(2, 3, 16, 16),
          "planted": RunsCode(marker)}
    path = tmp_path / "weights.pt"
    torch.save({"model": sd, "epoch": 3} if wrapped else sd, path)
    with pytest.raises(ConfigError, match="weights.pt"):
        read_albef_weights(str(path), "finetune.init_from", [])
    assert not marker.exists()


def test_a_planted_teacher_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"queues.ptr": torch.zeros((), dtype=torch.long), "planted": RunsCode(marker)},
               tmp_path / "teacher.pt")
    with pytest.raises(ConfigError, match="teacher.pt"):
        read_teacher(tmp_path)
    assert not marker.exists()


def _picture_shard(path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(data[info.name]) if info.name in data else None)


def test_picture_shards_never_lead_a_read_out_of_their_folder(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    folder = tmp_path / "pics"
    folder.mkdir()
    meta = json.dumps({"image_id": "img-a", "captions": ["a red cube"]}).encode()
    json_member = tarfile.TarInfo("s0.json")
    json_member.size = len(meta)
    link = tarfile.TarInfo("s0.png")  # the picture member is a symlink to a file outside the folder
    link.type, link.linkname = tarfile.SYMTYPE, str(secret)
    _picture_shard(folder / "shard-0.tar", [json_member, link], {"s0.json": meta})
    write_manifest(folder, [folder / "shard-0.tar"], {"split": "val"}, [1], fmt=PIXEL_FORMAT, pairs=[1])
    store = PictureStore([str(folder)])
    assert "img-a" not in store and store.get("img-a") == (None, "unknown_image")  # links are never followed

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["path"] = os.path.relpath(tmp_path / "elsewhere.tar", folder)  # ../elsewhere.tar
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="outside"):
        PictureStore([str(folder)])
