//! GGUF quantized tensors served in their stored quantization: Q4_1 (and Q4_0 as Q4_1), Q8_0,
//! Q5_0, Q4_K, Q5_K and Q6_K by our own repacked integer kernels (`q4_1.rs`, `q8_0.rs`,
//! `q5_0.rs`, `q4_k.rs`, `q5_k.rs`, `q6_k.rs`; Q5_0 and the K-quants where the CPU has AVX-512
//! VNNI), the other types (Q5_1, Q2_K, Q3_K, and those elsewhere) by candle's
//! `QMatMul`, which also quantizes activations to 8 bits and takes integer dot products (with
//! repacked AVX-512 VNNI kernels for Q4_K, Q6_K and Q8_0). Never dequantized for serving.
//! Differentiable in the activations (training adapters on the served weights, as QLoRA does on
//! NF4): the forward is the serving kernel, the input gradient `dY · W` multiplies by the
//! dequantized weight, a band of rows at a time (the 8-bit rounding of activations in the
//! forward passes the gradient straight through).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Module, Result, Shape, Tensor};

use super::int8::RowOrder;
use super::q4_1::Q41Weight;
use super::q4_k::Q4KWeight;
use super::q5_0::Q50Weight;
use super::q5_k::Q5KWeight;
use super::q6_k::Q6KWeight;
use super::q8_0::Q80Weight;

/// The quantization types served natively.
pub const SUPPORTED: &[GgmlDType] = &[
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// The names of `SUPPORTED`, for error messages.
pub fn supported_names() -> String {
    SUPPORTED
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Q4_1 / Q4_0, Q8_0 and Q4_K keep only their repacked tiles (the GGUF bytes are dropped); the
/// others keep the stored tensor.
#[derive(Clone)]
enum Kernel {
    Q41(Arc<Q41Weight>),
    Q80(Arc<Q80Weight>),
    Q4K(Arc<Q4KWeight>),
    Q5K(Arc<Q5KWeight>),
    Q50(Arc<Q50Weight>),
    Q6K(Arc<Q6KWeight>),
    Ggml(QMatMul, Arc<QTensor>),
}

/// A quantized `[out, in]` weight and its matmul.
#[derive(Clone)]
pub struct QuantLinear {
    kernel: Kernel,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for QuantLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantLinear[{}, {}, {:?}]",
            self.rows, self.cols, self.dtype
        )
    }
}

impl QuantLinear {
    /// Serves `q` (`[out, in]`) as stored; `None` for a type not in `SUPPORTED`.
    pub fn new(q: Arc<QTensor>) -> Result<Option<Self>> {
        let dtype = q.dtype();
        if !SUPPORTED.contains(&dtype) {
            return Ok(None);
        }
        let (rows, cols) = q.shape().dims2()?;
        if let Some(ours) = Self::from_stored(dtype, &q.data()?, rows, cols, RowOrder::STORED)? {
            return Ok(Some(ours));
        }
        Ok(Some(Self {
            kernel: Kernel::Ggml(QMatMul::from_arc(q.clone())?, q),
            dtype,
            rows,
            cols,
        }))
    }

    /// Whether one of our kernels serves `dtype` rows of `cols` values on this CPU.
    pub fn ours(dtype: GgmlDType, cols: usize) -> bool {
        match dtype {
            GgmlDType::Q4_1 | GgmlDType::Q4_0 | GgmlDType::Q8_0 => cols % super::int8::QK == 0,
            // Ours where the CPU has AVX-512 VNNI (measured there: at or above candle's speed
            // at decode, a quarter less memory); elsewhere candle's repacked kernels, which our
            // AVX2 path has not been measured against on an AVX2-only CPU (and Q6_K has no
            // AVX2 kernel of ours yet).
            GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => {
                super::int8::Kernel::detect().is_avx512()
            }
            // Likewise (no AVX2 kernel of ours).
            GgmlDType::Q5_0 => {
                cols % super::int8::QK == 0 && super::int8::Kernel::detect().is_avx512()
            }
            _ => false,
        }
    }

