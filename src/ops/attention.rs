//! Causal grouped-query attention of one sequence against its cached keys and values.

use candle_core::{DType, Result, Tensor, D};

use super::vexp;

/// How a family scores keys: a sliding window (a query at position `p` sees keys
/// `p - window + 1 ..= p` only; `None`: all up to `p`), the softmax scale (`None`:
/// `1 / sqrt(head_dim)`; Gemma: `query_pre_attn_scalar^-0.5`), and soft-capping of the scaled
/// scores (`cap · tanh(s / cap)`, Gemma 2).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scoring {
    pub window: Option<usize>,
    pub scale: Option<f32>,
    pub softcap: Option<f32>,
}

/// `q`: `[heads, len, head_dim]` for positions `total - len .. total`;
/// `k`, `v`: `[kv_heads, total, head_dim]` (cache plus the new rows), scored as `scoring` says.
/// Returns `[len, heads * head_dim]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scoring: Scoring) -> Result<Tensor> {
    let window = scoring.window;
    let (heads, len, head_dim) = q.dims3()?;
    let (kv_heads, total, _) = k.dims3()?;
    let group = heads / kv_heads;
    let dtype = q.dtype();
    // Query heads of one group share a key head: fold the group into the row dimension so one
    // batched matmul per key head serves them all, with no copy of the keys.
    let qg = q.reshape((kv_heads, group * len, head_dim))?;
    let scale = scoring
        .scale
        .map_or(1.0 / (head_dim as f64).sqrt(), f64::from);
    let windowed = window.is_some_and(|w| w < total);
    let plain = !windowed && scoring.scale.is_none() && scoring.softcap.is_none();
    if q.track_op() && len > 1 && plain && super::fused::applies(q) {
        // Training on the CPU: scale, mask and softmax as one node with its derivative.
        let probs = super::fused::causal_softmax(&qg.matmul(&k.t()?)?, scale, len)?;
        return probs
            .matmul(v)?
            .reshape((heads, len, head_dim))?
            .transpose(0, 1)?
            .reshape((len, heads * head_dim));
    }
    let mut scores = (qg.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    if let Some(cap) = scoring.softcap {
        scores = ((scores / f64::from(cap))?.tanh()? * f64::from(cap))?;
    }
    let scores = if len > 1 || windowed {
        let offset = total - len;
        let w = window.unwrap_or(usize::MAX);
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j <= offset + i && offset + i - j < w {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (len, total), q.device())?;
        scores
            .reshape((kv_heads, group, len, total))?
            .broadcast_add(&mask)?
            .reshape((kv_heads, group * len, total))?
    } else {
        scores
    };
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let out = probs.to_dtype(dtype)?.matmul(v)?; // [kv_heads, group*len, head_dim]
    out.reshape((heads, len, head_dim))?
        .transpose(0, 1)?
        .reshape((len, heads * head_dim))
}

/// A dot product in 8 independent lanes (so the compiler vectorizes it; one running sum cannot
/// be reordered).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Keys per share (at least one block): a query row's attention is computed share by share
/// over fixed key ranges counted from position 0, and the shares' partial softmaxes are merged
/// in order. Nothing of a row's arithmetic depends on how many rows its step holds or how far
/// the history goes past it, so a prompt prefilled in one step, in chunks, or after a
/// prefix-cache hit gives each position bit for bit what a decode step gives it.
const SHARE_KEYS: usize = 512;
/// Query rows per task (a long prompt's rows are split between tasks as well as its shares).
const ROWS_PER_TASK: usize = 32;
/// Rows per block of a contiguous history (shares are whole blocks).
const CONTIGUOUS_BLOCK: usize = 64;

/// The head layout of a model's attention.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Window, scale and soft-cap (see `Scoring`).
    pub scoring: Scoring,
}

