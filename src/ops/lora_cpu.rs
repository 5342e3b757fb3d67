//! The adapter delta on CPU for serving, gathered per row (BGMV-style): for each row, `t = A x`
//! (r dot products) then `Δ = Bᵀ t` (r axpys), reading each adapter's A and B straight from
//! their storage. One pass for all adapters of the batch, instead of a handful of candle ops
//! per adapter group; ranks 8/16/32/64 go to the AVX2 kernel in `lora_avx2.rs`, others to
//! gemm. Measured in `benches/adapters.rs`. No backward: training takes the candle path.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

use super::gemm::{gemm_f32, Mat};
use super::lora_avx2;

/// Rows per parallel task on the AVX2 path (one group of its kernel).
const ROWS_PER_TASK: usize = 4;

/// One adapter site and the rows it applies to.
pub struct RowSite<'a> {
    /// `[in, r]`, contiguous.
    pub a_t: &'a Tensor,
    /// `[r, out]`, scale folded in, contiguous.
    pub b_t: &'a Tensor,
    /// DoRA `m / ‖W + s·BA‖`, `[out]`.
    pub dora_scale: Option<&'a Tensor>,
    pub rows: Vec<usize>,
}

/// Whether the fast path applies: f32 activations on CPU (A and B in f32, bf16 or f16),
/// nothing tracking gradients.
pub fn applies(x: &Tensor, sites: &[RowSite<'_>]) -> bool {
    let ok = |t: &Tensor, types: &[DType]| {
        matches!(t.device(), Device::Cpu)
            && types.contains(&t.dtype())
            && !t.track_op()
            && t.is_contiguous()
    };
    let f32_only = [DType::F32];
    let weights = [DType::F32, DType::BF16, DType::F16];
    ok(x, &f32_only)
        && sites.iter().all(|s| {
            ok(s.a_t, &weights)
                && s.b_t.dtype() == s.a_t.dtype()
                && ok(s.b_t, &weights)
                && s.dora_scale.is_none_or(|d| ok(d, &f32_only))
        })
}

fn offsets(t: &Tensor) -> Result<(usize, usize)> {
    t.layout()
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("lora_cpu: tensor is not contiguous".into()))
}

fn slice<'g>(storage: &'g Storage, t: &Tensor) -> Result<&'g [f32]> {
    let (start, end) = offsets(t)?;
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[start..end]),
        _ => candle_core::bail!("lora_cpu: expected f32 CPU storage"),
    }
}

/// A's or B's values as stored.
enum Elems<'g> {
    F32(&'g [f32]),
    Bf16(&'g [half::bf16]),
    F16(&'g [half::f16]),
}

impl Elems<'_> {
    fn of<'g>(storage: &'g Storage, t: &Tensor) -> Result<Elems<'g>> {
        let (start, end) = offsets(t)?;
        Ok(match storage {
            Storage::Cpu(CpuStorage::F32(v)) => Elems::F32(&v[start..end]),
            Storage::Cpu(CpuStorage::BF16(v)) => Elems::Bf16(&v[start..end]),
            Storage::Cpu(CpuStorage::F16(v)) => Elems::F16(&v[start..end]),
            _ => candle_core::bail!("lora_cpu: expected f32, bf16 or f16 CPU storage"),
        })
    }

    fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Elems::F32(v) => std::borrow::Cow::Borrowed(v),
            Elems::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Elems::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// `Δ = (X_rows · Aᵀ) · (s·B)ᵀ` for one site: `[rows, out]`.
