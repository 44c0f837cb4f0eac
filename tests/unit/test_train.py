"""Training every PET method (and a full fine-tune) through `chorus.train` on real Rotten Tomatoes sentences, with a
tiny random backbone: a few steps each, so these check the mechanics (the loss falls, the PET's own tensors learn,
sparse methods end at their sparsity, the written task serves what was tested), not accuracy."""


import pytest
import torch

from chorus.backends.encoder import Encoder, EncoderConfig
from chorus.backends.engine import Engine
from chorus.backends.task_files import random_task, save_task
from chorus.data import load_dataset
from chorus.errors import InvalidInput
from chorus.train import PET_CHOICES, TrainConfig, accuracy, built_as, lr_factor, train_task
from tests.unit.tiny import write_tiny_bert

# the real vocabulary (the real tokenizer reads the real sentences), everything else tiny
TINY = EncoderConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_positions=128)
PET_TENSOR = {"lora": "lora_B", "bitfit": "bias_delta", "houlsby": "adapter_up", "pfeiffer": "adapter_up",
              "ia3": "ia3_l", "maskbert": "mask_index", "diff_pruning": "diff_value",  # zero (or absent) untrained
              "layer_norm": "LayerNorm.weight"}  # the backbone's untrained (see `moved`)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add waiting, many times over on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), TINY)
    return path


def quick(pet, **kw):
    # MaskBERT: scores start close to the threshold, so a few steps of lr 1e-3 prune some weights
    options = {"epochs": 3, "batch_size": 16, "max_examples": 64, "max_validation_examples": 64, "lora_r": 4,
               "adapter_bottleneck": 8,
               "mask_init_score": 2e-3, "diff_density": 0.02, **kw}
    return TrainConfig(pet=pet, **options)


@pytest.mark.parametrize("steps", [1, 2, 3, 9, 10, 11, 20, 100])
def test_the_schedule_gives_every_step_a_positive_rate_for_any_run_length(steps):
    factors = [lr_factor(i, steps) for i in range(steps)]  # OneCycleLR divided by zero at 10 steps
    assert all(0 < f <= 1 for f in factors)
    assert max(factors) == pytest.approx(1.0, abs=0.1 if steps >= 10 else 0.5)
    assert factors[-1] <= factors[len(factors) // 2]  # decays


@pytest.mark.parametrize("pet", [p for p in PET_CHOICES if p != "full"])
def test_every_method_trains_and_its_file_serves_what_was_tested(pet, backbone, tmp_path):
    result = train_task("t", "rotten_tomatoes", quick(pet), backbone=str(backbone), progress=False)
    assert len(result.train_losses) == 3 and result.train_losses[-1] < result.train_losses[0]
    learned = [moved(backbone, k, t) for k, t in result.spec.tensors.items() if k.endswith(PET_TENSOR[pet])]
    assert learned and any(t.numel() and t.abs().sum() > 0 for t in learned), f"{pet}: its tensors did not learn"
    assert result.trainable_parameters > 0 and result.task_bytes == 4 * result.stored_parameters
    assert result.stored_parameters == sum(t.numel() for t in result.spec.tensors.values())

    save_task(result.spec, tmp_path / "t")
    engine = Engine(backbone, max_length=128)
    engine.load_task("t", tmp_path / "t")
    test = load_dataset("rotten_tomatoes").test
    assert accuracy(engine, "t", engine.tokenize([e.text for e in test]), [e.label for e in test]) == pytest.approx(
        result.test_accuracy, abs=1 / len(test))  # at most one borderline row may flip between code paths


def moved(backbone, key, t):
    """A trained tensor less what it started from: LayerNorms start as the backbone's, the others at zero."""
    if not key.endswith(("LayerNorm.weight", "LayerNorm.bias")):
        return t
    from safetensors.torch import load_file

    return t - load_file(backbone / "model.safetensors")[key]


def test_adapters_can_tune_the_layer_norms_too(backbone, tmp_path):
    """Houlsby et al. train the LayerNorms beside their adapters: `tune_layer_norm` adds the `layer_norm` method."""
    result = train_task("t", "rotten_tomatoes", quick("houlsby", tune_layer_norm=True), backbone=str(backbone),
                        progress=False)
    assert set(result.spec.pet) == {"adapter", "layer_norm"}
    norms = {k: moved(backbone, k, t) for k, t in result.spec.tensors.items() if ".LayerNorm." in k}
    assert len(norms) == 2 * (1 + 2 * TINY.num_layers) and all(t.abs().sum() > 0 for t in norms.values())
    assert any(t.abs().sum() > 0 for k, t in result.spec.tensors.items() if k.endswith("adapter_up"))
    plain = train_task("t", "rotten_tomatoes", quick("houlsby"), backbone=str(backbone), progress=False)
    assert result.trainable_parameters == plain.trainable_parameters + 2 * 32 * (1 + 2 * TINY.num_layers)
    save_task(result.spec, tmp_path / "t")
    engine = Engine(backbone, max_length=128)
    engine.load_task("t", tmp_path / "t")
    test = load_dataset("rotten_tomatoes").test
    assert accuracy(engine, "t", engine.tokenize([e.text for e in test]), [e.label for e in test]) == pytest.approx(
        result.test_accuracy, abs=1 / len(test))
    with pytest.raises(InvalidInput, match="full fine-tune already trains the LayerNorms"):
        quick("full", tune_layer_norm=True)


def test_sparse_methods_end_at_their_sparsity(backbone):
    total = sum(o * i for o, i in TINY.linear_sites().values())
    diff = train_task("t", "rotten_tomatoes", quick("diff_pruning"), backbone=str(backbone), progress=False)
    assert diff.sparsity["weights_changed"] == round(0.02 * total)  # magnitude-pruned, then trained at that mask
    assert len(diff.validation_history) == 3  # 2 dense epochs, 1 fixed-mask epoch
    mask = train_task("t", "rotten_tomatoes", quick("maskbert"), backbone=str(backbone), progress=False)
    assert 0 < mask.sparsity["weights_changed"] < total
    assert not any(k.endswith("mask_score") for k in mask.spec.tensors)  # scores are training state, not served


def test_a_full_fine_tune_trains_the_whole_encoder(backbone):
    result = train_task("t", "rotten_tomatoes", quick("full"), backbone=str(backbone), progress=False)
    encoder = sum(p.numel() for p in Encoder(TINY).parameters())
    assert result.spec is None and result.trainable_parameters == encoder + 2 * 32 + 2
    assert result.train_losses[-1] < result.train_losses[0]


def test_runs_are_seeded(backbone):
    a, b = (train_task("t", "rotten_tomatoes", quick("ia3", epochs=1), backbone=str(backbone), progress=False)
            for _ in range(2))
    assert a.train_losses == b.train_losses and a.test_accuracy == b.test_accuracy
    for k, t in a.spec.tensors.items():
        torch.testing.assert_close(t, b.spec.tensors[k], rtol=0, atol=0)


def test_a_built_default_task_trained_another_way_is_seen_as_stale(tmp_path):
    spec = random_task("t", TINY.hidden_size, TINY.linear_sites(), {"bitfit": {}}, seed=0)
    assert built_as(tmp_path / "t", "t") is None
    spec.meta = {"dataset": "vader_nyt", "train": {"pet": "bitfit", "epochs": 3}}
    save_task(spec, tmp_path / "t")
    assert built_as(tmp_path / "t", "t") == ("vader_nyt", "bitfit", 3)  # build-repository retrains it as pfeiffer