    /// Serves a `[rows, cols]` tensor's bytes as stored in the GGUF file with one of our
    /// kernels, output row `r` taken from stored row `order.source(r)`, repacked straight from
    /// `data` (no tensor of candle's in between); `None` where no kernel of ours serves `dtype`
    /// on this CPU (candle's `QMatMul` does, through `new`).
    pub fn from_stored(
        dtype: GgmlDType,
        data: &[u8],
        rows: usize,
        cols: usize,
        order: RowOrder,
    ) -> Result<Option<Self>> {
        if !Self::ours(dtype, cols) {
            return Ok(None);
        }
        let err = candle_core::Error::msg;
        let kernel = match dtype {
            GgmlDType::Q4_1 => Kernel::Q41(Arc::new(
                Q41Weight::from_gguf_ordered(data, rows, cols, order).map_err(err)?,
            )),
            // Q4_0 is Q4_1 with `m = −8·d` (exact): the same tiles and kernels.
            GgmlDType::Q4_0 => Kernel::Q41(Arc::new(
                Q41Weight::from_gguf_q4_0(data, rows, cols, order).map_err(err)?,
            )),
            GgmlDType::Q8_0 => Kernel::Q80(Arc::new(
                Q80Weight::from_gguf_ordered(data, rows, cols, order).map_err(err)?,
            )),
            GgmlDType::Q4K => Kernel::Q4K(Arc::new(
                Q4KWeight::from_gguf_ordered(data, rows, cols, order).map_err(err)?,
            )),
            GgmlDType::Q5K => Kernel::Q5K(Arc::new(
                Q5KWeight::from_gguf_ordered(data, rows, cols, order).map_err(err)?,
            )),
            GgmlDType::Q5_0 => Kernel::Q50(Arc::new(
                Q50Weight::from_gguf_ordered(data, rows, cols, order).map_err(err)?,
            )),
            GgmlDType::Q6K => Kernel::Q6K(Arc::new(
                Q6KWeight::from_gguf_ordered(data, rows, cols, order).map_err(err)?,
            )),
            _ => return Ok(None),
        };
        Ok(Some(Self {
            kernel,
            dtype,
            rows,
            cols,
        }))
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Which kernel serves it: ours (`q4_1`, `q8_0`, `q5_0`, `q4_k`, `q5_k`, `q6_k`) or candle's (`ggml`).
    pub fn kernel_name(&self) -> &'static str {
        match &self.kernel {
            Kernel::Q41(_) => "q4_1",
            Kernel::Q80(_) => "q8_0",
            Kernel::Q4K(_) => "q4_k",
            Kernel::Q5K(_) => "q5_k",
            Kernel::Q50(_) => "q5_0",
            Kernel::Q6K(_) => "q6_k",
            Kernel::Ggml(..) => "ggml",
        }
    }

    /// Bytes held for serving.
    pub fn bytes(&self) -> usize {
        match &self.kernel {
            Kernel::Q41(w) => w.bytes(),
            Kernel::Q80(w) => w.bytes(),
            Kernel::Q4K(w) => w.bytes(),
            Kernel::Q5K(w) => w.bytes(),
            Kernel::Q50(w) => w.bytes(),
            Kernel::Q6K(w) => w.bytes(),
            Kernel::Ggml(_, q) => q.storage_size_in_bytes(),
        }
    }