/// Where one sequence's keys and values live: blocks of `block_rows()` positions. `keys(b, g)`
/// is kv head `g`'s rows of block `b` as f32 and their row stride (`head_dim` columns from each
/// row's start; a source stored in another dtype widens them into `scratch`). A contiguous
/// history is one block; the paged KV pool is many.
pub trait KvSource: Sync {
    /// Positions held (the cache plus this step's rows).
    fn total(&self) -> usize;
    fn block_rows(&self) -> usize;
    fn keys<'s>(
        &'s self,
        block: usize,
        head: usize,
        scratch: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize);
    fn values<'s>(
        &'s self,
        block: usize,
        head: usize,
        scratch: &'s mut Vec<f32>,
    ) -> (&'s [f32], usize);
    /// The keys as stored, where they are int8 in the 16 × 4 layout.
    fn int8_keys(&self, _block: usize, _head: usize) -> Option<Int8Rows<'_>> {
        None
    }
    /// The values as stored, where they are int8.
    fn int8_values(&self, _block: usize, _head: usize) -> Option<Int8Rows<'_>> {
        None
    }
    /// Asks for kv head `head`'s keys and values of `block` into the cache (a hint).
    fn prefetch(&self, _block: usize, _head: usize) {}
}

/// One kv head's int8 rows of a block as stored: values (`row_stride` apart, `head_dim` each)
/// or keys (`row_stride` 0: offset by 128, in groups of 16 rows × 4 columns, see
/// `model::KvPool`), and the rows' scales (`scale_stride` apart).
pub struct Int8Rows<'a> {
    pub data: &'a [i8],
    pub row_stride: usize,
    pub scales: &'a [f32],
    pub scale_stride: usize,
}

/// A history in one piece: `k`, `v` `[total, kv_heads · head_dim]` (read in blocks of
/// `CONTIGUOUS_BLOCK` rows, as a paged cache is).
pub struct Contiguous<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub kv_width: usize,
    pub head_dim: usize,
}

impl KvSource for Contiguous<'_> {
    fn total(&self) -> usize {
        self.k.len() / self.kv_width
    }
    fn block_rows(&self) -> usize {
        CONTIGUOUS_BLOCK
    }
    fn keys<'s>(&'s self, b: usize, head: usize, _: &'s mut Vec<f32>) -> (&'s [f32], usize) {
        let at = b * CONTIGUOUS_BLOCK * self.kv_width + head * self.head_dim;
        (&self.k[at..], self.kv_width)
    }
    fn values<'s>(&'s self, b: usize, head: usize, _: &'s mut Vec<f32>) -> (&'s [f32], usize) {
        let at = b * CONTIGUOUS_BLOCK * self.kv_width + head * self.head_dim;
        (&self.v[at..], self.kv_width)
    }
}

