"""Student Parallelism: the fused StudentGroup against the plain per-student reference; files; the distillation."""

import json

import pytest
import torch

from chorus.backends.students import (ReferenceStudentGroup, SharedEmbeddings, Student, StudentConfig, StudentFiles,
                                      StudentGroup, read_students, save_students, stack_students, unstack_students)
from chorus.errors import InvalidInput, TaskFileError
from tests.unit import tiny

VOCAB, C = 50, 32


def embeddings(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return SharedEmbeddings(torch.randn(VOCAB, C, generator=g, dtype=dtype), torch.randn(64, C, generator=g, dtype=dtype),
                            torch.randn(2, C, generator=g, dtype=dtype), 1 + 0.1 * torch.randn(C, generator=g, dtype=dtype),
                            0.1 * torch.randn(C, generator=g, dtype=dtype), 1e-12)


def random_students(K, layers=2, labels=3, seed=0):
    cfg = StudentConfig(num_students=K, num_layers=layers, hidden_size=C, num_heads=4, intermediate_size=48,
                        num_labels=labels, dropout=0.0)
    torch.manual_seed(seed)
    students = [Student(cfg).eval() for _ in range(K)]
    with torch.no_grad():  # LayerNorms away from the identity, so a mixed-up gamma/beta shows
        for s in students:
            for name, p in s.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
    return cfg, students, torch.rand(K, generator=torch.Generator().manual_seed(seed)) + 0.5


def random_batch(B, T, seed):
    return tiny.random_batch(B, T, seed, vocab=VOCAB)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=5e-2, atol=8e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("K,layers", [(1, 1), (3, 2), (4, 1)])
@pytest.mark.parametrize("B,T", [(1, 1), (1, 7), (5, 9), (17, 4)])
def test_fused_matches_reference_every_prefix(dtype, K, layers, B, T):
    cfg, students, alphas = random_students(K, layers, seed=K * 10 + layers)
    emb = embeddings(dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    fused = StudentGroup(cfg, emb, stack_students(students), alphas).to(dtype)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # reference in full precision
    ref = ReferenceStudentGroup(emb, [s.to(ref_dtype) for s in students], alphas).to(ref_dtype)
    ids, mask = random_batch(B, T, seed=B * 100 + T)
    with torch.no_grad():
        per_student = fused.student_logits(ids, mask)
        assert per_student.shape == (K, B, cfg.num_labels), f"expected (K, B, L)={(K, B, 3)}, got {per_student.shape}"
        for k in range(1, K + 1):
            got = fused(ids, mask, k=k)
            want = ref(ids, mask, k=k).to(dtype)
            assert got.dtype == dtype and got.shape == (B, cfg.num_labels)
            torch.testing.assert_close(got, want, **TOL[dtype])


def test_padding_does_not_change_a_row():
    cfg, students, alphas = random_students(3)
    group = StudentGroup(cfg, embeddings(), stack_students(students), alphas).eval()
    ids, mask = random_batch(4, 6, seed=1)
    with torch.no_grad():
        batch = group(ids, mask)
        for i in range(4):
            n = int(mask[i].sum())
            torch.testing.assert_close(batch[i], group(ids[i : i + 1, :n], mask[i : i + 1, :n])[0], rtol=1e-4, atol=1e-5)


def test_prune_to_is_the_prefix():
    cfg, students, alphas = random_students(4)
    group = StudentGroup(cfg, embeddings(), stack_students(students), alphas)
    ids, mask = random_batch(6, 8, seed=2)
    with torch.no_grad():
        for k in (1, 2, 4):
            pruned = group.prune_to(k)
            assert pruned.num_students == k
            torch.testing.assert_close(pruned(ids, mask), group(ids, mask, k=k), rtol=1e-5, atol=1e-6)
    for bad in (0, 5, 1.5):
        with pytest.raises(ValueError, match="prefix of 1..4"):
            group(ids, mask, k=bad)


def test_stack_unstack_round_trip():
    cfg, students, _ = random_students(3)
    tensors = stack_students(students)
    assert tensors["layers.0.query.weight"].shape == (3, C, C)
    for a, b in zip(students, unstack_students(cfg, tensors)):
        for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert na == nb and torch.equal(pa, pb)


def test_files_round_trip(tmp_path):
    cfg, students, alphas = random_students(2)
    emb = embeddings()
    prefixes = [{"k": k, "test_accuracy": 0.5 + k / 10} for k in (1, 2)]
    files = StudentFiles(cfg, ["a", "b", "c"], stack_students(students), alphas,
                         {"backbone": "tiny", "fingerprint": emb.fingerprint()}, prefixes, {"note": "x"})
    save_students(files, tmp_path / "s")
    save_students(files, tmp_path / "s")  # replacing works
    back = read_students(tmp_path / "s")
    assert back.config == cfg and back.labels == ["a", "b", "c"] and back.prefixes == prefixes
    torch.testing.assert_close(back.boosting_weights, alphas)
    ids, mask = random_batch(3, 5, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back.group(emb)(ids, mask), files.group(emb)(ids, mask))
    with pytest.raises(TaskFileError, match="embeddings differ"):
        back.group(embeddings(seed=1))


def test_files_reject_malformed(tmp_path):
    cfg, students, alphas = random_students(2)
    save_students(StudentFiles(cfg, ["a", "b", "c"], stack_students(students), alphas), tmp_path / "s")
    meta_path = tmp_path / "s" / "chorus_students.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "surprise": 1}))
    with pytest.raises(TaskFileError, match="unknown keys \\['surprise'\\]"):
        read_students(tmp_path / "s")
    meta_path.write_text(json.dumps({**meta, "boosting_weights": [1.0]}))
    with pytest.raises(TaskFileError, match="needs 2 \"boosting_weights\""):
        read_students(tmp_path / "s")
    with pytest.raises(TaskFileError, match="is missing"):
        read_students(tmp_path / "nothing")


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(InvalidInput, match="unknown keys \\['depth'\\]"):
        StudentConfig.from_dict({"depth": 2})
    with pytest.raises(InvalidInput, match="not a multiple"):
        StudentConfig(hidden_size=30, num_heads=4)


# ---- distillation -----------------------------------------------------------------------------------------------------
def test_boosting_weight_is_the_shrunk_least_squares_step():
    from chorus.distill import boosting_weight

    g = torch.Generator().manual_seed(0)
    S, R = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
    alpha = boosting_weight(R, S, shrinkage=1.0)
    assert alpha == pytest.approx(float((R * S).sum() / (S * S).sum()), rel=1e-6)
    assert boosting_weight(R, S, shrinkage=2.0) == pytest.approx(alpha / 2)
    # the step minimises ||R - a S||²
    loss = lambda a: float(((R - a * S) ** 2).sum())  # noqa: E731
    assert loss(alpha) <= min(loss(alpha * 0.9), loss(alpha * 1.1))


def test_augmenting_with_an_overlapping_corpus_is_refused():
    from chorus.distill import DistillConfig, distillation_texts

    with pytest.raises(InvalidInput, match="leaks the test set"):
        distillation_texts("rotten_tomatoes", DistillConfig(augment=("vader_movies",)))


def tiny_teacher():
    """A random 3-layer chorus encoder with a head, a word-hash tokenizer: a `Teacher` in a few KB."""
    from chorus.backends.encoder import Encoder, EncoderConfig, init_random
    from chorus.backends.students.reference import additive_mask, mean_pool
    from chorus.distill import Teacher

    cfg = EncoderConfig(vocab_size=VOCAB, hidden_size=C, num_layers=3, num_heads=4, intermediate_size=48,
                        max_positions=64)
    enc = Encoder(cfg)
    init_random(enc, seed=1)
    emb = SharedEmbeddings.from_encoder(enc)
    g = torch.Generator().manual_seed(2)
    head = (torch.randn(2, C, generator=g), torch.zeros(2))

    def forward(ids, mask):
        x = emb(ids)
        m = additive_mask(mask, x.dtype)
        hidden = [x]
        for layer in enc.layers:
            x = layer(x, m, None)
            hidden.append(x)
        return torch.nn.functional.linear(mean_pool(x, mask), *head), hidden

    def tokenize(texts):
        return [[1] + [2 + sum(map(ord, w)) % (VOCAB - 2) for w in t.split()[:20]] for t in texts]

    state = {k: v.detach().clone() for k, v in enc.hf_parameter_map().items()}
    return Teacher(["negative", "positive"], forward, tokenize, emb, cfg, "tiny", "tiny", state, head)


def test_distill_end_to_end_and_resume(tmp_path):
    from chorus.distill import DistillConfig, distill

    teacher = tiny_teacher()
    dcfg = DistillConfig(num_students=1, epochs=1, batch_size=8, augment=(), max_examples=16, perturbations=1)
    one = distill(teacher, "rotten_tomatoes", dcfg, tmp_path / "s", device="cpu", progress=False, cache=tmp_path)
    assert one.files.config.num_students == 1 and len(one.files.prefixes) == 1
    first = read_students(tmp_path / "s").tensors["layers.0.query.weight"][0].clone()
    two = distill(teacher, "rotten_tomatoes", DistillConfig(**{**dcfg.to_dict(), "num_students": 2}), tmp_path / "s",
                  device="cpu", progress=False, cache=tmp_path)
    files = read_students(tmp_path / "s")
    assert files.config.num_students == 2 and [p["k"] for p in files.prefixes] == [1, 2]
    assert torch.equal(files.tensors["layers.0.query.weight"][0], first), "resuming retrained the finished student"
    assert files.boosting_weights[0] == pytest.approx(float(one.files.boosting_weights[0]))
    assert files.prefixes[0]["test_accuracy"] == pytest.approx(one.files.prefixes[0]["test_accuracy"])
    assert two.teacher_test_accuracy == one.teacher_test_accuracy
    # the fused group of what was saved reproduces the recorded prefix accuracies (prefix evaluation == fused path)
    group = files.group(teacher.embeddings)
    assert group.num_students == 2
