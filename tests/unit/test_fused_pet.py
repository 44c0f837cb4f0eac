"""The fused PET kernels (`chorus.backends.pet.fused`) against the torch gathered forms they replace and the plain
per-task references: every PET type, mixed LoRA ranks and adapter widths, sparsities from 1% to 50% (and an output
row holding an entry for every input), rows on the null slot, dtypes. They need Triton on a CUDA GPU (marked gpu);
with `TRITON_INTERPRET=1` and Triton installed they also run on the CPU through Triton's interpreter (development).
The CSR bookkeeping the sparse kernel reads is checked everywhere."""

import os

import pytest
import torch

from chorus.backends.engine import build_model
from chorus.backends.pet import GatheredRows, fused
from chorus.backends.reference import reference_logits
from tests.unit.test_pet_methods import PETS, TINY, random_batch, task

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1") or fused._kernels() is None,
    reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def bank_with_every_type(dtype):
    torch.manual_seed(0)
    model = build_model(config=TINY, capacity=2, max_rank=8, dtype=dtype, device=DEVICE)  # grows on the way
    backbone = {k: v.detach().float().cpu().clone() for k, v in model.encoder.hf_parameter_map().items()}
    specs = [task(n, seed=i) for i, n in enumerate(PETS)]
    for spec in specs:
        model.bank.add(spec)
    return model, backbone, specs


def gathered(model, names, ids, mask, enabled):
    """The gathered forward's logits (what CUDA graphs replay) with the fused kernels on or off."""
    rows = model.bank.row_tasks(names)
    rows = GatheredRows(rows.slots, rows.head_slots, model.bank.bank_tensors())
    fused.ENABLED = enabled
    try:
        with torch.inference_mode():
            return model(ids.to(DEVICE), mask.to(DEVICE), rows).float().cpu()
    finally:
        fused.ENABLED = True