/// Causal attention on host data for one sequence: `q` `[len, heads · head_dim]` (positions
/// `total - len .. total`) against the keys and values of `kv`; writes `[len, heads ·
/// head_dim]` into `out`. The serving path on CPU: no tensor ops, no copies of the cache.
/// Query row by query row, block by block: tasks are (kv head, up to `ROWS_PER_TASK` query
/// rows, one share of `SHARE_KEYS` keys), so decode steps split a long history between threads
/// and long prompts split their rows too; memory is bounded by a task's rows × its share.
pub fn causal_attention_host(q: &[f32], kv: &dyn KvSource, shape: Heads, out: &mut [f32]) {
    use rayon::prelude::*;
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
        scoring,
    } = shape;
    let window = scoring.window;
    let width = heads * hd;
    let len = q.len() / width;
    let total = kv.total();
    assert!(len <= total, "attention: more queries than positions");
    let window = window.unwrap_or(usize::MAX);
    let group = heads / kv_heads;
    let gw = group * hd;
    let bs = kv.block_rows();
    let per_share = (SHARE_KEYS / bs).max(1);
    let shares = total.div_ceil(bs).div_ceil(per_share);
    let row_tasks = len.div_ceil(ROWS_PER_TASK);
    let tasks: Vec<Share> = (0..kv_heads)
        .flat_map(|g| {
            (0..row_tasks).flat_map(move |t| {
                let rows = t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(len);
                // The last row of the task sees keys up to `total - len + rows.end - 1`; the
                // first, with a window, none before `total - len + rows.start + 1 - window`.
                let seen = total - len + rows.end;
                let from = (total - len + rows.start + 1).saturating_sub(window);
                (0..shares)
                    .map(move |s| Share {
                        g,
                        b0: s * per_share,
                        b1: ((s + 1) * per_share).min(total.div_ceil(bs)),
                        rows: (rows.start, rows.end),
                    })
                    .filter(move |sh| sh.b0 * bs < seen && sh.b1 * bs > from)
            })
        })
        .collect();
    let parts: Vec<SharePart> = tasks
        .into_par_iter()
        .map(|share| {
            let n = share.rows.1 - share.rows.0;
            let mut o = vec![0f32; n * gw];
            let mut stats = vec![(f32::NEG_INFINITY, 0f32); n * group];
            one_group(q, kv, shape, share, &mut o, &mut stats);
            (share, o, stats)
        })
        .collect();
    // Each row's shares, in key order (tasks were listed so), merged by their max and sum (as
    // in flash decoding).
    for g in 0..kv_heads {
        for t in 0..row_tasks {
            let r0 = t * ROWS_PER_TASK;
            let mine: Vec<_> = parts
                .iter()
                .filter(|(s, ..)| s.g == g && s.rows.0 == r0)
                .collect();
            let rows = mine.first().map_or(0, |(s, ..)| s.rows.1 - s.rows.0);
            for i in 0..rows {
                for j in 0..group {
                    let at = i * group + j;
                    let m = mine
                        .iter()
                        .map(|(_, _, st)| st[at].0)
                        .fold(f32::NEG_INFINITY, f32::max);
                    let dst = &mut out[(r0 + i) * width + g * gw + j * hd..][..hd];
                    dst.fill(0.0);
                    let mut l = 0f32;
                    for (_, o, st) in &mine {
                        let (mt, lt) = st[at];
                        if lt == 0.0 {
                            continue;
                        }
                        let w = (mt - m).exp();
                        l += lt * w;
                        for (x, y) in dst.iter_mut().zip(&o[at * hd..][..hd]) {
                            *x += w * y;
                        }
                    }
                    let inv = 1.0 / l;
                    dst.iter_mut().for_each(|x| *x *= inv);
                }
            }
        }
    }
}

/// `vexp::exp_sub_sum`, with AVX2 where the caller is compiled for it.
#[inline(always)]
fn exp_sub_sum<const AVX: bool>(xs: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // SAFETY: `AVX` is true only in functions compiled for (and run on) AVX2 + FMA.
        return unsafe { vexp::exp_sub_sum_avx2(xs, max) };
    }
    vexp::exp_sub_sum(xs, max)
}

/// The largest of `xs` and `init` (8 lanes, so it vectorizes).
#[inline(always)]
fn max_of(xs: &[f32], init: f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &b| a.max(b));
    for c in chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |a, &b| a.max(b))
}

/// Blocks ahead whose int8 keys and values the decode loop prefetches.
const PREFETCH_AHEAD: usize = 6;

/// A task's result: its share, the weighted value rows and the softmax stats of its rows.
type SharePart = (Share, Vec<f32>, Vec<(f32, f32)>);

/// A task of `causal_attention_host`: kv head `g` (its group of query heads), key blocks
/// `b0 .. b1`, query rows `rows.0 .. rows.1`.
#[derive(Debug, Clone, Copy)]
struct Share {
    g: usize,
    b0: usize,
    b1: usize,
    rows: (usize, usize),
}

/// One task: for each of its query rows and each head of the group, the softmax weights' max
/// and sum over the share's keys (`stats`, `[rows, group]`) and the value rows weighted by
/// `exp(score - max)` (`out`, `[rows, group · head_dim]`), unnormalized.
fn one_group(
    q: &[f32],
    kv: &dyn KvSource,
    shape: Heads,
    share: Share,
    out: &mut [f32],
    stats: &mut [(f32, f32)],
) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_features::avx512_vnni()
        && shape.head_dim % 64 == 0
        // The share's last block: its first blocks may be outside the window, given back.
        && kv.int8_keys(share.b1 - 1, share.g).is_some()
        && kv.int8_values(share.b1 - 1, share.g).is_some()
    {
        // SAFETY: the CPU has AVX-512 (F, BW, VNNI), AVX2 and FMA (checked at run time).
        return unsafe { one_group_vnni(q, kv, shape, share, out, stats) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::cpu_features::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { one_group_avx2(q, kv, shape, share, out, stats) };
    }
    one_group_body::<false, false>(q, kv, shape, share, out, stats)
}

