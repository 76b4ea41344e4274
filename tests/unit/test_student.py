"""The layer-pruned, distilled student encoder (models/student.py) and the eval's hook for it.

One pruned student (no training: these tests check the mechanics, not the quality,
which bench/compression.py measures) is saved and exported once for the module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from freshrec.settings import Settings  # noqa: E402
from models.encoder import DIM, TorchEncoder, load_base_model  # noqa: E402
from models.student import (  # noqa: E402
    DistilConfig,
    DistilReport,
    StudentError,
    distil,
    distil_loss,
    load_student,
    prune_layers,
    save_student,
    student_encoder,
    student_meta,
    teacher_targets,
    torch_student,
)

TITLES = [
    "WHITE HANGING HEART T-LIGHT HOLDER",
    "JUMBO BAG RED RETROSPOT",
    "SET OF 3 CAKE TINS PANTRY DESIGN",
    "PAPER CHAIN KIT 50'S CHRISTMAS",
    "REGENCY CAKESTAND 3 TIER",
    "LUNCH BAG RED RETROSPOT",
    "ASSORTED COLOUR BIRD ORNAMENT",
    "PACK OF 72 RETROSPOT CAKE CASES",
]


@pytest.fixture(scope="module")
def teacher():  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    return load_base_model()


@pytest.fixture(scope="module")
def saved(teacher, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    student = prune_layers(teacher, [0, 2, 4])
    out = tmp_path_factory.mktemp("students") / "l024"
    return save_student(student, out, student_meta([0, 2, 4], DistilConfig(), DistilReport()))


def test_pruned_student_keeps_the_asked_layers_and_the_teachers_width(teacher) -> None:  # type: ignore[no-untyped-def]
    student = prune_layers(teacher, [0, 3, 5])
    assert student.config.num_hidden_layers == 3
    assert len(student.encoder.layer) == 3
    assert student.config.hidden_size == DIM
    assert teacher.config.num_hidden_layers == 6 and len(teacher.encoder.layer) == 6  # teacher untouched
    # student layer 1 is the teacher's layer 3, copied (not shared: training must not move the teacher)
    s_w = student.encoder.layer[1].attention.self.query.weight
    t_w = teacher.encoder.layer[3].attention.self.query.weight
    assert torch.equal(s_w, t_w) and s_w.data_ptr() != t_w.data_ptr()
    assert not torch.equal(s_w, teacher.encoder.layer[1].attention.self.query.weight)
    with pytest.raises(StudentError):
        prune_layers(teacher, [0, 6])
    with pytest.raises(StudentError):
        prune_layers(teacher, [2, 2])


def test_one_distillation_step_lowers_the_loss(teacher) -> None:  # type: ignore[no-untyped-def]
    targets = teacher_targets(teacher, TITLES)
    student = prune_layers(teacher, [0, 2, 4])
    enc = TorchEncoder(model=student)
    target = torch.from_numpy(targets)
    with torch.no_grad():
        before = float(distil_loss(enc, TITLES, target))
    report = distil(student, TITLES, targets, DistilConfig(epochs=1, batch_size=len(TITLES), lr=1e-4), progress=False)
    with torch.no_grad():
        after = float(distil_loss(enc, TITLES, target))
    assert report.steps == 1
    assert before > 0.05  # pruning alone is far from the teacher
    assert after < before - 0.005, (before, after)
    assert not student.training  # left in eval mode


def test_saved_student_loads_back_and_encodes_normalised_384d(saved: Path, teacher) -> None:  # type: ignore[no-untyped-def]
    model = load_student(saved)
    assert model.config.num_hidden_layers == 3
    torch_vecs = torch_student(saved).encode(TITLES)
    assert torch_vecs.shape == (len(TITLES), DIM)
    np.testing.assert_allclose(np.linalg.norm(torch_vecs, axis=1), 1.0, atol=1e-5)
    # the same weights as before saving
    direct = TorchEncoder(model=prune_layers(teacher, [0, 2, 4])).encode(TITLES)
    np.testing.assert_allclose(torch_vecs, direct, atol=1e-5)
    onnx = student_encoder(saved, "int8")
    vecs = onnx.encode(TITLES)
    assert vecs.shape == (len(TITLES), DIM) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert float(np.sum(vecs * torch_vecs, axis=1).min()) > 0.99  # int8 close to its own PyTorch model
    assert onnx.version == "student-l024"


def test_a_folder_that_is_not_a_student_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StudentError, match="not a student folder"):
        load_student(tmp_path)


def test_eval_hook_encodes_with_the_student(saved: Path, tmp_path: Path) -> None:
    from evaluation.item_space import ServingEncoders
    from models.encoder import BASE_VERSION

    settings = Settings(state_dir=tmp_path / "state", encoder_precision="int8", eval_encoder_dir=saved)
    enc = ServingEncoders(settings, tmp_path / "exports").encoder(BASE_VERSION, None)
    assert enc.version == "student-l024"
    np.testing.assert_allclose(enc.encode(TITLES), student_encoder(saved, "int8").encode(TITLES), atol=1e-6)
    # the teacher's export cache (shared with serving) is not written for a student
    assert not (tmp_path / "state" / "exports").exists()


def test_eval_refuses_full_with_a_student(saved: Path, tmp_path: Path) -> None:
    from evaluation.data import build_log
    from evaluation.methods import build_system_methods

    log = build_log("t", [{"user_id": "u", "item_id": "i", "ts": 1.0, "kind": "purchase"}], [])
    settings = Settings(state_dir=tmp_path / "state", eval_encoder_dir=saved)
    with pytest.raises(ValueError, match="not full"):
        build_system_methods(log, settings, 0.0, ["frozen", "full"])