fn site_delta(
    xv: &[f32],
    inp: usize,
    out: usize,
    site: &RowSite<'_>,
    rows: &[usize],
    parallelism: gemm::Parallelism,
) -> Result<Vec<f32>> {
    let m = rows.len();
    let r = site.a_t.dim(1)?;
    let (ag, _) = site.a_t.storage_and_layout();
    let (bg, _) = site.b_t.storage_and_layout();
    let (ae, be) = (Elems::of(&ag, site.a_t)?, Elems::of(&bg, site.b_t)?);
    if lora_avx2::supports(r) {
        match (&ae, &be) {
            (Elems::F32(a), Elems::F32(b)) => {
                return Ok(lora_avx2::rows_delta(xv, inp, rows, a, b, r, out))
            }
            (Elems::Bf16(a), Elems::Bf16(b)) => {
                return Ok(lora_avx2::rows_delta(xv, inp, rows, a, b, r, out))
            }
            (Elems::F16(a), Elems::F16(b)) => {
                return Ok(lora_avx2::rows_delta(xv, inp, rows, a, b, r, out))
            }
            _ => {}
        }
    }
    let (a, b) = (ae.to_f32(), be.to_f32());
    let (a, b): (&[f32], &[f32]) = (&a, &b);
    let first = rows[0];
    let gathered: Vec<f32>;
    let xg: &[f32] = if rows.windows(2).all(|w| w[1] == w[0] + 1) {
        &xv[first * inp..(first + m) * inp]
    } else {
        gathered = rows
            .iter()
            .flat_map(|&row| xv[row * inp..(row + 1) * inp].iter().copied())
            .collect();
        &gathered
    };
    let mut t = vec![0f32; m * r];
    gemm_f32(
        (m, r, inp),
        &mut t,
        r,
        false,
        Mat::rows(xg, inp),
        Mat::rows(a, r),
        gemm::Parallelism::None,
    );
    let mut delta = vec![0f32; m * out];
    gemm_f32(
        (m, out, r),
        &mut delta,
        out,
        false,
        Mat::rows(&t, r),
        Mat::rows(b, out),
        parallelism,
    );
    Ok(delta)
}

/// `base + Δ` where Δ holds each site's delta on its rows (zero elsewhere). `base` is the
/// base product without bias, `[n, out]`; `x` is `[n, in]`. Several adapters run in parallel
/// (their weights stream from memory side by side); one adapter runs on the calling thread.
pub fn add_deltas(x: &Tensor, base: &Tensor, sites: &[RowSite<'_>]) -> Result<Tensor> {
    use rayon::prelude::*;
    let (n, inp) = x.dims2()?;
    let out = base.dim(1)?;
    for site in sites {
        if let Some(&bad) = site.rows.iter().find(|&&r| r >= n) {
            candle_core::bail!("lora_cpu: row {bad} out of {n}");
        }
    }
    // Tasks: (site, rows). The AVX2 kernel (ranks 8/16/32/64) takes a group of rows at a time;
    // the gemm path takes a site whole.
    let tasks: Vec<(&RowSite<'_>, &[usize])> = sites
        .iter()
        .filter(|s| !s.rows.is_empty())
        .flat_map(|s| {
            let per = if lora_avx2::supports(s.a_t.dim(1).unwrap_or(0)) {
                ROWS_PER_TASK
            } else {
                s.rows.len()
            };
            s.rows.chunks(per).map(move |rows| (s, rows))
        })
        .collect();
    let deltas: Vec<Vec<f32>> = {
        let (xs, _) = x.storage_and_layout();
        let xv = slice(&xs, x)?;
        let one_site = tasks.iter().all(|(s, _)| std::ptr::eq(*s, tasks[0].0));
        if tasks.len() == 1 {
            let (s, rows) = tasks[0];
            vec![site_delta(
                xv,
                inp,
                out,
                s,
                rows,
                gemm::Parallelism::Rayon(0),
            )?]
        } else if one_site {
            // One adapter's few rows: waking another thread costs more than it saves
            // (measured on the decode step: 9.1 ms of adapter work in parallel, 6.9 ms here).
            tasks
                .iter()
                .map(|(s, rows)| site_delta(xv, inp, out, s, rows, gemm::Parallelism::None))
                .collect::<Result<_>>()?
        } else {
            // Several adapters: their weights stream from memory in parallel.
            tasks
                .par_iter()
                .map(|(s, rows)| site_delta(xv, inp, out, s, rows, gemm::Parallelism::None))
                .collect::<Result<_>>()?
        }
    };
    let mut y: Vec<f32> = base.flatten_all()?.to_vec1()?;
    for ((site, rows), delta) in tasks.iter().zip(&deltas) {
        let dg = site.dora_scale.map(|d| d.storage_and_layout());
        let dora = match (&dg, site.dora_scale) {
            (Some((g, _)), Some(d)) => Some(slice(g, d)?),
            _ => None,
        };
        for (i, &row) in rows.iter().enumerate() {
            let yr = &mut y[row * out..(row + 1) * out];
            let dr = &delta[i * out..(i + 1) * out];
            match dora {
                None => yr.iter_mut().zip(dr).for_each(|(y, d)| *y += d),
                // (m/n) ⊙ (Wx + Δ)
                Some(ms) => yr
                    .iter_mut()
                    .zip(dr)
                    .zip(ms)
                    .for_each(|((y, d), m)| *y = m * (*y + d)),
            }
        }
    }
    Tensor::from_vec(y, (n, out), x.device())
}
