"""Triton kernels of the fused PET ops (see `chorus.backends.pet.fused`, which launches them; import only with Triton).

Every kernel takes the batch's per-row slots and lengths and gives each program one batch row: a row whose slot is 0
(the null slot: the row's task does not use the method) does nothing, so a method's op costs only what its own rows
need, with no host-side grouping of rows (one launch per site, capturable in a CUDA graph); a program whose block of
tokens starts past its row's length does nothing either (padding adds no work). The exceptions carry the sublayer's
residual, which every token gets: the epilogue with a residual, and the adapter's kernel (it writes a new tensor).
"""

import triton
import triton.language as tl


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # exact gelu, as F.gelu


@triton.jit
def epilogue_kernel(y_ptr, len_ptr, bias_slot_ptr, bias_ptr, low_slot_ptr, down_ptr, up_ptr, scale_slot_ptr,
                    scale_ptr, then_slot_ptr, then_ptr, res_ptr, delta_flag_ptr, delta_ptr, T, N, R,
                    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_LOW_RANK: tl.constexpr, HAS_SCALE: tl.constexpr, ACT: tl.constexpr, HAS_THEN: tl.constexpr,
                    HAS_RES: tl.constexpr, HAS_DELTA: tl.constexpr, PRECISION: tl.constexpr):
    """In place, the dense post ops of one linear for each row b, in one pass over y (B, T, N):
    `y[b] = act((y[b] + delta[b] + bias[sb] + down[b] · up[sl]ᵀ) * (1 + scale[ss])) * (1 + then[st]) (+ res[b])`,
    sb, sl, ss, st the row's slots in the bias, low-rank, scale and after-activation scale banks (bias, scale, then
    (C, N), up (C, N, R); down (B, T, R), unset where sl is 0, and past a row's length); delta (B, T, N) a weight
    delta computed apart (the sparse products), read where the row's delta flag is not 0 (else unset); ACT 0 none,
    2 exact gelu; res (B, T, N) the sublayer's residual. A bank's null slot (0) is zeros: it adds nothing or scales
    by one. Tokens past a row's length are not touched, nor (without ACT) rows with no slot or flag at all; HAS_RES
    writes every token of every row."""
    t0 = tl.program_id(1) * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(0).to(tl.int64)
    length = tl.load(len_ptr + b)
    sb, sl, ss, st, sd = 0, 0, 0, 0, 0
    if HAS_DELTA:
        sd = tl.load(delta_flag_ptr + b)
    if HAS_BIAS:
        sb = tl.load(bias_slot_ptr + b)
    if HAS_LOW_RANK:
        sl = tl.load(low_slot_ptr + b)
    if HAS_SCALE:
        ss = tl.load(scale_slot_ptr + b)
    if HAS_THEN:
        st = tl.load(then_slot_ptr + b)
    work = ((ACT != 0) | (sb != 0) | (sl != 0) | (ss != 0) | (st != 0) | (sd != 0)) & (t0 < length)
    if HAS_RES:
        work = t0 < T
    if work:
        n_ok = offs_n < N
        t_ok = offs_t < length
        tile = b * T * N + offs_t[:, None] * N + offs_n[None, :]  # this block's elements of y, delta and res
        ptrs = y_ptr + tile
        written = t_ok
        if HAS_RES:
            written = offs_t < T
        mask = written[:, None] & n_ok[None, :]
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            v += tl.load(delta_ptr + tile, mask=(t_ok & (sd != 0))[:, None] & n_ok[None, :],
                         other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + sb * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_LOW_RANK:
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = (offs_r < R) & (sl != 0)  # down is unset on rows without a low-rank slot: never read
            d = tl.load(down_ptr + b * T * R + offs_t[:, None] * R + offs_r[None, :],
                        mask=t_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_T, BLOCK_R)
            u = tl.load(up_ptr + sl * N * R + offs_n[None, :] * R + offs_r[:, None],
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_N): up[sl]ᵀ
            v = tl.dot(d, u, v, input_precision=PRECISION)
        if HAS_SCALE:
            v *= 1.0 + tl.load(scale_ptr + ss * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 2:
            v = _gelu(v)
        if HAS_THEN:
            v *= 1.0 + tl.load(then_ptr + st * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            v += tl.load(res_ptr + tile, mask=mask, other=0.0)
        tl.store(ptrs, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gathered_matmul_kernel(x_ptr, w_ptr, len_ptr, slot_ptr, out_ptr, scale_ptr, T, N, K, BLOCK_T: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """out[b] = (x[b] · w[slot[b]]ᵀ) · scale[slot[b]] for rows with a slot (LoRA's down-projection).

    x (B, T, K), w (C, N, K), out (B, T, N), scale (C,). Other rows, and tokens past a row's length, are not
    written."""
    t0 = tl.program_id(1) * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    b = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + b)
    length = tl.load(len_ptr + b)
    if (slot != 0) & (t0 < length):
        t_ok = offs_t < length
        x_ptrs = x_ptr + b * T * K + offs_t[:, None] * K + offs_k[None, :]  # (BLOCK_T, BLOCK_K)
        w_ptrs = w_ptr + slot * N * K + offs_n[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N): w[slot]ᵀ
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(x_ptrs, mask=t_ok[:, None] & (offs_k[None, :] + k < K), other=0.0)
            w = tl.load(w_ptrs, mask=(offs_n[None, :] < N) & (offs_k[:, None] + k < K), other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = acc * tl.load(scale_ptr + slot).to(tl.float32)
        out_ptrs = out_ptr + b * T * N + offs_t[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _down(h, z_ptrs, t_ok, w_ptrs, m_ok, bias_ptr, N, BLOCK_K: tl.constexpr, ADD_BIAS: tl.constexpr,
          PRECISION: tl.constexpr):
    """h (BLOCK_T, BLOCK_M) + z · downᵀ over N inputs, z the tokens' rows of y (+ bias, ADD_BIAS) (`adapter_kernel`).
    Without the bias the loaded tiles go to the dot as they are (no conversion between: the loop pipelines well)."""
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < N
        z = tl.load(z_ptrs + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        if ADD_BIAS:
            z = (z.to(tl.float32) + tl.load(bias_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]).to(
                z.dtype)
        w = tl.load(w_ptrs + offs_k[:, None], mask=k_ok[:, None] & m_ok, other=0.0)  # (BLOCK_K, BLOCK_M): downᵀ
        h = tl.dot(z, w, h, input_precision=PRECISION)
    return h


@triton.jit
def adapter_kernel(y_ptr, out_ptr, res_ptr, len_ptr, slot_ptr, down_ptr, down_bias_ptr, up_ptr, up_bias_ptr,
                   gelu_ptr, bias_slot_ptr, bias_ptr, T, N, M, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                   DELTA: tl.constexpr, PRECISION: tl.constexpr):
    """A bottleneck adapter after a linear, with that linear's bias term and its sublayer's residual, in one pass:
    `out[b] = z + up[s] · act(down[s] · z + down_bias[s]) + up_bias[s] (+ res[b])`, `z = y[b] + bias[sb]`, s the
    row's adapter slot (act per slot: gelu where gelu[s], else relu), sb its slot in the bias bank. y, res, out
    (B, T, N); down (C, M, N), down_bias (C, M), up (C, N, M), up_bias (C, N), bias (C, N). Rows on no adapter slot
    (s = 0) and tokens past a row's length get `z (+ res)`: every element of out is written. The bias bank's slot 0
    is zeros (as every bank's null slot): its rows' bottleneck leaves the bias out.

    Each program writes BLOCK_N outputs of BLOCK_T tokens and computes its tokens' bottleneck `act(down · z)` over
    all N inputs itself (programs of one row's tokens repeat that small product rather than wait for each other):
    out is not y, so no program reads what another writes.

    DELTA: out is a delta buffer, `up[s] · act(down[s] · z + down_bias[s]) + up_bias[s]` written on rows with an
    adapter slot, up to their length, and nothing else (the LayerNorm's kernel after it adds the delta, the bias term
    and the residual; the other rows' programs do nothing)."""
    t0 = tl.program_id(1) * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(0).to(tl.int64)
    length = tl.load(len_ptr + b)
    slot = tl.load(slot_ptr + b)
    sb = 0
    if HAS_BIAS:
        sb = tl.load(bias_slot_ptr + b)
    n_ok = offs_n < N
    row = b * T * N
    tile = row + offs_t[:, None] * N + offs_n[None, :]  # this program's elements of y, res and out
    mask = (offs_t < T)[:, None] & n_ok[None, :]
    v = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if not DELTA:
        v = tl.load(y_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + sb * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if (slot != 0) & (t0 < length):
        t_ok = offs_t < length
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        # up[s]ᵀ (BLOCK_M, BLOCK_N) and its bias, loaded first: in flight during the down-projection's loop
        u = tl.load(up_ptr + slot * N * M + offs_n[None, :] * M + offs_m[:, None], mask=m_ok[:, None] & n_ok[None, :],
                    other=0.0)
        ub = tl.load(up_bias_ptr + slot * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        h = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
        w_ptrs = down_ptr + slot * M * N + offs_m[None, :] * N  # (1, BLOCK_M): down[s]'s rows
        z_ptrs = y_ptr + row + offs_t[:, None] * N  # (BLOCK_T, 1)
        if HAS_BIAS & (sb != 0):  # the row's task also shifts this linear's output (rare): z = y + bias
            h = _down(h, z_ptrs, t_ok, w_ptrs, m_ok, bias_ptr + sb * N, N, BLOCK_K, True, PRECISION)
        else:
            h = _down(h, z_ptrs, t_ok, w_ptrs, m_ok, bias_ptr, N, BLOCK_K, False, PRECISION)
        h += tl.load(down_bias_ptr + slot * M + offs_m, mask=m_ok, other=0.0).to(tl.float32)[None, :]
        if tl.load(gelu_ptr + slot) != 0:
            h = _gelu(h)
        else:
            h = tl.maximum(h, 0.0)
        d = tl.dot(h.to(u.dtype), u, input_precision=PRECISION) + ub[None, :]
        if DELTA:
            tl.store(out_ptr + tile, d.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])
        v += tl.where(t_ok[:, None], d, 0.0)
    if not DELTA:
        if HAS_RES:
            v += tl.load(res_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + tile, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def transpose_rows_kernel(x_ptr, out_ptr, len_ptr, slot_a, slot_b, T, K, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                          SLOTS: tl.constexpr):
    """out[b] = x[b]ᵀ, x (B, T, K) -> out (B, K, T), in blocks of tokens that start before the row's length, on rows
    with a slot in `slot_a` or `slot_b` (SLOTS: how many of the two are given; 0: every row)."""
    t0 = tl.program_id(1) * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    b = tl.program_id(0).to(tl.int64)
    used = t0 < tl.load(len_ptr + b)
    if SLOTS == 1:
        used &= tl.load(slot_a + b) != 0
    if SLOTS == 2:
        used &= (tl.load(slot_a + b) != 0) | (tl.load(slot_b + b) != 0)
    if used:
        mask = (offs_t[:, None] < T) & (offs_k[None, :] < K)  # whole blocks (vectorized)
        v = tl.load(x_ptr + b * T * K + offs_t[:, None] * K + offs_k[None, :], mask=mask)
        tl.store(out_ptr + b * K * T + offs_k[None, :] * T + offs_t[:, None], v, mask=mask)


@triton.jit
def _sparse_sum(acc, x_row, slot, n0, offs_t, T, N, K, rowptr_ptr, index_ptr, value_ptr, weight_ptr, bias_ptr, max_nnz,
                BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, TRANSPOSED: tl.constexpr, PREFETCH: tl.constexpr,
                MASK: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """acc (BLOCK_N, BLOCK_T) + one slot's `x · ΔWᵀ (+ bias)` at outputs n0.. and tokens offs_t
    (`sparse_delta_kernel`)."""
    offs_e = tl.arange(0, CHUNK)
    rowptr = rowptr_ptr + slot * (N + 1)
    first = tl.load(rowptr + n0)
    last = tl.load(rowptr + tl.minimum(n0 + BLOCK_N, N))
    entries = index_ptr + slot.to(tl.int64) * max_nnz
    values = value_ptr + slot.to(tl.int64) * max_nnz
    ok_next = first + offs_e < last
    pos_next = tl.load(entries + first + offs_e, mask=ok_next, other=0).to(tl.int32)  # < 2**31: a weight's size
    val_next = tl.load(values + first + offs_e, mask=ok_next, other=0.0)
    for e0 in range(first, last, CHUNK):
        if PREFETCH:
            ok, pos, val = ok_next, pos_next, val_next
            ok_next = e0 + CHUNK + offs_e < last
            pos_next = tl.load(entries + e0 + CHUNK + offs_e, mask=ok_next, other=0).to(tl.int32)
            val_next = tl.load(values + e0 + CHUNK + offs_e, mask=ok_next, other=0.0)
        else:
            ok = e0 + offs_e < last
            pos = tl.load(entries + e0 + offs_e, mask=ok, other=0).to(tl.int32)
            val = tl.load(values + e0 + offs_e, mask=ok, other=0.0)
        entry = val
        if MASK:
            w = tl.load(weight_ptr + pos, mask=ok, other=0.0)
            entry = tl.where(val < 0, -w, tl.zeros_like(w))
        col = pos % K
        if TRANSPOSED:
            x_ptrs = x_row + col[:, None] * T + offs_t[None, :]
        else:
            x_ptrs = x_row + offs_t[None, :] * K + col[:, None]
        xv = tl.load(x_ptrs, mask=ok[:, None] & (offs_t < T)[None, :], other=0.0)  # (CHUNK, BLOCK_T)
        mine = (pos // K - n0)[None, :] == tl.arange(0, BLOCK_N)[:, None]  # (BLOCK_N, CHUNK)
        placed = tl.where(mine, entry[None, :], tl.zeros_like(entry)[None, :]).to(xv.dtype)
        acc = tl.dot(placed, xv, acc, input_precision=PRECISION)
    if HAS_BIAS:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + slot * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def sparse_delta_kernel(y_ptr, x_ptr, len_ptr, T, N, K, n_a,
                        rows_a, slot_a, rowptr_a, index_a, value_a, weight_a, bias_a, nnz_a,
                        rows_b, slot_b, rowptr_b, index_b, value_b, weight_b, bias_b, nnz_b,
                        BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, TWO: tl.constexpr, TRANSPOSED: tl.constexpr,
                        PREFETCH: tl.constexpr, PRECISION: tl.constexpr,
                        CHUNK_A: tl.constexpr, ROWS_A: tl.constexpr, MASK_A: tl.constexpr, BIAS_A: tl.constexpr,
                        CHUNK_B: tl.constexpr, ROWS_B: tl.constexpr, MASK_B: tl.constexpr, BIAS_B: tl.constexpr,
                        ACCUMULATE: tl.constexpr):
    """y[b, t, n] += Σ_j ΔW[n, col_j] · x[b, t, col_j] (+ bias[slot, n]) over the entries j of output n, for rows
    with a slot, up to their length; for one sparse method (A) or, TWO, for two (A and B: e.g. MaskBERT and
    Diff-Pruning at one site) in one launch. A method's ΔW is the slot's CSR: `index[slot]` (max_nnz,) flat positions
    n * K + col sorted ascending, `rowptr[slot]` (N + 1,) where output n's entries start; ΔW's entry is `value`
    (MASK, MaskBERT: `-weight[pos]` where value < 0, else 0). x (B, T, K), or TRANSPOSED (B, K, T): an entry's
    inputs contiguous.

    The grid's first axis runs over method A's rows (`rows_a` (n_a,) with ROWS_A: the batch rows that use it, else
    every row), then method B's (`rows_b` with ROWS_B, else every row). A's program for a row that uses A also adds
    B's term if the row uses B; B's programs take the rows that use B and not A: every (row, method) once, no two
    programs on one row (no atomics).

    A program's BLOCK_N outputs own one contiguous run of a slot's entries, walked CHUNK entries at a time (PREFETCH:
    the next chunk's positions load while this one's inputs are gathered): the inputs are gathered (CHUNK, BLOCK_T)
    and added to the outputs by one small matmul with the chunk's entries placed in their output's row
    (BLOCK_N, CHUNK): the per-output sums are tensor-core work, no scatter. Inputs past the row's length are read as
    they are (rows padded to T keep the gathers vectorized; those tokens' sums are never stored). ACCUMULATE adds
    into y, else y is written (a delta buffer: rows of neither method and tokens past a row's length left unset)."""
    n0 = tl.program_id(1) * BLOCK_N
    t0 = tl.program_id(2) * BLOCK_T
    p = tl.program_id(0)
    in_a = p < n_a
    if ROWS_A:
        b = tl.load(rows_a + tl.minimum(p, n_a - 1))
    else:
        b = p.to(tl.int64)
    if TWO:
        if ROWS_B:
            b_b = tl.load(rows_b + tl.maximum(p - n_a, 0))
        else:
            b_b = tl.maximum(p - n_a, 0).to(tl.int64)
        b = tl.where(in_a, b, b_b)
    sa = tl.load(slot_a + b)
    do_a = in_a & (sa != 0)
    do_b = sa != sa  # false: no method B
    sb = sa
    if TWO:
        sb = tl.load(slot_b + b)
        do_b = (sb != 0) & (in_a == (sa != 0))  # A's program for a row of A; else B's program for a row not of A
    length = tl.load(len_ptr + b)
    if (do_a | do_b) & (t0 < length):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        x_row = x_ptr + b * T * K
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        if do_a:
            acc = _sparse_sum(acc, x_row, sa, n0, offs_t, T, N, K, rowptr_a, index_a, value_a, weight_a, bias_a,
                              nnz_a, BLOCK_N, CHUNK_A, TRANSPOSED, PREFETCH, MASK_A, BIAS_A, PRECISION)
        if TWO:
            if do_b:
                acc = _sparse_sum(acc, x_row, sb, n0, offs_t, T, N, K, rowptr_b, index_b, value_b, weight_b, bias_b,
                                  nnz_b, BLOCK_N, CHUNK_B, TRANSPOSED, PREFETCH, MASK_B, BIAS_B, PRECISION)
        y_ptrs = y_ptr + b * T * N + offs_t[None, :] * N + offs_n[:, None]
        mask = (offs_n < N)[:, None] & (offs_t < length)[None, :]
        if ACCUMULATE:
            acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_kernel(x_ptr, bias_slot_ptr, bias_ptr, res_ptr, delta_flag_ptr, delta_ptr, out_ptr, len_ptr, w_ptr,
                      b_ptr, slot_ptr, dw_ptr, db_ptr, T, N, eps, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_DELTA: tl.constexpr, TUNED: tl.constexpr):
    """out[b, t] = LayerNorm(x[b, t] (+ bias[sb]) (+ delta[b, t]) (+ res[b, t])) (bias (C, N): the linear's per-task
    bias bank, sb the row's slot there; delta: read where the row's delta flag is not 0, else unset) with the affine
    `w + dw[s]`, `b + db[s]` (TUNED: s the row's slot in the per-task LayerNorm bank, whose null slot is zeros; else
    the backbone's w, b), statistics in float32 over the N features; tokens past the row's length get zeros (written,
    never read: no load of x or res there).
    x, res, out (B, T, N); w, b (N,); dw, db (C, N)."""
    t0 = tl.program_id(1) * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    b = tl.program_id(0).to(tl.int64)
    length = tl.load(len_ptr + b)
    n_ok = offs_n < N
    tile = b * T * N + offs_t[:, None] * N + offs_n[None, :]
    written = (offs_t < T)[:, None] & n_ok[None, :]
    if t0 < length:
        t_ok = offs_t < length
        mask = t_ok[:, None] & n_ok[None, :]
        v = tl.load(x_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            sb = tl.load(bias_slot_ptr + b)
            v += tl.load(bias_ptr + sb * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_DELTA:
            if tl.load(delta_flag_ptr + b) != 0:
                v += tl.load(delta_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            v += tl.load(res_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(v, axis=1) / N
        d = tl.where(n_ok[None, :], v - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
        w = tl.load(w_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if TUNED:
            s = tl.load(slot_ptr + b)
            w += tl.load(dw_ptr + s * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            bias += tl.load(db_ptr + s * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        o = tl.where(t_ok[:, None], d * rstd[:, None] * w[None, :] + bias[None, :], 0.0)
        tl.store(out_ptr + tile, o.to(out_ptr.dtype.element_ty), mask=written)
    else:
        tl.store(out_ptr + tile, tl.zeros((BLOCK_T, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=written)