/// `one_group` over int8 keys and values with AVX-512: scores by `vpdpbusd` on the stored bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn one_group_vnni(
    q: &[f32],
    kv: &dyn KvSource,
    shape: Heads,
    share: Share,
    out: &mut [f32],
    stats: &mut [(f32, f32)],
) {
    one_group_body::<true, true>(q, kv, shape, share, out, stats)
}

/// `one_group` compiled for AVX2 (the loops in its body vectorize 8 wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn one_group_avx2(
    q: &[f32],
    kv: &dyn KvSource,
    shape: Heads,
    share: Share,
    out: &mut [f32],
    stats: &mut [(f32, f32)],
) {
    one_group_body::<true, false>(q, kv, shape, share, out, stats)
}

/// `VNNI`: compiled into `one_group_vnni`, and the source holds int8 keys and values.
#[inline(always)]
fn one_group_body<const AVX: bool, const VNNI: bool>(
    q: &[f32],
    kv: &dyn KvSource,
    shape: Heads,
    Share {
        g,
        b0,
        b1,
        rows: (r0, r1),
    }: Share,
    out: &mut [f32],
    stats: &mut [(f32, f32)],
) {
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
        scoring,
    } = shape;
    let window = scoring.window;
    let width = heads * hd;
    let len = q.len() / width;
    let total = kv.total();
    let bs = kv.block_rows();
    let window = window.unwrap_or(usize::MAX);
    let group = heads / kv_heads;
    let scale = scoring.scale.unwrap_or(1.0 / (hd as f32).sqrt());
    let span = (b1 - b0) * bs;
    let mut scores = vec![0f32; group * span];
    let mut scratch = Vec::new();
    // The int8 kernels take up to four heads a call: a larger group (Qwen2.5-0.5B's seven) goes
    // in sub-groups of four, each head's arithmetic the same as in a group of its own size.
    let mut qi8: Vec<QueryI8> = (0..group.div_ceil(4)).map(|_| QueryI8::default()).collect();
    for i in r0..r1 {
        let visible = total - len + i + 1;
        let (start, end) = (b0 * bs, visible.min(b1 * bs));
        // Keys before `lo` are outside the window: weighted zero. Blocks wholly before it are
        // not read at all (the engine may have given them back: `KvCache::drop_blocks_before`);
        // the rest of the share is scored and its keys before `lo` masked.
        let lo = visible.saturating_sub(window);
        if start >= end || lo >= end {
            continue; // every key of the share is after this query or outside its window
        }
        let blocks = b0.max(lo / bs)..end.div_ceil(bs);
        if VNNI {
            for (s, qs) in qi8.iter_mut().enumerate() {
                let (j0, heads) = (4 * s, (group - 4 * s).min(4));
                qs.set(
                    &q[i * width + (g * group + j0) * hd..][..heads * hd],
                    hd,
                    scale,
                );
            }
        }
        for b in blocks.clone() {
            if b + PREFETCH_AHEAD < blocks.end {
                // Later blocks' keys and values are elsewhere in the pool: ask for them now (the
                // values are read after all the scores, from L2).
                kv.prefetch(b + PREFETCH_AHEAD, g);
            }
            #[cfg(target_arch = "x86_64")]
            if VNNI {
                let n = bs.min(end - b * bs);
                let kr = kv.int8_keys(b, g).expect("int8 keys (checked)");
                for (s, qs) in qi8.iter().enumerate() {
                    let sc = &mut scores[4 * s * span + (b - b0) * bs..];
                    // SAFETY: compiled for AVX-512 VNNI (see `VNNI`); the kernel checks its
                    // bounds.
                    unsafe { avx512::scores_k4(qs, hd, &kr, n, sc, span) };
                }
                continue;
            }
            let (kb, ks) = kv.keys(b, g, &mut scratch);
            let n = bs.min(end - b * bs);
            for j in 0..group {
                let qh = &q[i * width + (g * group + j) * hd..][..hd];
                let sc = &mut scores[j * span + (b - b0) * bs..][..n];
                #[cfg(target_arch = "x86_64")]
                if AVX && hd % 8 == 0 {
                    // SAFETY: AVX2 + FMA (see `AVX`); `kb` holds `n` rows of stride `ks`, each
                    // with `hd` columns.
                    unsafe { avx2::scores(qh, kb, ks, scale, sc) };
                    continue;
                }
                for (r, s) in sc.iter_mut().enumerate() {
                    *s = dot(qh, &kb[r * ks..][..hd]) * scale;
                }
            }
        }
        for j in 0..group {
            let sh = &mut scores[j * span..][..end - start];
            if let Some(cap) = scoring.softcap {
                sh.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
            }
            if lo > start {
                sh[..lo - start].fill(f32::NEG_INFINITY);
            }
            let max = max_of(sh, f32::NEG_INFINITY);
            stats[(i - r0) * group + j] = (max, exp_sub_sum::<AVX>(sh, max));
        }
        let o = &mut out[(i - r0) * group * hd..][..group * hd];
        o.fill(0.0);
        for b in blocks {
            let n = bs.min(end - b * bs);
            #[cfg(target_arch = "x86_64")]
            if VNNI {
                let vr = kv.int8_values(b, g).expect("int8 values (checked)");
                for (s, os) in o.chunks_mut(4 * hd).enumerate() {
                    let p = &scores[4 * s * span + (b - b0) * bs..];
                    // SAFETY: compiled for AVX-512 (see `VNNI`); the kernel checks its bounds.
                    unsafe { avx512::weighted_sum_i8(p, span, n, &vr, hd, os) };
                }
                continue;
            }
            let (vb, vs) = kv.values(b, g, &mut scratch);
            for j in 0..group {
                let p = &scores[j * span + (b - b0) * bs..][..n];
                let oj = &mut o[j * hd..][..hd];
                #[cfg(target_arch = "x86_64")]
                if AVX && hd % 64 == 0 {
                    // SAFETY: as for the scores.
                    unsafe { avx2::weighted_sum(p, vb, vs, oj) };
                    continue;
                }
                for (r, &pr) in p.iter().enumerate() {
                    let vj = &vb[r * vs..][..hd];
                    for (x, y) in oj.iter_mut().zip(vj) {
                        *x += pr * y;
                    }
                }
            }
        }
    }
}