    /// The weight in f32 (DoRA norms, merging); a temporary, never kept for serving.
    pub fn dequantize(&self) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Q41(w) => {
                Tensor::from_vec(w.dequantize(), (self.rows, self.cols), &Device::Cpu)
            }
            Kernel::Q80(w) => {
                Tensor::from_vec(w.dequantize(), (self.rows, self.cols), &Device::Cpu)
            }
            Kernel::Q4K(w) => {
                Tensor::from_vec(w.dequantize(), (self.rows, self.cols), &Device::Cpu)
            }
            Kernel::Q5K(w) => {
                Tensor::from_vec(w.dequantize(), (self.rows, self.cols), &Device::Cpu)
            }
            Kernel::Q50(w) => {
                Tensor::from_vec(w.dequantize(), (self.rows, self.cols), &Device::Cpu)
            }
            Kernel::Q6K(w) => {
                Tensor::from_vec(w.dequantize(), (self.rows, self.cols), &Device::Cpu)
            }
            Kernel::Ggml(_, q) => q.dequantize(&Device::Cpu),
        }
    }

    /// Rows `ids` (`[n]` u32) in f32, `[n, in]`: an embedding lookup on the same bytes a tied
    /// lm_head uses.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let idx: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= self.rows) {
            candle_core::bail!(
                "token id {bad} is outside the embedding of {} rows",
                self.rows
            );
        }
        let n = idx.len();
        match &self.kernel {
            Kernel::Q41(w) => {
                Tensor::from_vec(w.dequantize_rows(&idx), (n, self.cols), &Device::Cpu)
            }
            Kernel::Q80(w) => {
                Tensor::from_vec(w.dequantize_rows(&idx), (n, self.cols), &Device::Cpu)
            }
            Kernel::Q4K(w) => {
                Tensor::from_vec(w.dequantize_rows(&idx), (n, self.cols), &Device::Cpu)
            }
            Kernel::Q5K(w) => {
                Tensor::from_vec(w.dequantize_rows(&idx), (n, self.cols), &Device::Cpu)
            }
            Kernel::Q50(w) => {
                Tensor::from_vec(w.dequantize_rows(&idx), (n, self.cols), &Device::Cpu)
            }
            Kernel::Q6K(w) => {
                Tensor::from_vec(w.dequantize_rows(&idx), (n, self.cols), &Device::Cpu)
            }
            Kernel::Ggml(_, q) => q.embedding(ids),
        }
    }

    /// `x · Wᵀ` for `x` of `[rows, in]` (f32); differentiable in `x` (see the module).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            if !matches!(x.device(), Device::Cpu) {
                candle_core::bail!("training on a GGUF-quantized base runs on the CPU");
            }
            return x
                .to_dtype(candle_core::DType::F32)?
                .contiguous()?
                .apply_op1(QuantOp(self.clone()));
        }
        match &self.kernel {
            Kernel::Ggml(m, _) => m.forward(x),
            _ => {
                let n = x.dim(0)?;
                let xs: Vec<f32> = x
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                Tensor::from_vec(self.matmul_host(&xs, n)?, (n, self.rows), x.device())
            }
        }
    }
}

/// Rows of `W` per band of the input gradient: dequantized to f32 (`BAND × in`, at most
/// 1.5 MB on the default model's widest projection) and multiplied with gemm.
const BAND: usize = 256;

impl QuantLinear {
    /// `x · Wᵀ` on host rows (`x`: `[n, cols]`).
    pub(crate) fn matmul_host(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        Ok(match &self.kernel {
            Kernel::Q41(w) => w.matmul_t(x, n),
            Kernel::Q80(w) => w.matmul_t(x, n),
            Kernel::Q4K(w) => w.matmul_t(x, n),
            Kernel::Q5K(w) => w.matmul_t(x, n),
            Kernel::Q50(w) => w.matmul_t(x, n),
            Kernel::Q6K(w) => w.matmul_t(x, n),
            Kernel::Ggml(m, _) => m
                .forward(&Tensor::from_slice(x, (n, self.cols), &Device::Cpu)?)?
                .flatten_all()?
                .to_vec1()?,
        })
    }

    /// Rows `start .. start + count` in f32, `[count, cols]`.
    fn dequantize_band(&self, start: usize, count: usize) -> Result<Vec<f32>> {
        let ids: Vec<u32> = (start as u32..(start + count) as u32).collect();
        Ok(match &self.kernel {
            Kernel::Q41(w) => w.dequantize_rows(&ids),
            Kernel::Q80(w) => w.dequantize_rows(&ids),
            Kernel::Q4K(w) => w.dequantize_rows(&ids),
            Kernel::Q5K(w) => w.dequantize_rows(&ids),
            Kernel::Q50(w) => w.dequantize_rows(&ids),
            Kernel::Q6K(w) => w.dequantize_rows(&ids),
            Kernel::Ggml(_, q) => q
                .dequantize(&Device::Cpu)?
                .narrow(0, start, count)?
                .flatten_all()?
                .to_vec1()?,
        })
    }