@pytest.mark.gpu
@kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,seed", [(1, 4, 0), (13, 9, 1), (40, 33, 2)])
def test_fused_gathered_forward_matches_the_torch_form_and_the_references(dtype, B, T, seed):
    model, backbone, specs = bank_with_every_type(dtype)
    ids, mask = random_batch(B, T, seed)
    g = torch.Generator().manual_seed(seed)
    names = [specs[int(i)].name for i in torch.randint(0, len(specs), (B,), generator=g)]
    got = gathered(model, names, ids, mask, True)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, gathered(model, names, ids, mask, False), rtol=rtol, atol=atol)
    if dtype == torch.float32:
        by_name = {s.name: s for s in specs}
        for i, n in enumerate(names):
            want = reference_logits(TINY, backbone, by_name[n], ids[i : i + 1], mask[i : i + 1])[0]
            torch.testing.assert_close(got[i, :2], want, rtol=1e-4, atol=1e-5, msg=lambda m: f"row {i} ({n}): {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fused._kernels() is None, reason="needs Triton and a CUDA GPU")
def test_overlap_runs_sparse_products_on_a_side_stream_and_matches_the_in_order_forward(monkeypatch):
    """`fused.Overlap` (a layer's query/value/key sparse products launched ahead on a side stream, the key's bias
    dropped and its IA3 scaling moved to the queries) gives the logits of the in-order fused forward, and its sparse
    products at the attention's linears do run off the main stream (and, with `OVERLAP` off, on it)."""
    model, _, specs = bank_with_every_type(torch.float16)
    ids, mask = random_batch(24, 17, 3)
    names = [specs[i % len(specs)].name for i in range(24)]
    streams = []
    launch = fused.sparse_deltas_
    monkeypatch.setattr(fused, "sparse_deltas_", lambda *a, **k: (
        streams.append(torch.cuda.current_stream() != torch.cuda.default_stream()), launch(*a, **k))[1])
    overlapped = gathered(model, names, ids, mask, True)
    assert any(streams), "no sparse product ran on the side stream"  # the attention's; other sites' run in order
    streams.clear()
    monkeypatch.setattr(fused, "OVERLAP", False)
    in_order = gathered(model, names, ids, mask, True)
    assert streams and not any(streams)
    torch.testing.assert_close(overlapped, in_order, rtol=2e-2, atol=2e-2)


def _dense(index, value, out_f, in_f):
    return torch.zeros(out_f * in_f, dtype=torch.float64).index_add(0, index.cpu(), value.double().cpu()).view(
        out_f, in_f)


@pytest.mark.gpu
@kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_fused_op_matches_its_plain_form_and_skips_null_slot_rows_and_padding(dtype):
    """Op by op on random banks, each run on every token and again with ragged row lengths: rows on slot 0
    and tokens past a row's length are left bit for bit as they were (but for the residual, which every token gets);
    the others get their slot's term. The sparse bank holds a skewed slot (one output row with an entry for every
    input, the rest empty); the sparse kernel also runs with each launch option (gathering from x itself or
    transposed, prefetching or not) and on a subset of the rows."""
    g = torch.Generator().manual_seed(0)
    B, T, K, N, C = 6, 19, 40, 24, 4
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    slots = torch.tensor([2, 0, 1, 3, 0, 2], device=DEVICE)
    lengths = torch.tensor([19, 5, 0, 1, 19, 12], dtype=torch.int32)  # row 2 uses a slot but has no tokens
    ragged = lengths.to(DEVICE)
    live = slots.cpu() != 0
    x, y = rand(B, T, K), rand(B, T, N)
    rtol, atol = TOLERANCE[dtype]

    def check(op, want, fresh=False, live=live):
        """`op(lengths)` (None: every token) against `want`, float64 (B, T, N); `live`: the rows it may change."""
        for ragged_rows in (False, True):
            got = op(ragged if ragged_rows else None).cpu()
            touched = live[:, None] & (torch.arange(T)[None, :] < (lengths[:, None] if ragged_rows else T))  # (B, T)
            if not fresh:  # in place: every other element bit for bit as it was
                assert torch.equal(got[~touched], y.cpu()[~touched])
            torch.testing.assert_close(got[touched].double(), want[touched], rtol=rtol, atol=atol)

    vec, scales, up, R = rand(C, N), rand(C, N), rand(C, N, 5), 5  # R: a rank below the kernel's 16-wide block
    down = rand(B, T, R)
    down[slots == 0] = float("nan")  # rows without a low-rank slot: never read (the down-projection leaves them unset)
    s, yd = slots.cpu(), y.double().cpu()
    low = torch.einsum("btr,bnr->btn", down.double().nan_to_num().cpu(), up.double().cpu()[s])
    check(lambda p: fused.epilogue_(y.clone(), bias=(slots, vec), lengths=p), yd + vec.double().cpu()[s][:, None])
    check(lambda p: fused.epilogue_(y.clone(), scale=(slots, vec), lengths=p),
          yd * (1 + vec.double().cpu()[s][:, None]))
    check(lambda p: fused.epilogue_(y.clone(), low_rank=(slots, down, up), lengths=p), yd + low)
    # all three in one pass, each term with its own slots (rows 1 and 4 have none): bias, then low rank, then scale
    low_slots, scale_slots = torch.tensor([1, 0, 0, 2, 0, 3], device=DEVICE), torch.tensor([0, 0, 3, 1, 0, 2],
                                                                                            device=DEVICE)
    down2 = rand(B, T, R)
    down2[low_slots == 0] = float("nan")
    low2 = torch.einsum("btr,bnr->btn", down2.double().nan_to_num().cpu(), up.double().cpu()[low_slots.cpu()])
    check(lambda p: fused.epilogue_(y.clone(), bias=(slots, vec), low_rank=(low_slots, down2, up),
                                    scale=(scale_slots, scales), lengths=p),
          (yd + vec.double().cpu()[s][:, None] + low2) * (1 + scales.double().cpu()[scale_slots.cpu()][:, None]))
    # the feed-forward's pass: bias, gelu on every row (rows on no slot too), then the next linear's input scaling
    gelu_then = torch.nn.functional.gelu(yd + vec.double().cpu()[s][:, None]) * (
        1 + scales.double().cpu()[scale_slots.cpu()][:, None])
    check(lambda p: fused.epilogue_(y.clone(), bias=(slots, vec), activation="gelu", then=(scale_slots, scales),
                                    lengths=p), gelu_then, live=torch.ones(B, dtype=torch.bool))

    # with the sublayer's residual: every token of every row gets it (and the bias); low rank only up to lengths
    residual = rand(B, T, N)
    for p in (None, ragged):
        within = torch.arange(T)[None, :, None] < (T if p is None else lengths[:, None, None])
        want = yd + vec.double().cpu()[s][:, None] + low2 * within + residual.double().cpu()
        got = fused.epilogue_(y.clone(), bias=(slots, vec), low_rank=(low_slots, down2, up), residual=residual,
                              lengths=p).cpu()
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)

    w, scale = rand(C, N, K) * 0.2, rand(C)
    z = torch.einsum("btk,bnk->btn", x.double().cpu(), w.double().cpu()[s]) * scale.double().cpu()[s][:, None, None]
    check(lambda p: fused.gathered_matmul(x, w, slots, scale, lengths=p), z, fresh=True)

    # an adapter (bottleneck M, per-slot activation) with the site's bias term and the residual, in one pass: a new
    # tensor, every element written (rows on no adapter slot and tokens past lengths: y + bias + residual)
    M = 12
    down_w, down_b, up_w, up_b = rand(C, M, N) * 0.3, rand(C, M), rand(C, N, M) * 0.3, rand(C, N)
    gelu = torch.tensor([False, True, False, True], device=DEVICE)
    bias_slots = torch.tensor([1, 3, 0, 2, 0, 1], device=DEVICE)
    bias_bank = vec.clone()
    bias_bank[0] = 0  # a bank's null slot, as every bank keeps it (the kernel adds no down · bias for it)
    zb = yd + bias_bank.double().cpu()[bias_slots.cpu()][:, None]
    h = torch.einsum("btn,bmn->btm", zb, down_w.double().cpu()[s]) + down_b.double().cpu()[s][:, None]
    h = torch.where(gelu.cpu()[s][:, None, None], torch.nn.functional.gelu(h), torch.relu(h))
    delta = torch.einsum("btm,bnm->btn", h, up_w.double().cpu()[s]) + up_b.double().cpu()[s][:, None]
    for p in (None, ragged):
        within = live[:, None, None] & (torch.arange(T)[None, :, None] < (T if p is None else lengths[:, None, None]))
        for res in (None, residual):
            got = fused.adapter_(y, slots, down_w, down_b, up_w, up_b, gelu, bias=(bias_slots, bias_bank),
                                 residual=res, lengths=p).cpu()
            want = zb + delta * within + (0 if res is None else res.double().cpu())
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
        # the adapter's term alone into a delta buffer (the LayerNorm's kernel adds it and the bias): its rows, up to
        # lengths, from z = y + bias
        buffer = fused.adapter_(y, slots, down_w, down_b, up_w, up_b, gelu, bias=(bias_slots, bias_bank), lengths=p,
                                delta=True).cpu()
        h = torch.einsum("btn,bmn->btm", zb, down_w.double().cpu()[s]) + down_b.double().cpu()[s][:, None]
        h = torch.where(gelu.cpu()[s][:, None, None], torch.nn.functional.gelu(h), torch.relu(h))
        term = torch.einsum("btm,bnm->btn", h, up_w.double().cpu()[s]) + up_b.double().cpu()[s][:, None]
        within = within.expand(B, T, N)
        torch.testing.assert_close(buffer.double()[within], term[within], rtol=rtol, atol=atol)

    # LayerNorm, with the residual, the linear's bias term, an adapter's delta (flagged rows) and each row's own
    # affine (a per-task LayerNorm's bank of deltas, slot 0 zeros), or with none: a new tensor, padding zeros
    ln_w, ln_b, d_w, d_b = rand(N), rand(N), rand(C, N), rand(C, N)
    d_w[0], d_b[0] = 0, 0
    for p in (None, ragged):
        within = torch.arange(T)[None, :, None] < (T if p is None else lengths[:, None, None])
        buffer = torch.where(live[:, None, None].to(DEVICE), rand(B, T, N), float("nan"))  # unset off its rows
        for res, tuned, delta, site_bias in ((None, None, None, None), (residual, (slots, d_w, d_b), (slots, buffer),
                                                                        (bias_slots, bias_bank))):
            z = yd if res is None else zb + res.double().cpu() + buffer.double().cpu().nan_to_num()
            norm = torch.nn.functional.layer_norm(z, (N,), eps=1e-5)
            affine = [t.double().cpu() + (0 if tuned is None else d.double().cpu()[s][:, None])
                      for t, d in ((ln_w, d_w), (ln_b, d_b))]
            got = fused.layer_norm(y, ln_w, ln_b, 1e-5, residual=res, tuned=tuned, delta=delta, site_bias=site_bias,
                                   lengths=p).cpu()
            torch.testing.assert_close(got.double(), (norm * affine[0] + affine[1]) * within, rtol=rtol, atol=atol)

    dense = [torch.zeros(N, K, dtype=torch.float64)]  # slot 0: the null slot; slots 1, 2 at 1% and 50%
    for density in (0.01, 0.5):
        dense.append(((torch.rand(N, K, generator=g) < density) * torch.randn(N, K, generator=g)).double())
    skewed = torch.zeros(N, K, dtype=torch.float64)  # slot 3: one output row with an entry for every input
    skewed[5] = torch.randn(K, generator=g)
    dense.append(skewed)
    entries = [torch.nonzero(d.flatten()).flatten() for d in dense]
    most = max(len(e) for e in entries)
    index = torch.zeros(C, most, dtype=torch.long)
    value = torch.zeros(C, most, dtype=dtype)
    rowptr = torch.zeros(C, N + 1, dtype=torch.int32)
    for slot, (e, d) in enumerate(zip(entries, dense)):
        index[slot, : len(e)] = e
        value[slot, : len(e)] = d.flatten()[e].to(dtype)
        rowptr[slot, 1:] = torch.bincount(e // K, minlength=N).cumsum(0)
    csr = rowptr.to(DEVICE), index.to(DEVICE)
    dbias = rand(C, N)
    want = yd + torch.einsum("btk,bnk->btn", x.double().cpu(),
                             torch.stack([_dense(index[c], value[c], N, K) for c in range(C)])[s])
    subset = torch.tensor([5, 0, 3, 2, 4], device=DEVICE)  # every row with a slot and a null-slot one (graphs)
    for launch in ({}, {"transposed": False}, {"prefetch": False}, {"transposed": False, "prefetch": False},
                   {"rows": subset}):
        check(lambda p: fused.sparse_delta_(y.clone(), x, slots, *csr, value.to(DEVICE), lengths=p, **launch), want)
    check(lambda p: fused.sparse_delta_(y.clone(), x, slots, *csr, value.to(DEVICE), bias=dbias, lengths=p),
          want + dbias.double().cpu()[s][:, None])
    weight = rand(N, K)  # MaskBERT: the entry is -weight where the score is negative
    scores = torch.where(torch.rand(C, most, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    masked = -weight.double().cpu().flatten()[index] * (scores.double() < 0) * (torch.arange(most) < torch.tensor(
        [len(e) for e in entries])[:, None])
    want = yd + torch.einsum("btk,bnk->btn", x.double().cpu(),
                             torch.stack([_dense(index[c], masked[c], N, K) for c in range(C)])[s])
    for launch in ({}, {"transposed": False, "prefetch": False}):
        check(lambda p: fused.sparse_delta_(y.clone(), x, slots, *csr, scores.to(DEVICE), weight, lengths=p, **launch),
              want)

    # into a delta buffer (the products `Overlap` launches ahead): written where a row has a slot, up to its length;
    # elsewhere left as it was; and the epilogue adds it on flagged rows only (the others' delta is never read)
    for p in (None, ragged):
        buffer = torch.full_like(y, float("nan"))
        got = fused.sparse_deltas_(buffer, x, [{"slots": slots, "rowptr": csr[0], "index": csr[1],
                                                "value": scores.to(DEVICE), "weight": weight, "rows": None}], p,
                                   accumulate=False).cpu()
        within = live[:, None] & (torch.arange(T)[None, :] < (T if p is None else lengths[:, None]))
        torch.testing.assert_close(got[within].double(), (want - yd)[within], rtol=rtol, atol=atol)
        assert got[~within].isnan().all()
        summed = fused.epilogue_(y.clone(), delta=(slots, buffer), lengths=p).cpu()
        torch.testing.assert_close(summed[within].double(), want[within], rtol=rtol, atol=atol)
        assert torch.equal(summed[~within], y.cpu()[~within])

    # two sparse methods in one launch (MaskBERT's scores and Diff-Pruning's values with a bias), each with its own
    # slots: rows 2 and 3 use both, row 1 only the second; with and without row subsets (padded with a null row)
    slots_b = torch.tensor([0, 1, 2, 3, 0, 0], device=DEVICE)
    sb = slots_b.cpu()
    both = want + torch.einsum("btk,bnk->btn", x.double().cpu(), torch.stack(
        [_dense(index[c], value[c], N, K) for c in range(C)])[sb]) + (dbias.double().cpu()[sb] * (sb != 0)[:, None])[
        :, None]  # the bias of a bank's slot 0 is zeros; here it is random: rows off slot B get none
    for rows_a, rows_b in ((None, None), (subset, torch.tensor([1, 2, 3, 4, 4, 4], device=DEVICE)), (subset, None)):
        terms = [{"slots": slots, "rowptr": csr[0], "index": csr[1], "value": scores.to(DEVICE), "weight": weight,
                  "rows": rows_a},
                 {"slots": slots_b, "rowptr": csr[0], "index": csr[1], "value": value.to(DEVICE), "bias": dbias,
                  "rows": rows_b}]
        check(lambda p: fused.sparse_deltas_(y.clone(), x, terms, p), both, live=live | (sb != 0))


def test_sparse_slots_keep_sorted_positions_and_their_row_starts():
    """What the fused sparse kernel reads: each slot's positions sorted (a CSR) with `rowptr`, kept through removal
    of a task and growth of the bank; the values follow their positions."""
    model = build_model(config=TINY, capacity=2, max_rank=8)
    specs = {n: task(n, seed=i) for i, n in enumerate(("diff_2pct", "maskbert_30pct", "diff_50pct", "maskbert_1pct"))}
    for spec in specs.values():
        model.bank.add(spec)
    model.bank.remove("maskbert_30pct")
    for name, spec in specs.items():
        if name not in model.bank.tasks:
            continue
        method = model.bank.methods[next(iter(spec.pet))]
        slot = model.bank.tasks[name].slots[method.name]
        for key, idx in method.indices.items():
            site = key.replace("__", ".")
            out_f, in_f = method.site_shapes[site]
            index, values = method.stored(key, slot)
            assert torch.all(index[1:] > index[:-1]), f"{name} {site}: positions not sorted"
            counts = torch.bincount(index // in_f, minlength=out_f)
            assert idx.rowptr[slot].tolist() == [0] + counts.cumsum(0).tolist(), f"{name} {site}"
            file_index = spec.tensors.get(f"{site}.{method.index_name}")
            if file_index is None:
                assert len(index) == 0
                continue
            order = file_index.long().argsort()
            assert torch.equal(index, file_index.long()[order])
            if method.value_name in ("diff_value",):
                torch.testing.assert_close(values, spec.tensors[f"{site}.diff_value"][order])
    free = model.bank.methods["maskbert"].free
    for key, idx in model.bank.methods["maskbert"].indices.items():
        assert all(not idx.rowptr[s].any() for s in free if s < len(idx.rowptr)), key


def test_a_device_where_the_kernels_do_not_run_keeps_the_torch_ops(monkeypatch, caplog):
    """Triton imports but cannot build or launch a kernel there (e.g. no C compiler for its launcher): the gathered
    ops stay on their torch forms, with a warning, instead of failing batches."""

    class Unbuildable:
        class epilogue_kernel:  # noqa: N801 - stands in for a Triton kernel, launched as kernel[grid](...)
            def __class_getitem__(cls, grid):
                raise RuntimeError("failed to build the launcher: no C compiler")

    monkeypatch.setattr(fused, "_kernels", lambda: Unbuildable)
    monkeypatch.setattr(fused, "INTERPRET", True)  # let the CPU stand for a device
    fused._runs_on.cache_clear()
    try:
        assert not fused.serves(torch.device("cpu"))
        assert not fused.available(torch.zeros(2, 3, 4))
        assert "do not run on cpu" in caplog.text
    finally:
        fused._runs_on.cache_clear()