/// One query row's heads of a group, rounded to int8 for `vpdpbusd`: values, their sums (for the
/// keys' offset of 128) and scales (times the softmax scale).
#[derive(Default)]
struct QueryI8 {
    values: Vec<i8>,
    sums: Vec<i32>,
    scales: Vec<f32>,
}

impl QueryI8 {
    fn set(&mut self, q: &[f32], hd: usize, softmax_scale: f32) {
        let heads = q.len() / hd;
        self.values.resize(q.len(), 0);
        self.sums.clear();
        self.scales.clear();
        for (j, row) in q.chunks_exact(hd).enumerate() {
            let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = absmax / 127.0;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            let mut sum = 0i32;
            for (o, v) in self.values[j * hd..][..hd].iter_mut().zip(row) {
                *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
                sum += *o as i32;
            }
            self.sums.push(sum);
            self.scales.push(s * softmax_scale);
        }
        debug_assert_eq!(self.sums.len(), heads);
    }
}

/// The int8 decode kernels with AVX-512: scores of 16 keys per `vpdpbusd` chain (keys in the
/// 16 × 4 layout, offset by 128; the query rounded to int8), and weighted sums of int8 value
/// rows widened in registers, each row shared by the group's heads.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::QueryI8;
    use crate::ops::attention::Int8Rows;
    use std::arch::x86_64::*;

    /// `out[j · out_stride + r]` = score of query head `j` with key `r < n`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn scores_k4(
        q: &QueryI8,
        hd: usize,
        k: &Int8Rows<'_>,
        n: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let group = q.sums.len();
        assert!(group <= 4 && hd % 4 == 0 && n > 0);
        assert!(k.data.len() >= n.div_ceil(16) * 16 * hd);
        assert!(k.scales.len() > (n - 1) * k.scale_stride);
        assert!(out.len() >= (group - 1) * out_stride + n);
        let qp = q.values.as_ptr();
        for sb in 0..n.div_ceil(16) {
            let mut acc = [_mm512_setzero_si512(); 4];
            let kp = k.data.as_ptr().add(sb * (hd / 4) * 64);
            for c in 0..hd / 4 {
                let kv = _mm512_loadu_si512(kp.add(c * 64) as *const _);
                for (j, a) in acc.iter_mut().enumerate().take(group) {
                    let q4 = (qp.add(j * hd + c * 4) as *const i32).read_unaligned();
                    *a = _mm512_dpbusd_epi32(*a, kv, _mm512_set1_epi32(q4));
                }
            }
            let rows = 16.min(n - sb * 16);
            let mut ks = [0f32; 16];
            for (r, x) in ks.iter_mut().enumerate().take(rows) {
                *x = k.scales[(sb * 16 + r) * k.scale_stride];
            }
            let ks = _mm512_loadu_ps(ks.as_ptr());
            let mask: __mmask16 = if rows == 16 {
                0xffff
            } else {
                (1u16 << rows) - 1
            };
            for (j, a) in acc.iter().enumerate().take(group) {
                let dot = _mm512_sub_epi32(*a, _mm512_set1_epi32(128 * q.sums[j]));
                let f = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(dot),
                    _mm512_mul_ps(ks, _mm512_set1_ps(q.scales[j])),
                );
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(j * out_stride + sb * 16), mask, f);
            }
        }
    }

    /// `o[j · hd ..] += Σ_r p[j · p_stride + r] · scale_r · v_r` for `r < n`; `hd` a multiple
    /// of 64, at most 4 heads.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn weighted_sum_i8(
        p: &[f32],
        p_stride: usize,
        n: usize,
        v: &Int8Rows<'_>,
        hd: usize,
        o: &mut [f32],
    ) {
        let group = o.len() / hd;
        assert!(group <= 4 && hd % 64 == 0 && n > 0);
        assert!(p.len() >= (group - 1) * p_stride + n);
        assert!(v.data.len() >= (n - 1) * v.row_stride + hd);
        assert!(v.scales.len() > (n - 1) * v.scale_stride);
        for c0 in (0..hd).step_by(64) {
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for (j, a) in acc.iter_mut().enumerate().take(group) {
                for (i, x) in a.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(o.as_ptr().add(j * hd + c0 + 16 * i));
                }
            }
            for r in 0..n {
                let row = v.data.as_ptr().add(r * v.row_stride + c0);
                let vr = [0, 1, 2, 3].map(|i| {
                    let b = _mm_loadu_si128(row.add(16 * i) as *const __m128i);
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))
                });
                let s = v.scales[r * v.scale_stride];
                for (j, a) in acc.iter_mut().enumerate().take(group) {
                    let w = _mm512_set1_ps(p[j * p_stride + r] * s);
                    for (x, y) in a.iter_mut().zip(&vr) {
                        *x = _mm512_fmadd_ps(w, *y, *x);
                    }
                }
            }
            for (j, a) in acc.iter().enumerate().take(group) {
                for (i, x) in a.iter().enumerate() {
                    _mm512_storeu_ps(o.as_mut_ptr().add(j * hd + c0 + 16 * i), *x);
                }
            }
        }
    }
}