    /// `grad_x[n, cols] = grad_y[n, rows] · W`, band by band in order (the same sums every
    /// time: no reduction across threads). candle's types dequantize a whole tensor at a time:
    /// one band.
    pub(crate) fn backward_raw(&self, grad_y: &[f32], n: usize) -> Result<Vec<f32>> {
        use crate::ops::gemm::{gemm_f32, Mat};
        let (rows, cols) = (self.rows, self.cols);
        let band = match self.kernel {
            Kernel::Ggml(..) => rows,
            _ => BAND,
        };
        let mut gx = vec![0f32; n * cols];
        for start in (0..rows).step_by(band) {
            let count = band.min(rows - start);
            let w = self.dequantize_band(start, count)?;
            gemm_f32(
                (n, cols, count),
                &mut gx,
                cols,
                start > 0,
                Mat::rows(&grad_y[start..], rows),
                Mat::rows(&w, cols),
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        Ok(gx)
    }
}

/// `x · Wᵀ` on a quantized weight as a candle op with a backward in `x`.
struct QuantOp(QuantLinear);

impl CustomOp1 for QuantOp {
    fn name(&self) -> &'static str {
        "gguf-quant-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, inp) = l.shape().dims2()?;
        if inp != self.0.cols {
            candle_core::bail!(
                "quantized matmul: input has {inp} features, the weight {}",
                self.0.cols
            );
        }
        let y = self.0.matmul_host(super::nf4_matmul::f32_slice(s, l)?, n)?;
        Ok((CpuStorage::F32(y), Shape::from((n, self.0.rows))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, inp) = arg.dims2()?;
        let g: Vec<f32> = grad
            .to_dtype(candle_core::DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1()?;
        let gx = self.0.backward_raw(&g, n)?;
        Ok(Some(Tensor::from_vec(gx, (n, inp), arg.device())?))
    }
}

/// Rows of a quantized `[rows, cols]` tensor reordered by `perm` (`out[i] = in[perm[i]]`):
/// whole rows of blocks move, nothing is requantized.
pub fn permute_rows(q: &QTensor, perm: &[usize]) -> Result<QTensor> {
    let rows = q.shape().dims2()?.0;
    if perm.len() != rows {
        candle_core::bail!("a row permutation of {} rows for {rows} rows", perm.len());
    }
    select_rows(q, perm)
}

/// The rows `pick` of a quantized `[rows, cols]` tensor, in that order (blocks run along a
/// row, so rows move whole): a `[pick.len(), cols]` tensor.
pub fn select_rows(q: &QTensor, perm: &[usize]) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    if perm.iter().any(|&r| r >= rows) || data.len() != rows * row_bytes {
        candle_core::bail!("row selection does not fit a [{rows}, {cols}] {dtype:?} tensor");
    }
    let mut out = Vec::with_capacity(data.len());
    for &p in perm {
        out.extend_from_slice(&data[p * row_bytes..(p + 1) * row_bytes]);
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(out),
        &Device::Cpu,
        dtype,
    )?;
    QTensor::new(storage, (perm.len(), cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(rows: usize, cols: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761usize % 10007) as f32 / 10007.0 - 0.5) * 0.1)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn every_supported_type_matches_its_dequantized_matmul() {
        // 256-value rows fit the K-quants' superblocks; 48 and 33 rows are not multiples of 16.
        for &(rows, cols) in &[(48usize, 256usize), (33, 512), (64, 768)] {
            let w = weight(rows, cols);
            for &ty in SUPPORTED {
                let q = Arc::new(QTensor::quantize(&w, ty).unwrap());
                let lin = QuantLinear::new(q.clone()).unwrap().unwrap();
                let dense = lin.dequantize().unwrap();
                for n in [1usize, 3, 8, 9, 32] {
                    let xv: Vec<f32> = (0..n * cols)
                        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
                        .collect();
                    let x = Tensor::from_vec(xv, (n, cols), &Device::Cpu).unwrap();
                    let got = lin.matmul_t(&x).unwrap();
                    let want = x.matmul(&dense.t().unwrap()).unwrap();
                    // Activations are quantized to 8 bits per block (127 levels of the block's
                    // max |x| = 1): relative to Σ|w·x| the error stays below 1/127.
                    let scale = x
                        .abs()
                        .unwrap()
                        .matmul(&dense.abs().unwrap().t().unwrap())
                        .unwrap();
                    let err = ((got - &want).unwrap().abs().unwrap() / (scale + 1e-6).unwrap())
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(
                        err < 1.0 / 127.0,
                        "{ty:?} {rows}x{cols} n={n}: relative error {err}"
                    );
                }
            }
        }
    }

    /// Training through a quantized weight: the forward is the serving kernel's, the input
    /// gradient is `dY · W` with the dequantized weight, for our kernels and candle's.
    #[test]
    fn input_gradient_is_dy_times_the_dequantized_weight() {
        use candle_core::Var;
        for ty in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
            let (rows, cols) = (300, 256);
            let q = Arc::new(QTensor::quantize(&weight(rows, cols), ty).unwrap());
            let lin = QuantLinear::new(q).unwrap().unwrap();
            let dense = lin.dequantize().unwrap();
            for n in [1usize, 5] {
                let xv: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
                    .collect();
                let x = Var::from_tensor(&Tensor::from_vec(xv, (n, cols), &Device::Cpu).unwrap())
                    .unwrap();
                let served = lin.matmul_t(&x.as_tensor().detach()).unwrap();
                let y = lin.matmul_t(x.as_tensor()).unwrap();
                let same = (&y - &served).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0, "{ty:?}: forward");
                let dy = Tensor::from_vec(
                    (0..n * rows)
                        .map(|i| (i % 7) as f32 - 3.0)
                        .collect::<Vec<f32>>(),
                    (n, rows),
                    &Device::Cpu,
                )
                .unwrap();
                let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let got = grads.get(x.as_tensor()).expect("a gradient reaches x");
                let want = dy.matmul(&dense).unwrap();
                let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                assert!(d < 1e-4, "{ty:?} n={n}: {d}");
            }
        }
    }