/// The decode kernels with AVX2 + FMA: scores of four keys at a time (four independent
/// accumulators, reduced together), and the weighted sum of value rows with the output in
/// registers across rows.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `out[r] = scale · q · k_r` for `r < out.len()`, `k_r = k[r · stride ..][..q.len()]`;
    /// `q.len()` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(q: &[f32], k: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        let (n, hd) = (out.len(), q.len());
        assert!(hd % 8 == 0 && (n == 0 || k.len() >= (n - 1) * stride + hd));
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut r = 0;
        while r + 4 <= n {
            let rows = [0, 1, 2, 3].map(|i| kp.add((r + i) * stride));
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in (0..hd).step_by(8) {
                let qc = _mm256_loadu_ps(qp.add(c));
                for i in 0..4 {
                    acc[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(rows[i].add(c)), acc[i]);
                }
            }
            let s = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            _mm_storeu_ps(out.as_mut_ptr().add(r), _mm_mul_ps(s, _mm_set1_ps(scale)));
            r += 4;
        }
        for (i, o) in out.iter_mut().enumerate().skip(r) {
            let row = &k[i * stride..][..hd];
            let mut acc = _mm256_setzero_ps();
            for c in (0..hd).step_by(8) {
                acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qp.add(c)),
                    _mm256_loadu_ps(row.as_ptr().add(c)),
                    acc,
                );
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            *o = lanes.iter().sum::<f32>() * scale;
        }
    }

    /// `o += Σ_r p[r] · v_r`, `v_r = v[r · stride ..][..o.len()]`; `o.len()` a multiple of 64
    /// (each 64 columns stay in eight registers across all rows).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum(p: &[f32], v: &[f32], stride: usize, o: &mut [f32]) {
        let (n, hd) = (p.len(), o.len());
        assert!(hd % 64 == 0 && (n == 0 || v.len() >= (n - 1) * stride + hd));
        for c0 in (0..hd).step_by(64) {
            let op = o.as_mut_ptr().add(c0);
            let mut acc = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| _mm256_loadu_ps(op.add(8 * i)));
            for (r, &pr) in p.iter().enumerate() {
                let w = _mm256_set1_ps(pr);
                let row = v.as_ptr().add(r * stride + c0);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * i)), *a);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(op.add(8 * i), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The host path (short and long inputs, histories of one share and of several, prompts
    /// of one row task and of several) equals the tensor path.
    #[test]
    fn host_attention_equals_the_tensor_path() -> Result<()> {
        let dev = Device::Cpu;
        let rows = |t: &Tensor| -> Result<Vec<f32>> {
            t.transpose(0, 1)?.contiguous()?.flatten_all()?.to_vec1()
        };
        // Head sizes 8 (the AVX2 scores kernel), 64 (its weighted sum too), 12 (portable).
        for case in [
            (3, 7, 8),
            (1, 300, 8),
            (300, 333, 8),
            (160, 200, 8),
            (1, 301, 64),
            (5, 42, 64),
            (100, 230, 64),
            (2, 37, 12),
            // Long enough to be split between tasks (when read in blocks).
            (1, 1500, 64),
            (3, 2000, 8),
        ]
        .into_iter()
        // Sliding windows too: shorter than the prompt, than one block, than the history.
        .flat_map(|c| [None, Some(1), Some(5), Some(250)].map(move |w| (c, w)))
        {
            let ((len, total, head_dim), window) = case;
            let shape = Heads {
                heads: 6,
                kv_heads: 2,
                head_dim,
                scoring: Scoring {
                    window,
                    ..Default::default()
                },
            };
            let q = Tensor::randn(0f32, 1.0, (shape.heads, len, shape.head_dim), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (shape.kv_heads, total, shape.head_dim), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (shape.kv_heads, total, shape.head_dim), &dev)?;
            let want: Vec<f32> = causal_attention(&q, &k, &v, shape.scoring)?
                .flatten_all()?
                .to_vec1()?;
            let mut got = vec![0f32; len * shape.heads * shape.head_dim];
            let (kr, vr) = (rows(&k)?, rows(&v)?);
            let kv_width = shape.kv_heads * shape.head_dim;
            causal_attention_host(
                &rows(&q)?,
                &Contiguous {
                    k: &kr,
                    v: &vr,
                    kv_width,
                    head_dim,
                },
                shape,
                &mut got,
            );
            // The same history in blocks of 7 rows (a paged cache's view) gives the same result.
            let blocks = Blocks7 {
                k: &kr,
                v: &vr,
                kv_width,
                head_dim,
            };
            let mut paged = vec![0f32; got.len()];
            causal_attention_host(&rows(&q)?, &blocks, shape, &mut paged);
            let apart = got
                .iter()
                .zip(&paged)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                apart < 1e-5,
                "len {len} total {total} window {window:?} paged: {apart}"
            );
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-4,
                "len {len} total {total} window {window:?}: {worst}"
            );
        }
        Ok(())
    }

    /// A history cut into blocks of 7 rows, each handed out through the scratch buffer (as a
    /// narrower stored dtype would be).
    struct Blocks7<'a> {
        k: &'a [f32],
        v: &'a [f32],
        kv_width: usize,
        head_dim: usize,
    }

    impl Blocks7<'_> {
        /// Head `g`'s rows of block `b`, `[7, head_dim]`.
        fn block<'s>(
            &self,
            data: &[f32],
            b: usize,
            g: usize,
            scratch: &'s mut Vec<f32>,
        ) -> (&'s [f32], usize) {
            let rows = 7.min(self.total() - b * 7);
            scratch.clear();
            for r in 0..rows {
                let at = (b * 7 + r) * self.kv_width + g * self.head_dim;
                scratch.extend_from_slice(&data[at..][..self.head_dim]);
            }
            scratch.resize(7 * self.head_dim, f32::NAN); // rows past the end must not be read
            (scratch, self.head_dim)
        }
    }

    impl KvSource for Blocks7<'_> {
        fn total(&self) -> usize {
            self.k.len() / self.kv_width
        }
        fn block_rows(&self) -> usize {
            7
        }
        fn keys<'s>(&'s self, b: usize, g: usize, s: &'s mut Vec<f32>) -> (&'s [f32], usize) {
            self.block(self.k, b, g, s)
        }
        fn values<'s>(&'s self, b: usize, g: usize, s: &'s mut Vec<f32>) -> (&'s [f32], usize) {
            self.block(self.v, b, g, s)
        }
    }

    /// Every row of a prompt, computed with all the others (one step, several row tasks, a
    /// history of several shares), is bit for bit what it is alone as a decode step over the
    /// history up to it: contiguous and in blocks of 7.
    #[test]
    fn a_row_never_depends_on_the_rows_beside_it() {
        let (len, total, hd) = (90, 1100, 64);
        let shape = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: hd,
            scoring: Scoring::default(),
        };
        let kv_width = shape.kv_heads * hd;
        let width = shape.heads * hd;
        let mut state = 7u64;
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
                })
                .collect()
        };
        let (q, k, v) = (
            rand(len * width),
            rand(total * kv_width),
            rand(total * kv_width),
        );
        for blocked in [false, true] {
            let source = |rows: usize| -> Box<dyn KvSource + '_> {
                let (k, v) = (&k[..rows * kv_width], &v[..rows * kv_width]);
                if blocked {
                    Box::new(Blocks7 {
                        k,
                        v,
                        kv_width,
                        head_dim: hd,
                    })
                } else {
                    Box::new(Contiguous {
                        k,
                        v,
                        kv_width,
                        head_dim: hd,
                    })
                }
            };
            let mut all = vec![0f32; len * width];
            causal_attention_host(&q, &*source(total), shape, &mut all);
            for i in [0, 1, 31, 32, 33, 64, 89] {
                let mut one = vec![0f32; width];
                let row = &q[i * width..][..width];
                causal_attention_host(row, &*source(total - len + i + 1), shape, &mut one);
                assert_eq!(
                    &all[i * width..][..width],
                    &one[..],
                    "row {i}, blocked {blocked}"
                );
            }
            // And as the tail of a later chunk (a prefix-cache hit or chunked prefill).
            let mut tail = vec![0f32; 10 * width];
            causal_attention_host(&q[80 * width..], &*source(total), shape, &mut tail);
            assert_eq!(&all[80 * width..], &tail[..], "blocked {blocked}");
        }
    }

    #[test]
    fn last_row_of_prefill_equals_decode_step() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (4, 5, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?;
        let full = causal_attention(&q, &k, &v, Scoring::default())?;
        let last = causal_attention(
            &q.narrow(1, 4, 1)?.contiguous()?,
            &k,
            &v,
            Scoring::default(),
        )?;
        let diff = (full.narrow(0, 4, 1)? - last)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        // The first row attends to itself only: its output is exactly v[kv(h)][0].
        let first = full.narrow(0, 0, 1)?.reshape((4, 8))?;
        let v0 = v.narrow(1, 0, 1)?.squeeze(1)?;
        let expect = Tensor::stack(&[&v0.get(0)?, &v0.get(0)?, &v0.get(1)?, &v0.get(1)?], 0)?;
        let diff = (first - expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