    #[test]
    fn permuted_rows_move_whole() {
        let w = weight(4, 64);
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let p = permute_rows(&q, &[2, 0, 3, 1]).unwrap();
        let (a, b) = (
            q.dequantize(&Device::Cpu).unwrap(),
            p.dequantize(&Device::Cpu).unwrap(),
        );
        for (i, &src) in [2usize, 0, 3, 1].iter().enumerate() {
            let d = (b.get(i).unwrap() - a.get(src).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0);
        }
    }

    /// Repacking straight from the file's bytes with a row order gives the same weight as
    /// permuting the stored tensor first, for each type our kernels serve.
    #[test]
    fn repacking_in_a_row_order_is_permuting_first() {
        let (rows, cols) = (40, 512);
        let order: Vec<usize> = (0..rows).map(|i| (i * 7 + 3) % rows).collect();
        for &ty in SUPPORTED {
            if !QuantLinear::ours(ty, cols) {
                continue;
            }
            let q = QTensor::quantize(&weight(rows, cols), ty).unwrap();
            let data = q.data().unwrap();
            let order = RowOrder::new(&order, rows).unwrap();
            let direct = QuantLinear::from_stored(ty, &data, rows, cols, order)
                .unwrap()
                .expect("ours");
            let first = QuantLinear::new(Arc::new(permute_rows(&q, order.0.unwrap()).unwrap()))
                .unwrap()
                .unwrap();
            assert_eq!(direct.kernel_name(), first.kernel_name());
            let (a, b) = (direct.dequantize().unwrap(), first.dequantize().unwrap());
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{ty:?}"
            );
            let stored = QuantLinear::from_stored(ty, &data, rows, cols, RowOrder::STORED)
                .unwrap()
                .unwrap()
                .dequantize()
                .unwrap();
            assert_ne!(
                stored.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{ty:?}: the order was not applied"
            );
        }
        assert!(RowOrder::new(&[0, 0, 1], 3).is_err());
        assert!(RowOrder::new(&[0, 3, 1], 3).is_err());
        assert!(RowOrder::new(&[0, 1], 3).is_err());
    }
}
